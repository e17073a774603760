"""Job configuration: the `JobConfig` schema, `ConfigManager` (defaults < TOML < CLI) and `ConfigError`."""

from torchtitan.config.errors import ConfigError
from torchtitan.config.job_config import JobConfig
from torchtitan.config.manager import ConfigManager, to_dict

__all__ = ["ConfigError", "ConfigManager", "JobConfig", "to_dict"]
