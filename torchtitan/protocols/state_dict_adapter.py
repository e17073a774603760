"""Conversion between a model's state dict and the Hugging Face layout of the same model."""

from abc import ABC, abstractmethod
from typing import Any

from torchtitan.protocols.model import BaseModelArgs


class StateDictAdapter(ABC):
    """Maps our parameter names and layouts to Hugging Face's and back.

    Built as `spec.state_dict_adapter(model_args, hf_assets_path)`; `hf_assets_path` is the folder of
    the Hugging Face assets (tokenizer, config.json), used for metadata such as special token ids.
    """

    def __init__(self, model_args: BaseModelArgs, hf_assets_path: str | None) -> None:
        self.model_args = model_args
        self.hf_assets_path = hf_assets_path

    @abstractmethod
    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Our state dict (any subset of keys) -> Hugging Face names and layouts."""

    @abstractmethod
    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """Hugging Face state dict -> our names and layouts."""

    @abstractmethod
    def hf_config(self) -> dict[str, Any]:
        """The `config.json` contents that describe our model in Hugging Face transformers."""
