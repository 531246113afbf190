#!/usr/bin/env bash
# The GPU checks of issue 18, on a CUDA machine whose python3 has torch, triton and transformers (fla optional,
# for benchmarks/peers.py): every Triton test case compiled on the GPU (tests/kernels/test_triton.py, one tile
# per shape; TESTS_K selects cases), the Triton kernels beside SDPA and fla (peers.py), decoding and training
# against transformers in bf16 (decode.py, train_speed.py), and every kernel op's backends against its
# reference at training shapes (kernel_ops.py; KERNEL_OPS selects ops). Each part's log goes to $OUT (default
# gpu_out/); *_S variables bound each part's seconds.
#   bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" >>"$out/gpu.txt" 2>&1
# SIGINT: pytest and the scripts still print what they have when a part runs out of time.
# Each test case compiles its kernels afresh (15-20 s of CPU): TESTS_N workers compile side by side (pytest-xdist,
# where installed; the GPU's numbers are unaffected, these are correctness checks).
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n "${TESTS_N:-8}")
KVLAB_TRITON_AUTOTUNE=0 timeout -s INT "${TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    "${workers[@]}" tests/kernels/test_triton.py -m "slow or not slow" -k "${TESTS_K:-}" -rf >"$out/tests.txt" 2>&1
timeout -s INT "${PEERS_S:-200}" python3 benchmarks/peers.py --cases "${PEERS_CASES:-attention,gqa,retention,simple_gla,gla}" \
    >"$out/peers.txt" 2>&1
timeout -s INT "${DECODE_S:-150}" python3 benchmarks/decode.py --device cuda --dtype bfloat16 \
    --presets "${DECODE_PRESETS:-gqa,mla,cla,yoco_swa,mamba2}" --batches "${DECODE_BATCHES:-1,8}" >"$out/decode.txt" 2>&1
timeout -s INT "${TRAIN_S:-90}" python3 benchmarks/train_speed.py --device cuda --dtype bfloat16 --batch 16 \
    --seq 1024 --steps 10 >"$out/train.txt" 2>&1
timeout -s INT "${KERNELS_S:-120}" python3 benchmarks/kernel_ops.py --device cuda ${KERNEL_OPS:+--ops "$KERNEL_OPS"} \
    >"$out/kernel_ops.txt" 2>&1
tail -n 3 "$out"/*.txt
