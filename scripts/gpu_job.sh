#!/usr/bin/env bash
# One device-machine job (see the device tool's README): the benchmark, then a reproduce slot.
#
# Here, before the call:
#   mkdir -p .gpu && cp ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.xz .gpu/
#   echo /.gpu/ >> .git/info/exclude       # and download torchattacks / umap wheels into .whl/
# The call:  run(command="bash scripts/gpu_job.sh bench|reproduce", carry=[".gpu", ".whl"])
# Results land in $OUT; commit them under data/results/ with the command and hardware.
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ANCHOR_DATA_DIR="$PWD/.gpu" ANCHOR_OFFLINE=1 ANCHOR_CACHE_DIR=/tmp/anchor-cache
export ANCHOR_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
OUT="${OUT:-/tmp/out}"
case "${1:-bench}" in
  bench)
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -m anchor_lib bench --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
    ;;
  reproduce)
    # Restartable: finished runs are skipped, unfinished ones resume from data/results/*/checkpoint.pt.
    python3 -m anchor_lib reproduce --profile full --out data/results 2>&1 | tee "$OUT/reproduce.log"
    # Checkpoints (~90 MB each) stay on the machine; only the small artifacts come back.
    tar -czf "$OUT/results.tgz" --exclude="*.pt" --exclude="*.pt.sha256" data/results
    ;;
  *) echo "usage: $0 bench|reproduce" >&2; exit 2 ;;
esac
