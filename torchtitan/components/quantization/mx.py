"""`quantize.linear.mx`: the hardware gate of MXFP8 linear training (config section `[quantize.linear.mx]`).

MXFP8 matmuls need Blackwell tensor cores (SM 10.0). Only the gate is built: below SM 10.0 (and on CPU)
the run stops with the requirement; on such a GPU it stops saying the conversion is not built yet.
"""

from typing import Any, NoReturn

from torchtitan.components.quantization.utils import cuda_capability, require_capability, require_torchao
from torchtitan.config.errors import ConfigError
from torchtitan.protocols.model_converter import register_model_converter

MX = "quantize.linear.mx"
MIN_CAPABILITY = (10, 0)


def build_mx_linear_converter(job_config: Any, parallel_dims: Any = None) -> NoReturn:
    """Refuse `quantize.linear.mx` in one line: the hardware requirement where it is not met, else not built."""
    require_torchao(MX)
    require_capability(
        MX, cuda_capability(), MIN_CAPABILITY,
        fix=f"remove {MX} from model.converters (quantize.linear.float8 runs on SM 8.9+ GPUs and on CPU)",
    )
    raise ConfigError(
        f"model.converters: {MX} is not supported yet (this GPU meets its SM 10.0 requirement, but the MXFP8 "
        "conversion is not built); fix: use quantize.linear.float8"
    )


register_model_converter(build_mx_linear_converter, MX)
