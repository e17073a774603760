"""What the low-precision converters share: the optional torchao import and the CUDA capability gate."""

import torch

from torchtitan.config.errors import ConfigError

INSTALL_TORCHAO = 'pip install -e ".[float8]"'

Capability = tuple[int, int]


def require_torchao(converter: str) -> None:
    """Raise a one-line ConfigError with the install command when torchao cannot be imported."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"model.converters: {converter} needs torchao, which is not installed; fix: {INSTALL_TORCHAO}"
        ) from None


def cuda_capability() -> Capability | None:
    """The (major, minor) compute capability of the current CUDA device; None when there is no CUDA."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def require_capability(converter: str, capability: Capability | None, minimum: Capability, fix: str) -> None:
    """Raise a one-line ConfigError unless `capability` (None: no CUDA GPU) is at least `minimum`."""
    if capability is not None and capability >= minimum:
        return
    found = "this machine has no CUDA GPU" if capability is None else f"this GPU is SM {capability[0]}.{capability[1]}"
    raise ConfigError(
        f"model.converters: {converter} needs a CUDA GPU of compute capability >= {minimum[0]}.{minimum[1]} "
        f"(SM {minimum[0]}.{minimum[1]}); {found}; fix: {fix}"
    )
