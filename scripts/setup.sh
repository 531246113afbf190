#!/usr/bin/env bash
# Create .venv and install kvlab with its test tools, from nothing.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build
# on machines where the CPU wheel is what is wanted. Set KVLAB_TORCH to choose
# another torch requirement (e.g. "torch==2.13.0" with a CUDA index URL).
# KVLAB_PEERS=1 also installs litgpt, the benchmarks' second peer, without its
# dependencies (it pins a huggingface_hub older than transformers needs).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${KVLAB_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev,deepspeed,triton,lm-eval]"
if [ "${KVLAB_PEERS:-0}" = 1 ]; then
    .venv/bin/python -m pip install --quiet --no-deps "litgpt==0.5.13"
fi
