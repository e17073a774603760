"""Pipeline parallelism for Llama 3: the generic stage splitting and scheduling with Llama's module names."""

from functools import partial

from torchtitan.distributed.pipeline_parallel import pipeline_model

# The embedding runs before the blocks in `layers`; the final norm and the output projection after them.
LLAMA_INPUT_MODULES = ("tok_embeddings",)
LLAMA_OUTPUT_MODULES = ("norm", "output")

pipeline_llama = partial(
    pipeline_model, input_modules=LLAMA_INPUT_MODULES, output_modules=LLAMA_OUTPUT_MODULES, layers_attr="layers"
)
pipeline_llama.__doc__ = "Split a (meta) Llama into this rank's pipeline stages; see `pipeline_model`."
