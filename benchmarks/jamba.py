"""Jamba (Mamba + MoE) speed: kvlab beside `transformers`' JambaForCausalLM at the same weights, one process.

    python benchmarks/jamba.py [--batch 8] [--seq 256] [--prompt 64] [--new 64] [--repeats 3] [--scan-only]

Three measurements, each the best of ``repeats`` after a warm-up, the runners interleaved:

- Mamba-1's scan at the preset's shapes (batch x 512 channels x state 16 over ``seq`` tokens), forward and
  backward: kvlab's torch backend as training runs it on a CPU (compiled chunks of SCAN_CHUNK tokens; its
  first call, the compilation, timed apart) and token by token with its hand-written backward (the
  chunks off, as under ``KVLAB_COMPILE=0``), against the chunked linear-attention form the token loop
  replaced (``linear_attention_chunked`` with a head per channel) and `transformers`' Jamba scan (its
  PyTorch path, as it runs without mamba-ssm).
- Greedy decoding at batch 1 after a ``prompt``-token prompt: kvlab's ``generate`` (eager, and through its
  compiled decode step, the compilation timed apart) and JambaForCausalLM's ``generate``, holding the same
  weights (exported natively by ``save_hf``); the tokens must agree.
- A training step (forward with the loss, backward, AdamW) of the ``jamba`` preset: kvlab, and
  JambaForCausalLM (timed once after its warm-up: it takes minutes), and kvlab's ``jamba_m2`` (Mamba-2,
  dense MLPs) for scale.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import transformers
from common import timed  # benchmarks/common.py, beside this script

import kvlab.kernels.ssm as ssm
from kvlab import ModelConfig, build_model
from kvlab.archs.hf import save_hf
from kvlab.kernels.linear_attention import linear_attention_chunked
from kvlab.kernels.ssm import _selective_scan, selective_scan

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def scan_inputs(batch: int, seq: int, channels: int = 512, state: int = 16):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, channels, seq, generator=g, requires_grad=True)
    delta = (torch.rand(batch, channels, seq, generator=g) * 0.1).requires_grad_()
    A = (-torch.arange(1, state + 1.0).repeat(channels, 1)).requires_grad_()
    B, C = (torch.randn(batch, state, seq, generator=g, requires_grad=True) for _ in range(2))
    return u, delta, A, B, C


def time_scans(batch: int, seq: int, repeats: int) -> dict[str, float]:
    inputs = scan_inputs(batch, seq)
    chunked = lambda *a: _selective_scan(*a, None, None, linear_attention_chunked, chunk_size=16)  # noqa: E731

    def run(scan):
        y, _ = scan(*inputs)
        y.square().mean().backward()

    def token_by_token(*args):
        with mock.patch.object(ssm, "COMPILED_SCAN_MIN", math.inf):
            return selective_scan(*args)

    config = transformers.JambaConfig(hidden_size=256, mamba_d_state=16, mamba_expand=2)
    mixer = transformers.models.jamba.modeling_jamba.JambaMambaMixer(config, layer_idx=0)
    hidden = torch.randn(batch, seq, 256)
    t0 = time.perf_counter()
    run(selective_scan)
    first = time.perf_counter() - t0
    return {
        f"kvlab scan in compiled chunks of {ssm.SCAN_CHUNK} tokens (first call, compiling: {first:.1f} s)": timed(
            lambda: run(selective_scan), repeats
        ),
        "kvlab scan token by token, hand-written backward (KVLAB_COMPILE=0)": timed(
            lambda: run(token_by_token), repeats
        ),
        "kvlab before: chunked linear attention, a head per channel": timed(lambda: run(chunked), repeats),
        "transformers JambaMambaMixer (whole mixer, PyTorch path)": timed(
            lambda: mixer(hidden).square().mean().backward(), repeats
        ),
    }


def train_step(model, ids, optimizer, hf: bool):
    if hf:  # its loss shifts the labels itself and adds its balance term (output_router_logits is off: not here)
        loss = model(ids, labels=ids).loss
    else:
        loss = model(ids, labels=ids.roll(-1, 1))
        aux = model.aux_loss()
        loss = loss + aux if aux is not None else loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scan-only", action="store_true", help="the scan's timings alone")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}\n")

    print(f"Mamba-1 scan, forward + backward, batch {args.batch}, {args.seq} tokens, 512 channels, state 16:")
    for name, seconds in time_scans(args.batch, args.seq, args.repeats).items():
        print(f"  {name}: {seconds * 1e3:.0f} ms")
    if args.scan_only:
        return

    ours = build_model(ModelConfig.from_yaml(REPO_CONFIGS / "jamba.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, Path(tmp) / "hf", remote_code=False)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf")
    m2 = build_model(ModelConfig.from_yaml(REPO_CONFIGS / "jamba_m2.yaml"))
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))
    # decoding first: the training steps below change the two models' weights differently
    ours.eval(), theirs.eval()
    prompt = ids[:1, : args.prompt]
    with torch.no_grad():
        ours_tokens = ours.generate(prompt, args.new, compile=False)
        theirs_tokens = theirs.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        same = torch.equal(ours_tokens[:, -args.new :], theirs_tokens[:, -args.new :])
        t_ours = timed(lambda: ours.generate(prompt, args.new, compile=False), args.repeats)
        t_theirs = timed(lambda: theirs.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new,
                                                do_sample=False), args.repeats)  # fmt: skip
        start = time.perf_counter()
        compiled_tokens = ours.generate(prompt, args.new, compile=True)  # the first call compiles the step
        first = time.perf_counter() - start
        same_compiled = torch.equal(compiled_tokens, ours_tokens)
        t_compiled = timed(lambda: ours.generate(prompt, args.new, compile=True), args.repeats)
    print(f"\nGreedy decoding, batch 1, {args.prompt}-token prompt, {args.new} new tokens (same tokens: {same}):")
    print(f"  kvlab jamba (eager): {args.new / t_ours:.1f} tokens/s")
    print(
        f"  kvlab jamba (compiled step; first call {first:.1f} s; same tokens as eager: {same_compiled}): "
        f"{args.new / t_compiled:.1f} tokens/s"
    )
    print(f"  transformers JambaForCausalLM: {args.new / t_theirs:.1f} tokens/s")

    models = {
        "kvlab jamba": (ours, False),
        "transformers JambaForCausalLM": (theirs, True),
        "kvlab jamba_m2": (m2, False),
    }
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in models.items()}
    print(f"\nTraining step (forward + loss, backward, AdamW), batch {args.batch} x {args.seq} tokens, fp32:")
    for name, (model, hf) in models.items():
        model.train()
        repeats = 1 if hf else args.repeats  # transformers' step takes minutes on a CPU
        seconds = timed(lambda: train_step(model, ids, optimizers[name], hf), repeats)  # noqa: B023
        print(f"  {name}: {seconds:.2f} s/step, {ids.numel() / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
