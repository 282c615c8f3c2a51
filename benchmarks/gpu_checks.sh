#!/usr/bin/env bash
# The GPU measurements of a session that is lent a GPU, as one prepared script (device time is
# short: every step has its own time limit, and a failing step does not stop the next).
#
#     bash benchmarks/gpu_prepare.sh ORIGINAL_CHECKOUT      # here, once: wheels + the original's model
#     bash benchmarks/gpu_checks.sh OUT_DIR [TORCH_REF]     # on the GPU machine (TORCH_REF: .ref/GMIC)
#
# Default steps (STEPS picks others, in this order), sized to fit 8 minutes of GPU time together
# and to write 7 files (env.txt, log.txt, tables.md and one JSON per step):
#   peers      memory_fwd_bwd.py: JAX bfloat16 and float32 beside the original (float32, TF32 convolutions,
#              as PyTorch runs by default) and the PyTorch a user would run (PEERS, bfloat16 autocast,
#              channels_last, torch.compile): latency, runtime peak memory, agreement    [limit 180 s]
#   roofline   kernel_times.py: one traced training step (bfloat16, Adam), every kernel's measured
#              time beside its roofline bound from the card's peaks (roofline.py)            [60 s]
#   e2e        train_e2e.py: the real `gmic-jax train` loop at 2944 x 1920, bfloat16, E2E_EXAMS exams per
#              device [1 4], 10 timed steps each, each in a fresh process (own compile)      [150 s]
#   compile    compile_time.py: the training step compiled cold into an empty cache, then in fresh
#              processes warm (cache hit), as a serialised executable, and cold with XLA's
#              autotuning results cached                                                     [90 s]
# More steps, each adding files and minutes (STEPS="side_by_side highest ..."):
#   side_by_side / highest   JAX float32 + bfloat16 against the original alone, default / full float32
#   throughput   throughput.py, the training step with Adam, bfloat16, 1 and 4 exams/device
#   kernels      memory_fwd_bwd.py, bfloat16, remat global_stem, XLA's ops then the CPU rewrites
#   batchnorm    batchnorm_variants.py: the model's BatchNorm against flax's (two-pass, one-pass)
#   window_noise window_noise_device.py, the step fed window-noise regions against finished windows
#
# Packages the GPU image lacks (grain, ml_collections, tensorboardX, ...) travel as wheels in .whl/
# (benchmarks/gpu_prepare.sh); they are installed into /tmp/gmic-site when .whl/ is there. The
# device tool's call: carry [".whl", ".ref"], command `bash benchmarks/gpu_checks.sh $OUT .ref/GMIC`.
# PYTHON picks the interpreter [python3], THREADS the CPU threads of each worker [4]; <STEP>_LIMIT_S
# overrides a step's limit (PEERS_LIMIT_S, ...), STEP_LIMIT_S the limit of the extra steps [240 s].
#
# Rehearsal on CPU (every step at a small size, a few minutes; what a session without a GPU runs
# before a lent GPU's minutes are spent on it): REHEARSE=1 bash benchmarks/gpu_checks.sh /tmp/rehearsal
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [TORCH_REF]}
REF=${2:-}
PY=${PYTHON:-python3}
THREADS=${THREADS:-4}
STEPS=${STEPS:-peers roofline e2e compile}
PEERS=${PEERS:-torch_bf16 torch_channels_last torch_bf16_channels_last torch_compile_bf16_channels_last}
E2E_EXAMS=${E2E_EXAMS:-1 4}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -z "$REF" ] || REF=$(cd "$REF" && pwd) || exit 1
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
REPO=$(pwd)
LOG="$OUT/log.txt"
TABLES="$OUT/tables.md"
if [ "${REHEARSE:-0}" = 1 ]; then
    DEVICE=cpu
    THREADS=${THREADS_REHEARSE:-2}
    SIZE=(--image-shape 256 192 --crop-shape 96 96 --K 2 --percent-t 0.1)
    E2E_SIZE=(--window 128 96 --config configs/synthetic_tiny.py "--config.model.crop_shape=(32,32)"
        --config.model.K=2 --steps 2 --checkpoint-every 2)
    RUNS=2
    AUTOTUNED=  # XLA:CPU does not autotune
else
    DEVICE=gpu
    SIZE=()
    E2E_SIZE=(--steps 10 --checkpoint-every 5)
    RUNS=10
    AUTOTUNED=autotuned
fi
step() {  # step NAME LIMIT_S COMMAND...: run under its time limit; its table goes to tables.md
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit $limit s): $*" >>"$LOG"
    printf '\n## %s\n\n`%s`\n\n' "$name" "$*" >>"$TABLES"
    timeout "$limit" "$@" >>"$TABLES" 2>>"$LOG"
    echo "=== $name: exit $? after $((SECONDS - t0)) s" >>"$LOG"
}
wanted() { case " $STEPS " in *" $1 "*) return 0;; *) return 1;; esac; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gmic-site \
        .whl/*.whl >>"$LOG" 2>&1 || echo "installing .whl/ failed (log.txt)" >>"$LOG"
    export PYTHONPATH=/tmp/gmic-site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
{
    date -u
    echo "device: $DEVICE; steps: $STEPS"
    [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    lscpu | grep -E '^Model name|^CPU\(s\)|^CPU family|^Model:'
    "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|numpy |torch |torchvision|nvidia-cudnn|grain|ml.collections)'
    "$PY" -c "import jax, grain, ml_collections; print('jax devices:', jax.devices())"
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

MFB=("$PY" benchmarks/memory_fwd_bwd.py --device "$DEVICE" --threads "$THREADS" --n-runs "$RUNS" "${SIZE[@]}")
# PEERS is split into words on purpose (a list of names).
# shellcheck disable=SC2086
wanted peers && step peers "${PEERS_LIMIT_S:-180}" "${MFB[@]}" --dtype bfloat16 float32 \
    ${REF:+--torch-ref "$REF" --torch-peers $PEERS} --json "$OUT/peers.json"
wanted roofline && step roofline "${ROOFLINE_LIMIT_S:-60}" "$PY" benchmarks/kernel_times.py --device "$DEVICE" \
    --dtype bfloat16 --threads "$THREADS" "${SIZE[@]}" --json "$OUT/roofline.json"
# E2E_EXAMS is split into words on purpose (a list of numbers).
# shellcheck disable=SC2086
wanted e2e && step e2e "${E2E_LIMIT_S:-150}" "$PY" benchmarks/train_e2e.py --device "$DEVICE" --dtype bfloat16 \
    --exams-per-device $E2E_EXAMS --remat none --threads "$THREADS" "${E2E_SIZE[@]}" --json "$OUT/e2e.json"
# AUTOTUNED is empty or one word on purpose.
# shellcheck disable=SC2086
wanted compile && step compile "${COMPILE_LIMIT_S:-90}" "$PY" benchmarks/compile_time.py --device "$DEVICE" \
    --rounds 1 --dtype bfloat16 --threads "$THREADS" --kinds miss hit serialised $AUTOTUNED "${SIZE[@]}" \
    --json "$OUT/compile.json"

EXTRA=${STEP_LIMIT_S:-240}
wanted side_by_side && step side_by_side "$EXTRA" "${MFB[@]}" --dtype float32 bfloat16 ${REF:+--torch-ref "$REF" --torch-peers none} \
    --json "$OUT/side_by_side.json"
wanted highest && step highest "$EXTRA" "${MFB[@]}" --dtype float32 --precision highest ${REF:+--torch-ref "$REF" --torch-peers none} \
    --json "$OUT/highest.json"
if wanted throughput; then
    for exams in 1 4; do  # the input rate once: rendering full-size synthetic exams is slow (--help)
        step "throughput_b$exams" "$EXTRA" "$PY" benchmarks/throughput.py --device "$DEVICE" --devices 1 \
            --per-device-exams "$exams" --dtype bfloat16 --steps 10 --threads "$THREADS" "${SIZE[@]:0:6}" \
            --input-batches $((exams == 1)) --json "$OUT/throughput_b$exams.json"
    done
fi
if wanted kernels; then
    step kernels_xla "$EXTRA" "${MFB[@]}" --dtype bfloat16 --remat global_stem --json "$OUT/kernels_xla.json"
    step kernels_cpu "$EXTRA" "${MFB[@]}" --dtype bfloat16 --remat global_stem --kernels cpu --json "$OUT/kernels_cpu.json"
fi
wanted batchnorm && step batchnorm "$EXTRA" "$PY" benchmarks/batchnorm_variants.py --image-shape 2944 1920 \
    --batch 4 --dtype bfloat16 --steps 20 --json "$OUT/batchnorm.json"
wanted window_noise && step window_noise "$EXTRA" "$PY" benchmarks/window_noise_device.py --image-shape 2944 1920 \
    --batch 4 --dtype bfloat16 --steps 20 --json "$OUT/window_noise.json"
echo "=== done" >>"$LOG"
