"""Conversion between our Llama 3 state dict and Hugging Face `LlamaForCausalLM`'s."""

import json
import os
import re
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from torchtitan.config.errors import ConfigError
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

# our name -> HF name; "{}" is the layer id
_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_FROM_HF = {hf: ours for ours, hf in _TO_HF.items()}
# HF checkpoints of some vintages carry the (recomputed) RoPE inverse frequencies; we do too
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Map `key` through a name table whose entries may contain one "{}" layer id."""
    layer = re.search(r"layers\.(\d+)\.", key)
    template = key.replace(f"layers.{layer.group(1)}.", "layers.{}.", 1) if layer else key
    name = table.get(template)
    return name.format(layer.group(1)) if name and layer else name


class Llama3StateDictAdapter(StateDictAdapter):
    """Our names <-> `LlamaForCausalLM` names, with the q/k row permutation between RoPE layouts.

    Our RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each head; HF's rotates (x[i],
    x[i + head_dim/2]). Reordering the output rows of wq/wk per head makes the two models equal.
    """

    model_args: TransformerModelArgs

    def _permute(self, w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
        # per head, to HF: rows (0,1),(2,3),... -> rows (0,d/2),(1,d/2+1),...; from HF: the inverse
        split = (n_heads, -1, 2, w.shape[1]) if to_hf else (n_heads, 2, -1, w.shape[1])
        out = w.view(split).transpose(1, 2).reshape(w.shape)
        if isinstance(w, DTensor) and out.placements != w.placements:
            # heads split across ranks come out as strided shards; give back the input's layout
            out = out.redistribute(placements=w.placements)
        return out

    def _convert(self, state_dict: dict[str, Any], table: dict[str, str], to_hf: bool) -> dict[str, Any]:
        args = self.model_args
        heads = {"wq": args.n_heads, "q_proj": args.n_heads, "wk": args.kv_heads, "k_proj": args.kv_heads}
        out = {}
        for key, value in state_dict.items():
            if not to_hf and _HF_IGNORED.fullmatch(key):
                continue
            name = _rename(key, table)
            if name is None:
                side = "torchtitan Llama 3" if to_hf else "Hugging Face LlamaForCausalLM"
                raise ConfigError(f"state dict key {key!r} is not a {side} parameter; check the checkpoint's model")
            projection = key.split(".")[-2]
            out[name] = self._permute(value, heads[projection], to_hf) if projection in heads else value
        return out

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return self._convert(state_dict, _TO_HF, to_hf=True)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return self._convert(hf_state_dict, _FROM_HF, to_hf=False)

    def hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """`config.json` for `transformers.LlamaConfig`; `dtype` names the weights' dtype."""
        args = self.model_args
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden_dim,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads,
            "num_hidden_layers": args.n_layers,
            "head_dim": args.head_dim,
            "vocab_size": args.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": args.max_seq_len,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            **self._special_token_ids(),
        }
        if (scaling := args.rope_scaling) is not None:
            config["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": scaling.scaling_factor,
                "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings,
            }
        return config

    def _special_token_ids(self) -> dict[str, int | None]:
        """BOS/EOS ids from the assets' config.json, else tokenizer_config.json, else None."""
        ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None}
        folder = self.hf_assets_path or ""
        config_path = os.path.join(folder, "config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
            return {key: config.get(key) for key in ids}
        tokenizer_config_path = os.path.join(folder, "tokenizer_config.json")
        if os.path.isfile(tokenizer_config_path):
            with open(tokenizer_config_path) as f:
                config = json.load(f)
            by_content = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
            for key, token_key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")):
                token = config.get(token_key)
                token = token.get("content") if isinstance(token, dict) else token
                ids[key] = by_content.get(token)
        return ids
