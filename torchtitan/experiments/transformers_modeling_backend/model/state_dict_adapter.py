"""State-dict adapter of the transformers modeling backend: our FQNs already are the HF keys."""

from typing import Any

from torchtitan.experiments.transformers_modeling_backend.model.args import HFTransformerModelArgs
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

_TIED_KEY = "lm_head.weight"
_EMBED_KEY = "model.embed_tokens.weight"


class HFTransformerStateDictAdapter(StateDictAdapter):
    """Identity on names, except a tied output head: it is the embedding, so it is neither written nor
    read (transformers' `save_pretrained` omits it as well) and is restored from the embedding. A last
    pipeline stage holds the head without the embedding: its copy stands for the embedding (equal values)."""

    model_args: HFTransformerModelArgs

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if not self.model_args.tie_word_embeddings:
            return dict(state_dict)
        state = {k: v for k, v in state_dict.items() if k != _TIED_KEY}
        if _EMBED_KEY not in state and _TIED_KEY in state_dict:
            state[_EMBED_KEY] = state_dict[_TIED_KEY]
        return state

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        state = dict(hf_state_dict)
        if self.model_args.tie_word_embeddings and _EMBED_KEY in state:
            state[_TIED_KEY] = state[_EMBED_KEY]
        return state

    def hf_config(self) -> dict[str, Any]:
        """The (possibly shrunk) config the model was built from, as `config.json` contents."""
        config = self.model_args.hf_config.to_dict()
        config["architectures"] = [self.model_args.architecture]
        config["use_cache"] = True
        return config
