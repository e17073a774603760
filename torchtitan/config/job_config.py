"""The job configuration schema: one dataclass per TOML section (`[section]` = `--section.field`).

Names, types and defaults follow torchtitan 0.2 so its TOML files load unchanged. Every field carries a
one-line description in `metadata["help"]`, which `--help` prints.
"""

from dataclasses import dataclass, field
from typing import Any, Literal


def opt(default: Any, doc: str) -> Any:
    """A dataclass field with a default (lists/dicts are copied per instance) and a help line."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


def section(cls: type, doc: str = "") -> Any:
    """A dataclass field holding a nested section, default-constructed."""
    return field(default_factory=cls, metadata={"help": doc})


@dataclass
class Job:
    config_file: str | None = opt(None, "TOML file with the job config (defaults < TOML < command line)")
    dump_folder: str = opt("./outputs", "Folder for checkpoints, metrics, traces and other outputs")
    description: str = opt("default job", "Free-text description of the job")
    print_config: bool = opt(False, "Print the resolved config as JSON at start-up")
    save_config_file: str | None = opt(None, "Write the resolved config to this file name under dump_folder")
    custom_config_module: str = opt("", "Python module whose JobConfig dataclass is merged into the base one")


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "Run torch.profiler and save traces")
    save_traces_folder: str = opt("profile_traces", "Trace folder, relative to dump_folder")
    profile_freq: int = opt(10, "Profile every N steps")
    profiler_active: int = opt(1, "Active steps per profiler cycle")
    profiler_warmup: int = opt(3, "Warm-up steps per profiler cycle")
    enable_memory_snapshot: bool = opt(False, "Record CUDA memory snapshots")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "Memory snapshot folder, relative to dump_folder")


@dataclass
class Metrics:
    log_freq: int = opt(10, "Log metrics every N steps")
    enable_tensorboard: bool = opt(False, "Write TensorBoard event files")
    disable_color_printing: bool = opt(False, "Print metrics without ANSI colors")
    save_tb_folder: str = opt("tb", "TensorBoard folder, relative to dump_folder")
    save_for_all_ranks: bool = opt(False, "Write metrics from every rank, not only the logging rank")
    enable_wandb: bool = opt(False, "Log metrics to Weights & Biases")
    cpu_peak_tflops: float | None = opt(
        None, "Peak TFLOPS of the CPU, used for MFU on CPU runs (our addition; not in torchtitan)"
    )


@dataclass
class Model:
    name: str = opt("llama3", "Registered model (TrainSpec) name")
    flavor: str = opt("debugmodel", "Model size/variant among the model's flavors")
    hf_assets_path: str = opt("./tests/assets/tokenizer", "Folder with tokenizer files and HF config/weights")
    converters: list[str] = opt([], "Model converters applied in order, e.g. quantize.linear.float8")
    print_after_conversion: bool = opt(False, "Print the model after the converters ran")


@dataclass
class Optimizer:
    name: Literal["Adam", "AdamW"] = opt("AdamW", "Optimizer class")
    lr: float = opt(8e-4, "Peak learning rate")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.1, "Decoupled weight decay")
    implementation: Literal["for-loop", "foreach", "fused"] = opt(
        "fused", "Optimizer kernel; falls back with a warning where fused is unavailable"
    )
    early_step_in_backward: bool = opt(False, "Step each parameter's optimizer in its backward hook")


@dataclass
class LRScheduler:
    warmup_steps: int = opt(200, "Linear warm-up steps (clamped to the run length)")
    total_steps: int | None = opt(None, "Steps the schedule spans; None means training.steps")
    decay_ratio: float | None = opt(None, "Fraction of steps spent decaying at the end; None decays after warm-up")
    decay_type: Literal["linear", "sqrt", "cosine"] = opt("linear", "Shape of the decay curve")
    min_lr_factor: float = opt(0.0, "Final learning rate as a fraction of optimizer.lr")


@dataclass
class DataLoader:
    num_workers: int = opt(0, "Data loading worker processes (0 loads in the main process)")
    persistent_workers: bool = opt(False, "Keep workers alive between epochs (needs num_workers > 0)")
    pin_memory: bool = opt(False, "Pin host memory for faster device copies")
    prefetch_factor: int | None = opt(None, "Batches prefetched per worker (needs num_workers > 0)")


@dataclass
class Training:
    dataset: str = opt("c4_test", "Registered training dataset name")
    dataset_path: str | None = opt(
        None, "Local path (data files, or a token folder from scripts/data/pretokenize.py) or HF id overriding the "
        "dataset's default location"
    )
    local_batch_size: int = opt(8, "Sequences per microbatch on each data-parallel rank")
    global_batch_size: int = opt(-1, "Sequences per step over all ranks (-1: local x dp); more means grad accumulation")
    seq_len: int = opt(2048, "Tokens per sequence")
    max_norm: float = opt(1.0, "Gradient clipping max norm")
    steps: int = opt(10000, "Training steps")
    enable_cpu_offload: bool = opt(False, "Offload FSDP parameters, gradients and optimizer state to CPU")
    dtype: Literal["bfloat16", "float32"] = opt("float32", "Parameter dtype when FSDP mixed precision is not used")
    mixed_precision_param: Literal["auto", "bfloat16", "float32"] = opt(
        "bfloat16",
        'FSDP/autocast compute dtype; "auto" picks at run time: bfloat16 on GPUs and on CPUs with native bf16 '
        "(AVX512-BF16/AMX), float32 on other CPUs (AVX2: bf16 autocast is many times slower there)",
    )
    mixed_precision_reduce: Literal["float32"] = opt("float32", "FSDP gradient reduce-scatter dtype")
    gc_freq: int = opt(50, "Run Python garbage collection every N steps")
    gc_debug: bool = opt(False, "Collect garbage every step to find leaks (slow)")
    shuffle_seed: int | None = opt(
        None,
        "Shuffle the windows of each pass over pretokenized token files with this seed (layout-independent); "
        "None keeps the data order (our addition; not in torchtitan)",
    )
    dataloader: DataLoader = section(DataLoader, "Data loader worker options")


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = opt(1, "Replicas for DDP/HSDP replication")
    enable_compiled_autograd: bool = opt(False, "Use compiled autograd (torch._dynamo) for the backward")
    data_parallel_shard_degree: int = opt(-1, "FSDP shard degree; -1 uses the remaining ranks")
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = opt(
        "default", "Free gathered FSDP params after forward (default: all but the last stage under PP)"
    )
    tensor_parallel_degree: int = opt(1, "Tensor parallel degree")
    disable_loss_parallel: bool = opt(False, "Gather logits instead of computing the loss on TP shards")
    disable_sequence_parallel: bool = opt(
        False, "TP without sequence parallel: replicated activations between layers (our addition)"
    )
    enable_async_tensor_parallel: bool = opt(False, "Overlap TP communication (needs compile)")
    pipeline_parallel_degree: int = opt(1, "Pipeline parallel degree")
    module_fqns_per_model_part: list[list[str]] | None = opt(None, "Explicit module FQNs of each pipeline stage")
    pipeline_parallel_first_stage_less_layers: int = opt(1, "Layers fewer on the first stage (embedding cost)")
    pipeline_parallel_last_stage_less_layers: int = opt(1, "Layers fewer on the last stage (output cost)")
    pipeline_parallel_layers_per_stage: int | None = opt(None, "Transformer layers per stage; None splits evenly")
    pipeline_parallel_schedule: str = opt("1F1B", "Pipeline schedule name (GPipe, 1F1B, Interleaved1F1B, ...)")
    pipeline_parallel_schedule_csv: str | None = opt("", "CSV file with a custom pipeline schedule")
    pipeline_parallel_microbatch_size: int = opt(1, "Sequences per pipeline microbatch")
    context_parallel_degree: int = opt(1, "Context (sequence) parallel degree")
    context_parallel_load_balancer: str | None = opt(
        "headtail", "CP sequence sharding: headtail (2 x cp chunks, rank i gets i and 2cp-1-i) or none (contiguous)"
    )
    context_parallel_rotate_method: Literal["allgather", "alltoall"] = opt(
        "allgather", "How torch_ring CP attention passes K/V between ranks"
    )
    context_parallel_attention: Literal["auto", "allgather_kv", "torch_ring"] = opt(
        "auto", "CP attention: allgather_kv (ours, any device), torch_ring (CUDA); auto picks torch_ring on "
        "CUDA, else allgather_kv (our addition)"
    )
    expert_parallel_degree: int = opt(1, "Expert parallel degree (MoE)")
    expert_tensor_parallel_degree: int = opt(1, "Tensor parallel degree inside experts (MoE)")


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save and load checkpoints")
    folder: str = opt("checkpoint", "Checkpoint folder, relative to dump_folder")
    interval: int = opt(500, "Save every N steps")
    initial_load_path: str | None = opt(None, "Checkpoint to start from when folder has none")
    initial_load_model_only: bool = opt(True, "Load only model weights from initial_load_path")
    initial_load_in_hf: bool = opt(False, "initial_load_path is in Hugging Face safetensors format")
    last_save_model_only: bool = opt(True, "Save only model weights at the last step")
    last_save_in_hf: bool = opt(False, "Save the last step in Hugging Face safetensors format")
    export_dtype: Literal["float16", "bfloat16", "float32"] = opt("float32", "Dtype of model-only saves")
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = opt("disabled", "Asynchronous saving mode")
    keep_latest_k: int = opt(10, "Keep the newest K checkpoints (0 keeps all; 1 is not allowed)")
    load_step: int = opt(-1, "Step to load; -1 loads the latest")
    exclude_from_loading: list[str] = opt([], "State keys not loaded, e.g. optimizer,lr_scheduler")
    enable_first_step_checkpoint: bool = opt(False, "Also save after step 1")
    create_seed_checkpoint: bool = opt(False, "Write the initialized model as step 0 and exit (single process)")
    load_only: bool = opt(False, "Load checkpoints but never save")


@dataclass
class ActivationCheckpoint:
    mode: Literal["selective", "full", "none"] = opt("selective", "Activation checkpointing mode")
    selective_ac_option: str = opt("2", "Selective AC: an integer N (every N-th block) or 'op' (op-level policy)")
    preserve_rng_state: bool = opt(True, "Restore RNG state when recomputing (exact dropout replay)")


@dataclass
class Compile:
    enable: bool = opt(False, "Apply torch.compile")
    components: list[Literal["model", "loss"]] = opt(["model", "loss"], "What to compile: model and/or loss")
    backend: str = opt("inductor", "torch.compile backend")


@dataclass
class Float8Linear:
    enable_fsdp_float8_all_gather: bool = opt(False, "All-gather FSDP weights in float8")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(False, "Compute float8 scales for all params at once")
    recipe_name: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] | None = opt(
        None, "torchao float8 recipe; None is tensorwise"
    )
    filter_fqns: list[str] = opt([], "Linear FQN substrings left in high precision")
    emulate: bool = opt(False, "Emulate float8 math (for hardware without float8 support)")


@dataclass
class MXLinear:
    mxfp8_dim1_cast_kernel_choice: Literal["triton", "cuda", "torch"] = opt("triton", "MX dim1 cast kernel")
    recipe_name: str = opt("mxfp8_cublas", "torchao MX recipe name")
    filter_fqns: list[str] = opt(["output"], "Linear FQN substrings left in high precision")


@dataclass
class QuantizeLinear:
    float8: Float8Linear = section(Float8Linear, "Float8 linear training (converter quantize.linear.float8)")
    mx: MXLinear = section(MXLinear, "MX linear training (converter quantize.linear.mx)")


@dataclass
class Float8GroupedMM:
    fqns: list[str] = opt([], "MoE module FQNs whose grouped GEMMs use float8")


@dataclass
class MXGroupedMM:
    recipe_name: str = opt("mxfp8", "torchao MX recipe for grouped GEMMs")
    fqns: list[str] = opt([], "MoE module FQNs whose grouped GEMMs use MX")


@dataclass
class QuantizeGroupedMM:
    float8: Float8GroupedMM = section(Float8GroupedMM, "Float8 grouped GEMMs (MoE)")
    mx: MXGroupedMM = section(MXGroupedMM, "MX grouped GEMMs (MoE)")


@dataclass
class Quantize:
    linear: QuantizeLinear = section(QuantizeLinear, "Low-precision linear layers")
    grouped_mm: QuantizeGroupedMM = section(QuantizeGroupedMM, "Low-precision MoE grouped GEMMs")


@dataclass
class Comm:
    init_timeout_seconds: int = opt(300, "Timeout for process group creation and the first step")
    train_timeout_seconds: int = opt(100, "Collective timeout after the first step")
    trace_buf_size: int = opt(20000, "NCCL flight recorder entries (0 disables)")
    save_traces_folder: str = opt("comm_traces", "Flight recorder dump folder, relative to dump_folder")
    mode: Literal["default", "fake_backend"] = opt("default", "fake_backend checks sharding with no real comms")


@dataclass
class MemoryEstimation:
    enable: bool = opt(False, "Estimate memory use before training")
    disable_fake_mode: bool = opt(False, "Estimate with real tensors instead of FakeTensorMode")


@dataclass
class FaultTolerance:
    enable: bool = opt(False, "Enable torchft fault tolerance")


@dataclass
class Experimental:
    custom_import: str = opt("", "Module imported at start-up, e.g. to register an out-of-tree model")


@dataclass
class Validation:
    enable: bool = opt(False, "Run validation")
    dataset: str = opt("c4_validation", "Registered validation dataset name")
    dataset_path: str | None = opt(
        None, "Local path (data files, or a token folder from scripts/data/pretokenize.py) or HF id overriding the "
        "dataset's default location"
    )
    local_batch_size: int = opt(8, "Validation sequences per batch on each data-parallel rank")
    seq_len: int = opt(2048, "Validation tokens per sequence")
    freq: int = opt(10, "Validate every N training steps")
    steps: int = opt(-1, "Validation batches per run; -1 runs until the dataset is exhausted")


@dataclass
class HFTransformers:
    model: str = opt(
        "", "Hugging Face model (hub id, resolved through the local HF cache when offline, or a local folder with "
        "config.json) trained with --model.name transformers_modeling_backend"
    )


@dataclass
class Debug:
    seed: int | None = opt(None, "Seed for every RNG; None leaves RNGs unseeded")
    deterministic: bool = opt(False, "Use deterministic algorithms")
    deterministic_warn_only: bool = opt(False, "Only warn when an op has no deterministic implementation")


@dataclass
class JobConfig:
    """The whole job: one attribute per TOML section."""

    job: Job = section(Job, "Job identity and outputs")
    profiling: Profiling = section(Profiling, "torch.profiler and memory snapshots")
    metrics: Metrics = section(Metrics, "Metric logging")
    model: Model = section(Model, "Model choice and converters")
    optimizer: Optimizer = section(Optimizer, "Optimizer")
    lr_scheduler: LRScheduler = section(LRScheduler, "Learning rate schedule: warm-up, stable, decay")
    training: Training = section(Training, "Data, batch and training loop")
    parallelism: Parallelism = section(Parallelism, "Parallelism degrees and options")
    checkpoint: Checkpoint = section(Checkpoint, "Distributed checkpointing")
    activation_checkpoint: ActivationCheckpoint = section(ActivationCheckpoint, "Activation checkpointing")
    compile: Compile = section(Compile, "torch.compile")
    quantize: Quantize = section(Quantize, "Low-precision training")
    comm: Comm = section(Comm, "Collective communication")
    memory_estimation: MemoryEstimation = section(MemoryEstimation, "Memory estimation")
    fault_tolerance: FaultTolerance = section(FaultTolerance, "Fault tolerance (torchft)")
    experimental: Experimental = section(Experimental, "Experimental options")
    validation: Validation = section(Validation, "Validation during training")
    hf_transformers: HFTransformers = section(HFTransformers, "Hugging Face transformers modeling backend")
    debug: Debug = section(Debug, "Seeds and determinism")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobConfig":
        """A validated JobConfig from nested dicts in the TOML schema, e.g. `{"training": {"steps": 5}}`;
        same checks and one-line ConfigErrors (with did-you-mean) as the command line."""
        from torchtitan.config.manager import ConfigManager

        return ConfigManager(cls).parse_dict(data)

    @classmethod
    def from_toml(cls, path: str) -> "JobConfig":
        """A validated JobConfig from a TOML file, exactly as `--job.config_file path` would give."""
        from torchtitan.config.manager import ConfigManager

        return ConfigManager(cls).parse_args(["--job.config_file", str(path)])
