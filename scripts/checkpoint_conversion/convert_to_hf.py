"""Convert the model weights of a DCP checkpoint step folder to Hugging Face safetensors + config.json.

    python -m scripts.checkpoint_conversion.convert_to_hf outputs/checkpoint/step-1000 hf_out \
        --model_name llama3 --model_flavor 8B --hf_assets_path assets/hf/Llama-3.1-8B --export_dtype bfloat16

The output folder loads with `transformers.AutoModelForCausalLM.from_pretrained(hf_out)`; tokenizer files
found in --hf_assets_path are copied next to the weights.
"""

import argparse
import sys

from torchtitan.tools.utils import TORCH_DTYPES
import torchtitan.builtins  # noqa: F401  (registers the built-in models)
from torchtitan.components.checkpoint_hf import convert_dcp_to_hf
from torchtitan.config import ConfigError
from torchtitan.tools.logging import init_logger, logger


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", help="DCP step folder, e.g. outputs/checkpoint/step-1000")
    parser.add_argument("output_dir", help="folder to create with the Hugging Face files")
    parser.add_argument("--model_name", default="llama3", help="registered model name (default: llama3)")
    parser.add_argument("--model_flavor", required=True, help="flavor of the model, e.g. 8B or debugmodel")
    parser.add_argument("--hf_assets_path", default=None, help="tokenizer/config assets to copy and take ids from")
    parser.add_argument("--export_dtype", default="float32", choices=sorted(TORCH_DTYPES))
    args = parser.parse_args(argv)
    init_logger()
    try:
        convert_dcp_to_hf(
            args.input_dir, args.output_dir, args.model_name, args.model_flavor, args.hf_assets_path,
            TORCH_DTYPES[args.export_dtype],
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info(f"Wrote Hugging Face {args.export_dtype} weights of {args.input_dir} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
