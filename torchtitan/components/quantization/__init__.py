"""Low-precision training converters (registered on import): `quantize.linear.float8` and the
`quantize.linear.mx` hardware gate. torchao is imported only when a converter is built."""

from torchtitan.components.quantization import float8, mx  # noqa: F401
