"""Model converters (e.g. Float8 training) selected by name with `model.converters`."""

from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from torchtitan.config.errors import ConfigError
from torchtitan.tools.logging import get_logger

logger = get_logger(__name__)


class ModelConverter(Protocol):
    """Rewrites a (meta-device) model in place before parallelization."""

    def __init__(self, job_config: Any, parallel_dims: Any) -> None: ...

    def convert(self, model: nn.Module) -> None: ...

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None: ...


# A converter class, or any callable with its constructor's signature (one may refuse to build).
ConverterFactory = Callable[[Any, Any], ModelConverter]

_converters: dict[str, ConverterFactory] = {}


def register_model_converter(converter_cls: ConverterFactory, name: str) -> None:
    """Make `converter_cls` selectable as `model.converters = [name]`; names are unique."""
    if name in _converters:
        raise ValueError(f"a model converter named {name!r} is already registered")
    _converters[name] = converter_cls


class ModelConvertersContainer:
    """The converters named in `model.converters`, applied in order."""

    def __init__(self, job_config: Any, parallel_dims: Any = None) -> None:
        unknown = [n for n in job_config.model.converters if n not in _converters]
        if unknown:
            raise ConfigError(
                f"model.converters: unknown converter(s) {unknown}; choose from {sorted(_converters)}"
            )
        self.converters = [_converters[n](job_config, parallel_dims) for n in job_config.model.converters]
        self.print_after_conversion = job_config.model.print_after_conversion

    def convert(self, model: nn.Module) -> None:
        for converter in self.converters:
            converter.convert(model)
        if self.print_after_conversion and self.converters:
            logger.info(f"model after conversion:\n{model}")

    def post_optimizer_hook(self, model: nn.Module | list[nn.Module]) -> None:
        for converter in self.converters:
            converter.post_optimizer_hook(model)


def build_model_converters(job_config: Any, parallel_dims: Any = None) -> ModelConvertersContainer:
    """The container of the converters the job asks for (`import torchtitan.builtins` registers the
    built-in ones)."""
    return ModelConvertersContainer(job_config, parallel_dims)
