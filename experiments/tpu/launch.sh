#!/usr/bin/env bash
# Multi-host TPU training with jax.distributed and a data x expert mesh.
#
# Run the same command on every host of the slice (the TPU runtime tells jax.distributed
# the coordinator, the process count and each process's id):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command 'cd jmoe && pip install -e . && bash experiments/tpu/launch.sh'
# Preempted? Run it again: every host resumes from the last complete checkpoint.
#
#   bash experiments/tpu/launch.sh --dry-run   # on any machine, no TPU: the mesh plan, the
#                                              # sharded parameter shapes and per-device memory
# Settings: experiments/tpu/config.env (or CONFIG=path/to/other.env).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=/dev/null
source "${CONFIG:-$HERE/config.env}"
PY="${PYTHON:-python3}"

TRAIN=("$PY" -m jmoe.cli train --preset "$PRESET" --mesh "$MESH" --steps "$STEPS" --out "$OUT"
       --distributed --resume "${EXTRA[@]}")

# shellcheck source=../launch_common.sh
source "$HERE/../launch_common.sh"
jmoe_launch "$@"
