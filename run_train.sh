#!/usr/bin/env bash
# Launch a training job on one node with torchrun.
#   CONFIG_FILE=./torchtitan/models/llama3/train_configs/llama3_8b.toml ./run_train.sh
#   NGPU=4 ./run_train.sh --parallelism.tensor_parallel_degree 2
# Without a GPU, NGPU processes run on the CPU over gloo.
set -euo pipefail

if [ -z "${NGPU:-}" ]; then
    NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
fi
LOG_RANK=${LOG_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-"./torchtitan/models/llama3/train_configs/debug_model.toml"}
TRAIN_FILE=${TRAIN_FILE:-"torchtitan.train"}
COMM_MODE=${COMM_MODE:-""}

if [ "$COMM_MODE" = "fake_backend" ]; then
    # Dry run: one process pretends to be NGPU ranks; validates the config and layout, trains nothing.
    exec env WORLD_SIZE="$NGPU" LOCAL_RANK=0 RANK=0 python -m "$TRAIN_FILE" \
        --job.config_file "$CONFIG_FILE" --comm.mode fake_backend "$@"
fi

exec python -m torchtitan.tools.launch --nproc_per_node "$NGPU" --rdzv_backend c10d --rdzv_endpoint localhost:0 \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m "$TRAIN_FILE" --job.config_file "$CONFIG_FILE" "$@"
