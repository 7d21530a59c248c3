#!/usr/bin/env bash
# Multi-node GPU training with jax.distributed and a data x expert mesh, one process per node.
#
# Under SLURM (jax.distributed reads the coordinator and process ids from SLURM's environment):
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --wrap 'srun bash experiments/gpu/launch.sh'
# Without SLURM, start one process per node with the coordinator's address:
#   COORDINATOR=node0:1234 NUM_PROCESSES=2 PROCESS_ID=<0|1> bash experiments/gpu/launch.sh
# Re-running resumes from the last complete checkpoint.
#
#   bash experiments/gpu/launch.sh --dry-run   # on any machine, no GPU: the mesh plan, the
#                                              # sharded parameter shapes and per-device memory
# Settings: experiments/gpu/config.env (or CONFIG=path/to/other.env).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=/dev/null
source "${CONFIG:-$HERE/config.env}"
PY="${PYTHON:-python3}"

if [[ -n "${COORDINATOR:-}" ]]; then
    RUNTIME=(--coordinator "$COORDINATOR" --num-processes "$NUM_PROCESSES" --process-id "$PROCESS_ID")
else
    RUNTIME=(--distributed)
fi
TRAIN=("$PY" -m jmoe.cli train --preset "$PRESET" --mesh "$MESH" --steps "$STEPS" --out "$OUT"
       "${RUNTIME[@]}" --resume "${EXTRA[@]}")

# XLA flags that help MoE all-to-alls overlap with compute on GPU
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
# shellcheck source=../launch_common.sh
source "$HERE/../launch_common.sh"
jmoe_launch "$@"
