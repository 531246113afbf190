#!/usr/bin/env bash
# The GPU checks of issue 18, on a CUDA machine whose python3 has torch, triton and transformers (fla optional,
# for benchmarks/peers.py): every Triton test case compiled on the GPU (tests/kernels/test_triton.py, one tile
# per shape; TESTS_K selects cases), the Triton kernels beside SDPA and fla (peers.py), decoding and training
# against transformers in bf16 (decode.py, train_speed.py), and every kernel op's backends against its
# reference at training shapes (kernel_ops.py; KERNEL_OPS selects ops), and the compiled decode step replayed
# as a CUDA graph against eager (tests/archs/test_compiled_decode.py), train.py's trainer=gpu for 30 steps, and
# Mamba-1 presets' training step with the scan's Triton kernel against its torch loop (MAMBA_PRESETS), and every
# Triton kernel variant's registers and spills as this machine's Triton builds them (tests/kernels/compile_for_gpu).
# Each part's log goes to $OUT (default gpu_out/); *_S variables bound each part's seconds, and 0 skips the part.
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
part() {  # part SECONDS LOG command...: run it within SECONDS (0: skip), its output in $out/LOG
    local seconds=$1 log=$2
    shift 2
    [ "$seconds" = 0 ] && return 0
    timeout -s INT "$seconds" "$@" >"$out/$log" 2>&1
}
# Each test case compiles its kernels afresh (15-20 s of CPU): TESTS_N workers compile side by side (pytest-xdist,
# where installed; the GPU's numbers are unaffected, these are correctness checks).
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n "${TESTS_N:-8}")
KVLAB_TRITON_AUTOTUNE=0 part "${TESTS_S:-150}" tests.txt python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    "${workers[@]}" tests/kernels/test_triton.py -m "slow or not slow" -k "${TESTS_K:-}" -rf
part "${PEERS_S:-200}" peers.txt python3 benchmarks/peers.py --cases "${PEERS_CASES:-attention,gqa,retention,simple_gla,gla}"
part "${DECODE_S:-150}" decode.txt python3 benchmarks/decode.py --device cuda --dtype bfloat16 \
    --presets "${DECODE_PRESETS:-gqa,mla,cla,yoco_swa,mamba2}" --batches "${DECODE_BATCHES:-1,8}"
part "${TRAIN_S:-90}" train.txt python3 benchmarks/train_speed.py --device cuda --dtype bfloat16 --batch 16 \
    --seq 1024 --steps 10
# Mamba-1's scan through the model: the Triton kernel against the torch backend's loop, eager and compiled blocks.
part "${MAMBA_S:-90}" mamba.txt python3 benchmarks/train_speed.py --device cuda --dtype bfloat16 --batch 8 \
    --seq 1024 --repeats 3 --compiled-blocks "${MAMBA_PRESETS:-samba}"
# The default GPU recipe end to end (trainer=gpu: bf16-mixed, the fused AdamW, gradient clipping; needs lightning,
# hydra-core, datasets and tokenizers beside torch): 30 steps on the bundled corpus.
part "${RECIPE_S:-90}" recipe.txt python3 train.py trainer=gpu trainer.max_steps=30 trainer.val_check_interval=30 \
    trainer.progress_bar=false output_root="$out/runs"
# Each Triton kernel variant's registers and spilled stack as this machine's Triton and ptxas build them.
part "${SPILLS_S:-60}" registers.txt python3 -m tests.kernels.compile_for_gpu --dtype bfloat16
part "${KERNELS_S:-120}" kernel_ops.txt python3 benchmarks/kernel_ops.py --device cuda ${KERNEL_OPS:+--ops "$KERNEL_OPS"}
part "${GRAPHS_S:-150}" graphs.txt python3 -m pytest -q -p no:cacheprovider -o addopts="" "${workers[@]}" \
    tests/archs/test_compiled_decode.py -k cuda_graph -rf
tail -n 3 "$out"/*.txt
