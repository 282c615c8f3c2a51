#!/usr/bin/env bash
# Prepare, on a machine with pip and no GPU, what benchmarks/gpu_checks.sh needs on a bare GPU machine:
# .whl/  wheels of the packages its image lacks (Python 3.12, x86-64 manylinux), one version each;
# .ref/GMIC  the original release's model code (src/) from a checkout of it, for --torch-ref.
# Both folders are ignored by git (.git/info/exclude) and travel with the device call's `carry`.
#
#     bash benchmarks/gpu_prepare.sh ORIGINAL_CHECKOUT
set -euo pipefail
REF=${1:?usage: bash benchmarks/gpu_prepare.sh ORIGINAL_CHECKOUT}
cd "$(dirname "$0")/.."
EXCLUDE=$(git rev-parse --git-common-dir)/info/exclude
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.whl/ /.ref/; do grep -qx "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >>"$EXCLUDE"; done
# What the image lacks, with the versions this repository is tested with (KINDS.md lists the image's).
WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
[ -f "$REF/src/modeling/gmic.py" ] || { echo "gpu_prepare: $REF/src/modeling/gmic.py not found" >&2; exit 1; }
rm -rf .ref/GMIC && mkdir -p .ref/GMIC && cp -r "$REF/src" .ref/GMIC/
du -sh .whl .ref
echo 'device call: carry [".whl", ".ref"], command: bash benchmarks/gpu_checks.sh $OUT .ref/GMIC'
