#!/usr/bin/env bash
# The GPU check (issue 32, benchmarks/gpu_check.py) on a machine without network:
#   srun --gres=gpu:1 bash benchmarks/gpu_check.sh     # a cluster node with one GPU, from the tree's root
#   bash benchmarks/gpu_check.sh --dry-run             # anywhere: the GPU plan printed, every step run small on the CPU
# Needs python3 with a CUDA torch, numpy, scipy, scikit-image, h5py, PyYAML, tqdm, matplotlib, einops
# and imageio, and the folder .gpu-wheels/ that `make gpu-wheels` fills where there is network
# (carried with the tree). Installs those wheels and medvol from this tree (no index, no
# dependencies) into a scratch site folder, puts it on PYTHONPATH, then runs gpu_check.py with
# the arguments given: one table on stdout, gpu_check.json in $OUT when set, else here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${MEDVOL_GPU_SITE:-/tmp/medvol_gpu_site}
WHEELS=.gpu-wheels
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: no wheels in $WHEELS/; run 'make gpu-wheels' where there is network and carry the folder" >&2
    exit 2
fi
t0=$(date +%s)
rm -rf "$SITE"
mkdir -p "$SITE"
"$PY" -m pip install -q --no-compile --no-index --no-deps --target "$SITE" "$WHEELS"/*-none-any.whl
for w in "$WHEELS"/*.whl; do  # compiled wheels (isal: optional) are built for CPython 3.12: each on its own
    case "$w" in *-none-any.whl) continue ;; esac
    "$PY" -m pip install -q --no-compile --no-index --no-deps --target "$SITE" "$w" 2>/dev/null \
        || echo "skipped $(basename "$w"): not for $("$PY" -V)"
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# medvol itself: PYTHONPATH=. is not enough, because medvol.datasets and medvol.pipelines are
# the tree's datasets/ and pipelines/ (setup.cfg package_dir); setuptools comes with the wheels.
rm -rf build/lib/medvol  # setuptools' copy from an earlier run: a module deleted since would come back
"$PY" -m pip install -q --no-compile --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" .
"$PY" -c "import isal" 2>/dev/null || echo "no isal: medvol reads .nii.gz with zlib (slower, the same voxels)"
echo "wheels and medvol installed into $SITE in $(( $(date +%s) - t0 )) s"
exec "$PY" benchmarks/gpu_check.py "$@"
