#!/usr/bin/env bash
# The GPU check of issues 20 and 21, in one run: the environment, the CUDA tests and the GPU
# benchmarks.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh      (from anywhere in a copy of the repo)
#
# Everything it writes goes under "$OUT" (default: ./gpu_check_out), eight files at most:
#   env.log                  python, torch, CUDA, the GPU (nvidia-smi)
#   pytest_cuda.log          every CUDA test of the suite (pytest -k "cuda or gpu": each test that
#                            needs CUDA has one of the two words in its name, which
#                            tests/test_gpu_check.py checks): CUDA graphs of a SAM step, the
#                            device-side skip, the training loop's captured steps, ...
#   bench_gpu.log/.json      the contenders' table: ms/step, syncs/step, kernels/step, targets
#   bench_cifar_gpu.log      the CIFAR training loop: old loop against train(), fp32/bf16,
#                            eager/CUDA graphs, GPU busy %
#   bench_instruments.log    issue 20's instruments against PyHessian on the GPU (where PyHessian
#                            is importable; loss-landscapes is not needed)
#   bench_graphs.log         the CUDA-graph gain (eager, graph replay, torch.compile)
#   summary.txt              each part's exit status and duration (also printed at the end)
#
# It needs a python with torch built for CUDA (PYTHON=..., default python3) and pytest; torchsam
# is taken from ./src (no install). Nothing is downloaded: where torch is missing or sees no GPU
# it says so and stops. Each part runs under `timeout`, sized so that the whole run ends within
# BUDGET seconds (default 540, 9 minutes); a part that fails or runs out of time does not
# stop the next one, and every part prints each result as soon as it has it, so that its log
# keeps what was measured before a timeout. The exit status is 0 when every part passed, 1
# otherwise.
set -u

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
BUDGET="${BUDGET:-540}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)
STATUS=0
: >"$OUT/summary.txt"

# run NAME LIMIT COMMAND...: COMMAND under `timeout`, its output in $OUT/NAME.log; LIMIT is
# cut to what is left of BUDGET (with 10 s kept for the summary).
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 10))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 15)); then
        echo "$name: not run (no time left in the ${BUDGET} s budget)" | tee -a "$OUT/summary.txt"
        STATUS=1
        return
    fi
    echo "=== $name (at most ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 30 "$OUT/$name.log"
    local verdict="ok"
    if ((rc == 124 || rc == 137)); then
        verdict="TIMED OUT"
    elif ((rc != 0)); then
        verdict="FAILED"
    fi
    if ((rc != 0)); then STATUS=1; fi
    echo "$name: $verdict (exit $rc, $(($(date +%s) - t0)) s)" | tee -a "$OUT/summary.txt"
}

# 1. the environment; stop here without torch or without a GPU (nothing can be installed)
{
    date -u
    uname -a
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" -c "import sys; print('python', sys.version)"
    "$PYTHON" -m pytest --version
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available', torch.cuda.is_available()); print('GPU', torch.cuda.get_device_name()); \
print('cuDNN', torch.backends.cudnn.version())"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    >/dev/null 2>&1; then
    echo "env: torch with CUDA is not importable by $PYTHON (see env.log); install a CUDA" \
        "build of torch first (offline: carry its wheel), then run this again" |
        tee -a "$OUT/summary.txt"
    exit 1
fi
echo "env: ok" >>"$OUT/summary.txt"

# 2. every CUDA test of the suite (tests that need no GPU ran in CI; the few CPU tests whose
#    names also say cuda or gpu take seconds); -v names each test as it ends, so that a
#    timeout keeps the verdicts so far
run pytest_cuda 130 "$PYTHON" -m pytest -v -p no:cacheprovider -rs -k "cuda or gpu" \
    --continue-on-collection-errors tests

# 3. the contenders' table (the issue's set-up: ResNet-18, batch 512, 5 + 30 steps, 2 rounds)
run bench_gpu 120 "$PYTHON" benchmarks/bench_gpu.py --part table --rounds 2 \
    --json "$OUT/bench_gpu.json"

# 4. the CIFAR training loop (issue 21)
run bench_cifar_gpu 120 "$PYTHON" benchmarks/bench_cifar_gpu.py

# 5. issue 20's instruments against PyHessian (a pure-Python package: put its folder on
#    PYTHONPATH to carry it); --short needs PyHessian's hessian (and numpy, which it imports),
#    not loss-landscapes: the same import as the script's
if "$PYTHON" -c "from pyhessian import hessian" >/dev/null 2>&1; then
    run bench_instruments 45 "$PYTHON" benchmarks/bench_instruments.py --short --device cuda
else
    echo "bench_instruments: not run (from pyhessian import hessian fails)" |
        tee -a "$OUT/summary.txt"
fi

# 6. the CUDA-graph gain: a cold torch.compile(mode="reduce-overhead") compiles the model
#    twice (the second pass, with BatchNorm's statistics frozen, recompiles), hence much time
#    for little measuring: this last part gets what is left of the budget (at least about
#    100 s when every part before ran to its limit); the eager and graph numbers are printed
#    before it compiles
run bench_graphs 150 "$PYTHON" benchmarks/bench_gpu.py --part graphs

echo "=== summary (total $(($(date +%s) - START)) s of a ${BUDGET} s budget; files in $OUT)"
cat "$OUT/summary.txt"
exit "$STATUS"
