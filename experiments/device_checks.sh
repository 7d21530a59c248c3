#!/usr/bin/env bash
# The accelerator checks of the project, each part under its own time limit, in one command.
#
#   bash experiments/device_checks.sh [PART ...]      # default: kernels mfu
#
# Parts (seconds each, on one H100/H200):
#   kernels   bench_kernels.py at 8,192 tokens (autotuned) and 32,768: Pallas gmm vs a dense
#             matmul and ragged_dot, balanced and Zipf-skewed groups, forward and backward (~300)
#   mfu       bench_train_mfu.py: a whole training step of the base preset and its MFU (~120)
#   decode    bench_decode.py --gpu: Mixtral-shaped bf16 decoding, share of HBM bandwidth (~150)
#   offload   offload.py --gpu: experts in pinned host memory, half cached on the device (~120)
#   quant     bench_qgmm.py: the quantized grouped matmul (8/4/3 bits) vs bf16 gmm, decoding to
#             prefill sizes, and the 4-bit layer; then, where pytest is installed, the qgmm tests
#             on the compiled kernels (~120)
# The JSON each part writes goes to experiments/results/ and, where DEST (or the environment's
# OUT) names another folder, is copied there too. A part that fails or runs out of time is
# reported and the others still run; the exit status is 1 then.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
DEST="${DEST:-${OUT:-}}"
status=0

run() {  # run LIMIT SCRIPT ARGS...
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$PY" "$@"
    local rc=$?
    echo "== $1 finished with status $rc after $((SECONDS - t0))s"
    [[ $rc -eq 0 ]] || status=1
}

parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(kernels mfu)
for part in "${parts[@]}"; do  # every name checked before anything runs
    case "$part" in
        kernels | mfu | decode | offload | quant) ;;
        *) echo "device_checks.sh: unknown part '$part' (known: kernels mfu decode offload quant)" >&2; exit 2 ;;
    esac
done
STAMP="$(mktemp)"
for part in "${parts[@]}"; do
    case "$part" in
        kernels) run 200 experiments/bench_kernels.py --tokens 8192
                 run 150 experiments/bench_kernels.py --tokens 32768 --no-autotune ;;
        mfu) run 150 experiments/bench_train_mfu.py ;;
        decode) run 200 experiments/bench_decode.py --gpu ;;
        offload) run 150 experiments/offload.py --gpu ;;
        quant) run 150 experiments/bench_qgmm.py
               if "$PY" -c "import pytest" 2>/dev/null; then
                   JMOE_PALLAS_COMPILED=1 run 120 -m pytest -q -p no:cacheprovider tests/dispatch/pallas/test_qgmm.py
               fi ;;
    esac
done

if [[ -n "$DEST" ]]; then
    mkdir -p "$DEST"
    find experiments/results -maxdepth 1 -name '*.json' -newer "$STAMP" -exec cp {} "$DEST"/ \;
    echo "copied to $DEST: $(find experiments/results -maxdepth 1 -name '*.json' -newer "$STAMP" -printf '%f ')"
fi
rm -f "$STAMP"
exit $status
