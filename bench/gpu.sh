#!/usr/bin/env bash
# Everything the GPU owes, on the device machine (its own torch/triton/transformers):
#     bash bench/gpu.sh build tests sweep        # one call: the stage limits add up to 570 s
#     bash bench/gpu.sh step                     # exgrpo:lora and trl-liger:lora (STEP_ARGS to change)
#     STEP_ARGS="--cases exgrpo:full trl-liger:full --steps 2" bash bench/gpu.sh step
#     bash bench/gpu.sh profile                  # torch.profiler top operators of the fused loss at N=16k
# (nsys is not on these machines' PATH; ncu is, see README "Profiling").
# Carry .whl (made by bench/fetch_wheels.sh) for TRL, Liger and torchao. Everything printed goes to
# $OUT/gpu.log, results (JSON, PNG) to $OUT ($OUT: the device tool's folder; else bench/results).
# Each stage has a time limit; a failing stage does not stop the next; the summary says which passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
STAGES=${*:-build tests sweep}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# torch takes CUDA_HOME to be nvcc's grandparent, wrong for a wrapper script: ask nvcc where it lives
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [ -n "$CUDA_HOME" ] && export CUDA_HOME=$(cd "$CUDA_HOME" && pwd -P)
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  # the carried peers and their dependencies, imported before any stage needs them (a mismatch shows here)
  python3 -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('pyarrow', 'fsspec', 'huggingface-hub', 'pandas', 'accelerate')))"
  python3 -c "import trl, liger_kernel, torchao, datasets, peft; print('trl', trl.__version__, 'torchao', torchao.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__)"
} 2>&1 | tee -a "$LOG"
declare -A RC
run() {  # run NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  RC[$name]=${PIPESTATUS[0]}
}
for s in $STAGES; do
  case $s in
    build) run build 120 env EXGRPO_BUILD_CUDA=1 MAX_JOBS=16 python3 setup.py build_ext --inplace ;;
    tests) run tests 240 python3 -m pytest tests -m gpu -q -p no:cacheprovider ;;
    sweep) run sweep 210 python3 bench/bench_lmhead.py --sweep --reps 5 --out "$OUT" ;;
    # shellcheck disable=SC2086
    # default: the two LoRA cases the targets compare, 2 measured steps (all six cases do not fit one call)
    step)  run step 570 python3 bench/step.py --out "$OUT" --model-dir /tmp/exgrpo-gemma7b-random \
             ${STEP_ARGS:---cases exgrpo:lora trl-liger:lora --steps 2} ;;
    profile) run profile 240 python3 bench/bench_lmhead.py --n 16384 --op loss --providers triton cuda liger --reps 3 \
             --profile --no-plot --out "$OUT" ;;
    *) echo "unknown stage $s" | tee -a "$LOG"; RC[$s]=2 ;;
  esac
done
echo "=== summary" | tee -a "$LOG"
for s in $STAGES; do echo "$s: rc=${RC[$s]:-?}" | tee -a "$LOG"; done
