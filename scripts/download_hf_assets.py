"""Download a Hugging Face model's assets (tokenizer, config, weights) for training and conversion.

    python scripts/download_hf_assets.py --repo_id meta-llama/Llama-3.1-8B --assets tokenizer config \
        --hf_token hf_...

Files land in LOCAL_DIR/<model name> (default assets/hf/Llama-3.1-8B), the folder to pass as
--model.hf_assets_path (and, with --assets safetensors index, as the --checkpoint.initial_load_path of
an --checkpoint.initial_load_in_hf run). Gated models (Llama) need an accepted license and a token
(--hf_token or the HF_TOKEN environment variable).
"""

import argparse
import os
import sys

ASSET_PATTERNS = {
    "tokenizer": [
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ],
    "config": ["config.json", "generation_config.json"],
    "safetensors": ["*.safetensors"],
    "index": ["model.safetensors.index.json"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", required=True, help="Hugging Face repository, e.g. meta-llama/Llama-3.1-8B")
    parser.add_argument(
        "--assets", nargs="+", required=True, choices=sorted(ASSET_PATTERNS), help="which kinds of files to fetch"
    )
    parser.add_argument("--hf_token", default=None, help="access token for gated or private repositories")
    parser.add_argument("--local_dir", default="assets/hf/", help="parent folder of the download (default assets/hf/)")
    return parser.parse_args(argv)


def patterns_for(assets: list[str]) -> list[str]:
    """The file patterns of the requested asset kinds, in order, without repeats."""
    return list(dict.fromkeys(p for asset in assets for p in ASSET_PATTERNS[asset]))


def download(repo_id: str, assets: list[str], local_dir: str, token: str | None) -> str:
    """Fetch the files of `assets` from `repo_id` into local_dir/<model name>; returns that folder.

    Raises RuntimeError with a one-line reason when the hub cannot serve them.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    target = os.path.join(local_dir, repo_id.split("/")[-1])
    try:
        snapshot_download(repo_id, local_dir=target, allow_patterns=patterns_for(assets), token=token)
    except GatedRepoError as e:
        raise RuntimeError(
            f"{repo_id} is gated: accept its license on huggingface.co and pass --hf_token (or set HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise RuntimeError(f"{repo_id} does not exist or is private: check --repo_id, or pass --hf_token") from e
    except LocalEntryNotFoundError as e:
        reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable from here"
        raise RuntimeError(
            f"cannot download {repo_id} ({reason}): connect to huggingface.co (unset HF_HUB_OFFLINE) and retry"
        ) from e
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = download(args.repo_id, args.assets, args.local_dir, args.hf_token)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(os.path.relpath(os.path.join(r, f), target) for r, _, fs in os.walk(target) for f in fs)
    files = [f for f in files if not f.startswith(".cache")]
    print(f"Downloaded {', '.join(args.assets)} of {args.repo_id} to {target}: {', '.join(files) or 'no files'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
