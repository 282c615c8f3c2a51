#!/usr/bin/env bash
# The GPU measurements of a session that is lent a GPU, as one prepared script (device time is
# short: every step has its own time limit, and a failing step does not stop the next).
#
#     bash benchmarks/gpu_checks.sh OUT_DIR [TORCH_REF]
#
# Steps (STEPS picks some, in this order; default all):
#   side_by_side  memory_fwd_bwd.py, JAX float32 and bfloat16 beside the original release (TORCH_REF,
#                 a checkout of it) at the backend's default precision (TF32 convolutions on GPU):
#                 latency, FLOPs, runtime peak memory of a training step, agreement of the outputs
#   highest       the same in full float32 (--precision highest) for JAX float32 and the original
#   throughput    throughput.py: the project's training step with Adam, bfloat16, 1 and 4 exams/device
#   kernels       memory_fwd_bwd.py, bfloat16, remat global_stem: with XLA's ops, then
#                 with the CPU rewrites forced (gmic_jax.models.fast_ops)
#   bn_variance   batchnorm_variance.py: the training step (bfloat16, one exam) with BatchNorm's
#                 two-pass batch variance against the one-pass formula (step time, bytes)
#   window_noise  window_noise_device.py: the training step (bfloat16, one exam) fed the window-noise
#                 regions, cropped and resized on the device, against the step fed finished windows
#   train_e2e     train_e2e.py: the real `gmic-jax train` loop (Grain, window-noise cache, Orbax
#                 checkpoints) at 2944 x 1920, bfloat16, remat none, 1, 2 and 4 exams/device, 10 timed
#                 steps each: exams/s, step time, loader wait, compile, peak memory (own limit
#                 E2E_LIMIT_S [480 s]: three fresh processes, each compiling its step)
# OUT_DIR gets env.txt (GPU, driver, versions), tables.md (every step's table), one JSON per step
# and log.txt (progress and errors). PYTHON picks the interpreter [python3], THREADS the CPU threads
# of each worker [4]; STEP_LIMIT_S sets every step's time limit [240 s]. Results go to
# benchmarks/RESULTS.md with the card named (env.txt). The first five steps write 10 files and take
# ~10 minutes on an H200 (compiles included; window_noise and train_e2e not yet measured there: 1 file
# each, estimated 1-2 and 4-8 minutes); the workplace's device tool returns 8 files a call: pick STEPS.
# DEVICE [gpu] and E2E_ARGS (words appended to train_e2e.py's arguments) rehearse train_e2e on CPU:
#     DEVICE=cpu STEPS=train_e2e E2E_ARGS="--window 128 96 --config configs/synthetic_tiny.py \
#         --config.model.crop_shape=(32,32) --config.model.K=2 --steps 2" bash benchmarks/gpu_checks.sh /tmp/r
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [TORCH_REF]}
REF=${2:-}
PY=${PYTHON:-python3}
THREADS=${THREADS:-4}
STEPS=${STEPS:-side_by_side highest throughput kernels bn_variance window_noise train_e2e}
DEVICE=${DEVICE:-gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -z "$REF" ] || REF=$(cd "$REF" && pwd) || exit 1
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
LOG="$OUT/log.txt"
TABLES="$OUT/tables.md"
step() {  # step NAME COMMAND...: run under the time limit; its table goes to tables.md
    local name=$1; shift
    local t0=$SECONDS
    echo "=== $name (limit ${STEP_LIMIT_S:-240} s): $*" >>"$LOG"
    printf '\n## %s\n\n`%s`\n\n' "$name" "$*" >>"$TABLES"
    timeout "${STEP_LIMIT_S:-240}" "$@" >>"$TABLES" 2>>"$LOG"
    echo "=== $name: exit $? after $((SECONDS - t0)) s" >>"$LOG"
}
wanted() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

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

MFB=("$PY" benchmarks/memory_fwd_bwd.py --device gpu --threads "$THREADS" --n-runs 20)
wanted side_by_side && step side_by_side "${MFB[@]}" --dtype float32 bfloat16 ${REF:+--torch-ref "$REF"} \
    --json "$OUT/side_by_side.json"
wanted highest && step highest "${MFB[@]}" --dtype float32 --precision highest ${REF:+--torch-ref "$REF"} \
    --json "$OUT/highest.json"
if wanted throughput; then
    for exams in 1 4; do  # the input rate once: rendering full-size synthetic exams is slow (--help)
        step "throughput_b$exams" "$PY" benchmarks/throughput.py --device gpu --devices 1 --per-device-exams "$exams" \
            --dtype bfloat16 --steps 10 --threads "$THREADS" --input-batches $((exams == 1)) \
            --json "$OUT/throughput_b$exams.json"
    done
fi
if wanted kernels; then
    step kernels_xla "${MFB[@]}" --dtype bfloat16 --remat global_stem --json "$OUT/kernels_xla.json"
    step kernels_cpu "${MFB[@]}" --dtype bfloat16 --remat global_stem --kernels cpu --json "$OUT/kernels_cpu.json"
fi
wanted bn_variance && step bn_variance "$PY" benchmarks/batchnorm_variance.py --image-shape 2944 1920 --batch 4 \
    --dtype bfloat16 --steps 20 --json "$OUT/bn_variance.json"
wanted window_noise && step window_noise "$PY" benchmarks/window_noise_device.py --image-shape 2944 1920 --batch 4 \
    --dtype bfloat16 --steps 20 --json "$OUT/window_noise.json"
# E2E_ARGS is split into words on purpose (extra options for a rehearsal).
# shellcheck disable=SC2086
wanted train_e2e && STEP_LIMIT_S=${E2E_LIMIT_S:-480} step train_e2e "$PY" benchmarks/train_e2e.py --device "$DEVICE" \
    --dtype bfloat16 --exams-per-device 1 2 4 --remat none --steps 10 --checkpoint-every 5 \
    --threads "$THREADS" ${E2E_ARGS:-} --json "$OUT/train_e2e.json"
echo "=== done" >>"$LOG"
