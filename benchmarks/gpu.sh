#!/usr/bin/env bash
# The GPU checks of issue 18, on a CUDA machine whose python3 has torch and triton (fla optional, for
# benchmarks/peers.py): the Triton kernels beside PyTorch's SDPA and fla (peers.py), every kernel op's
# backends against its reference at training shapes (kernels.py), and every Triton test case compiled on the
# GPU (tests/kernels/test_triton.py, one tile per shape). Each part's log goes to $OUT (default gpu_out/).
#   bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$out/gpu.txt" 2>&1
# SIGINT: pytest and the scripts still print what they have when a part runs out of time
timeout -s INT "${PEERS_S:-200}" python3 benchmarks/peers.py >"$out/peers.txt" 2>&1
timeout -s INT "${KERNELS_S:-120}" python3 benchmarks/kernels.py --device cuda >"$out/kernels.txt" 2>&1
KVLAB_TRITON_AUTOTUNE=0 timeout -s INT "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_triton.py -rf >"$out/tests.txt" 2>&1
tail -n 3 "$out"/*.txt
