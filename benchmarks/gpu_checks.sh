#!/usr/bin/env bash
# The GPU measurements of a session that is lent a GPU, as one prepared script (device time is
# short: every step has its own time limit, and a failing step does not stop the next).
#
#     bash benchmarks/gpu_checks.sh OUT_DIR [TORCH_REF]
#
# OUT_DIR gets env.txt (GPU, driver, versions), memory_fwd_bwd.{md,json} (JAX float32 and bfloat16
# side by side with the original release when TORCH_REF, a checkout of it, is given: latency, FLOPs,
# runtime peak memory of a training step, agreement of the outputs), throughput.{md,json} (the
# project's training step with Adam, bfloat16, 1 and 4 exams per device) and log.txt (progress and
# errors of every step). PYTHON picks the interpreter [python3], THREADS the CPU threads of each
# worker [4]; STEP_LIMIT_S sets every step's limit [240 s, 120 s].
# Results go to benchmarks/RESULTS.md with the card named (env.txt).
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [TORCH_REF]}
REF=${2:-}
PY=${PYTHON:-python3}
THREADS=${THREADS:-4}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -z "$REF" ] || REF=$(cd "$REF" && pwd) || exit 1
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
LOG="$OUT/log.txt"
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log start, end and exit status
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit} s): $*" >>"$LOG"
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s" >>"$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    lscpu | grep -E '^Model name|^CPU\(s\)'
    "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|numpy |torch |torchvision|nvidia-cudnn|grain)'
    "$PY" -c "import jax; print('jax devices:', jax.devices())"
} >"$OUT/env.txt" 2>&1

# gmic_jax.xla_flags adds an XLA:CPU flag to XLA_FLAGS; does this jaxlib still know it? (An
# unknown flag aborts the process.) Where it does not, keep XLA_FLAGS as given for the steps below.
if XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= "$PY" -c "import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready()" >>"$LOG" 2>&1; then
    echo "the project's XLA:CPU flag is accepted" >>"$OUT/env.txt"
else
    echo "the project's XLA:CPU flag is REJECTED by this jaxlib: GMIC_JAX_KEEP_XLA_FLAGS=1 below" >>"$OUT/env.txt"
    export GMIC_JAX_KEEP_XLA_FLAGS=1
fi

if [ -n "$REF" ] && ! (cd benchmarks && "$PY" -c "import sys; from torch_reference import load_original; load_original(sys.argv[1])" "$REF") >>"$LOG" 2>&1; then
    echo "the original release at $REF does not import here (log.txt): JAX alone below" >>"$OUT/env.txt"
    REF=
fi

step memory_fwd_bwd "${STEP_LIMIT_S:-240}" "$PY" benchmarks/memory_fwd_bwd.py --device gpu --dtype float32 bfloat16 \
    --n-runs 20 --threads "$THREADS" ${REF:+--torch-ref "$REF"} --json "$OUT/memory_fwd_bwd.json" \
    >"$OUT/memory_fwd_bwd.md" 2>>"$LOG"
for exams in 1 4; do
    step "throughput, $exams exam(s) per device" "${STEP_LIMIT_S:-120}" "$PY" benchmarks/throughput.py --device gpu \
        --devices 1 --per-device-exams "$exams" --dtype bfloat16 --steps 10 --threads "$THREADS" \
        --json "$OUT/throughput_b$exams.json" >"$OUT/throughput_b$exams.md" 2>>"$LOG"
done
echo "=== done" >>"$LOG"
