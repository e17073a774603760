"""Pipeline parallelism for the transformers modeling backend: the generic stage splitting and scheduling
with the Hugging Face module names (`model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`).
A tied `lm_head` on the last stage is a copy of the first stage's embedding, kept equal (TiedParameters)."""

from functools import partial

from torchtitan.distributed.pipeline_parallel import pipeline_model
from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import HF_MODULES

HF_INPUT_MODULES = (HF_MODULES.embeddings,)
HF_OUTPUT_MODULES = (HF_MODULES.final_norm, HF_MODULES.output)

pipeline_hf_transformers = partial(
    pipeline_model, input_modules=HF_INPUT_MODULES, output_modules=HF_OUTPUT_MODULES, layers_attr=HF_MODULES.blocks
)
pipeline_hf_transformers.__doc__ = "Split a (meta) HFTransformerModel into pipeline stages; see `pipeline_model`."
