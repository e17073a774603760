"""Generate text from a checkpoint (a DCP step folder or a Hugging Face safetensors folder).

    python scripts/generate/generate.py --job.config_file torchtitan/models/llama3/train_configs/debug_model.toml \
        --checkpoint outputs/checkpoint/step-10 --prompt "ROMEO:" --max_new_tokens 50 [--temperature 0 --top_k K --seed S]
    NGPU=2 torchrun --nproc_per_node 2 scripts/generate/generate.py ... (tensor parallel over the ranks)

The model and tokenizer come from the job config (`model.*`, plus any `--section.field` override); the
weights from `--checkpoint`. Temperature 0 is greedy decoding. Under torchrun the model is tensor-parallel over
all ranks. Each new token re-runs the whole sequence (no KV cache): fine for short continuations.
"""

import argparse
import os
import sys

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

import torchtitan.builtins  # noqa: F401  (registers the built-in models)
from torchtitan.components.checkpoint_hf import load_hf
from torchtitan.components.checkpoint_storage import TRAINING_STATES, Comm, load_dcp
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import ConfigError, ConfigManager, JobConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.parallel_dims import ParallelDims, validate_model
from torchtitan.protocols.train_spec import build_meta_model, get_train_spec
from torchtitan.tools.logging import init_logger, logger


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, JobConfig]:
    """The generation options, and the job config built from everything else (`--job.config_file` etc.)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="DCP step folder or Hugging Face safetensors folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the K most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    args, rest = parser.parse_known_args(argv)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens={args.max_new_tokens} is invalid; fix: use a value >= 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature} is invalid; fix: use 0 (greedy) or a value > 0")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top_k={args.top_k} is invalid; fix: use a value >= 1 or leave it out")
    return args, ConfigManager().parse_args(rest)


def _for_inference(job_config: JobConfig, world_size: int) -> None:
    """Tensor parallel over every rank with replicated activations and logits; nothing for training."""
    p = job_config.parallelism
    p.tensor_parallel_degree, p.data_parallel_shard_degree, p.data_parallel_replicate_degree = world_size, 1, 1
    p.disable_sequence_parallel = p.disable_loss_parallel = True
    job_config.activation_checkpoint.mode = "none"
    job_config.compile.enable = False
    job_config.model.converters = []


def _read_weights(folder: str, template: dict[str, torch.Tensor], spec, args) -> dict[str, torch.Tensor]:
    """Every model weight of the checkpoint, as full plain tensors shaped like `template` (on this rank)."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--checkpoint {folder} does not exist; give a DCP step folder or a Hugging Face folder")
    if any(name.endswith(".safetensors") for name in os.listdir(folder)):
        if spec.state_dict_adapter is None:
            raise ConfigError(f"--checkpoint {folder} is a Hugging Face folder, but this model has no HF adapter")
        return load_hf(folder, template, spec.state_dict_adapter(args, folder), Comm(None))
    load_dcp(folder, template, Comm(None), set(template), TRAINING_STATES)
    return template


def load_model(
    job_config: JobConfig,
    checkpoint: str,
    device: torch.device,
    parallel_dims: ParallelDims,
    tokenizer: BaseTokenizer,
    min_seq_len: int = 0,
) -> nn.Module:
    """The model of the job config with the checkpoint's weights, in eval mode (tensor-parallel when
    `parallel_dims` says so). Its context covers `min_seq_len` tokens even when the job's seq_len is shorter."""
    spec = get_train_spec(job_config.model.name)
    job_config.training.seq_len = max(job_config.training.seq_len, min_seq_len)
    args, model = build_meta_model(spec, job_config, tokenizer)
    validate_model(parallel_dims, args, job_config)
    template = {k: torch.empty(v.shape, dtype=torch.float32) for k, v in model.state_dict().items()}
    weights = _read_weights(checkpoint, template, spec, args)
    if parallel_dims.tp_enabled:
        model = spec.parallelize_fn(model, parallel_dims, job_config)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    return model.eval()


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """The new token ids after `prompt` (stopping after `eos_id`, which is included). Greedy at temperature 0;
    otherwise sampled from softmax(logits / temperature), restricted to the `top_k` best when given."""
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens)[0, -1]
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        logits = logits.float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
        new.append(token)
        if token == eos_id:
            break
        tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)
    return new


def main(argv: list[str] | None = None) -> int:
    """Print the prompt and its continuation (rank 0); a config or input problem exits 2 with one line."""
    init_logger()
    clean = False
    try:
        args, job_config = parse_args(argv)
        device = dist_utils.init_distributed(job_config.comm)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        _for_inference(job_config, world_size)
        pd = ParallelDims.from_job_config(job_config, world_size)
        tokenizer = get_train_spec(job_config.model.name).build_tokenizer_fn(job_config)
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
        model = load_model(job_config, args.checkpoint, device, pd, tokenizer, len(prompt) + args.max_new_tokens)
        new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                       tokenizer.eos_id, device)
        clean = True
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_utils.shutdown(clean)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info(f"generated {len(new)} tokens from a {len(prompt)}-token prompt")
        print(args.prompt + tokenizer.decode(new), flush=True)
    return 0


if __name__ == "__main__":
    dist_utils.exit_process(main())
