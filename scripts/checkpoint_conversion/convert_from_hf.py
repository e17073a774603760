"""Convert Hugging Face safetensors to a model-only DCP checkpoint folder.

    python -m scripts.checkpoint_conversion.convert_from_hf assets/hf/Llama-3.1-8B outputs/llama8b_dcp \
        --model_name llama3 --model_flavor 8B

Start training from it with `--checkpoint.initial_load_path outputs/llama8b_dcp` (or skip the conversion
and load the safetensors directly with `--checkpoint.initial_load_in_hf`).
"""

import argparse
import sys

import torchtitan.builtins  # noqa: F401  (registers the built-in models)
from torchtitan.components.checkpoint_hf import convert_hf_to_dcp
from torchtitan.config import ConfigError
from torchtitan.tools.logging import init_logger, logger


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", help="folder with *.safetensors (and the tokenizer when the flavor needs it)")
    parser.add_argument("output_dir", help="DCP folder to create")
    parser.add_argument("--model_name", default="llama3", help="registered model name (default: llama3)")
    parser.add_argument("--model_flavor", required=True, help="flavor of the model, e.g. 8B or debugmodel")
    args = parser.parse_args(argv)
    init_logger()
    try:
        convert_hf_to_dcp(args.input_dir, args.output_dir, args.model_name, args.model_flavor)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info(f"Wrote the DCP checkpoint of {args.input_dir} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
