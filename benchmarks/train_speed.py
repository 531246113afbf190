"""Training step speed: kvlab (eager and with compiled blocks) vs `transformers` Llama and litgpt, one process.

    python benchmarks/train_speed.py [--preset gqa] [--batch 8] [--seq 256] [--repeats 5] [--steps 20]
                                     [--device cpu] [--dtype float32] [--loss-rows N] [--attention-in-bf16]
    python benchmarks/train_speed.py --precisions gqa,mamba2,... [--repeats 5]
    python benchmarks/train_speed.py --compiled-blocks jamba,samba,... [--repeats 5] [--dtype bfloat16]

The step is the training step's work: forward with the loss (kvlab: the
fused head + loss; transformers: ``labels=``), backward, AdamW step,
zero_grad, at the gqa preset's shapes in fp32, the two models holding the
same weights. ``--preset`` picks another preset that `transformers` has a
class for, the peer then that class (through kvlab's export; mla:
DeepseekV3ForCausalLM). Where litgpt is installed
(benchmarks/litgpt_peer.py) and the preset is a Llama, litgpt's GPT as the
same Llama trains beside them as its pretrain script does
(``chunked_cross_entropy`` on the logits; compiled: the whole model under
``torch.compile``), with the same optimizer. kvlab's compiled step is
``trainer.compile=true``'s (each block under ``torch.compile``); its
compilation is reported apart. Also printed: every row's first loss; the
share of kvlab's eager step spent in matrix multiplies and attention
(torch's profiler), the arithmetic both libraries must do alike, which
bounds what any fusion can gain; and the losses of ``--steps`` steps
with and without compilation (same data), which must agree. ``--loss-rows
N`` adds kvlab's two steps again with the fused head + loss walking
N-row chunks instead of its default (``_rows_per_chunk``), interleaved with
the others: what the chunk size is worth, side by side. ``--attention-in-bf16``
adds them with the attention left to SDPA's bf16 kernels where kvlab would
attend in float32 (training in bf16 on a CPU over short rows: BF16_SHORT in
kvlab/kernels/attention.py), so what that choice is worth, side by side.
``--precisions a,b,...`` times kvlab's eager step alone, for any preset,
in float32 and under bf16 autocast, alternating. ``--compiled-blocks
a,b,...`` times any preset's step eager and through compiled blocks, and
for Mamba-1 presets eager with its scan token by token (the compiled
chunks off), interleaved.
``--device cuda --dtype bfloat16`` runs it on a GPU, both models under
bf16 autocast (float32 weights and optimizer, as ``trainer.precision=
bf16-mixed`` trains); the profiler's share is then not printed (it times
the host).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from unittest import mock

import litgpt_peer  # benchmarks/litgpt_peer.py, beside this script
import torch
import transformers
from common import best_interleaved  # benchmarks/common.py, beside this script
from decode import same_architecture_twin  # benchmarks/decode.py, beside this script
from torch.profiler import profile

import kvlab.kernels.attention as attention_kernel
import kvlab.kernels.cross_entropy as fused_loss
import kvlab.kernels.ssm as ssm
from kvlab import ModelConfig, build_model
from kvlab.layers.mamba import Mamba

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def stepper(model, batches, hf: bool, dtype=torch.float32, loss_fn=None, patches=()):
    """One training step per call on the next of ``batches``; ``loss_fn(ids)`` (litgpt's) in place of the
    model's own loss where given; ``patches``, (module, name, value) triples: kvlab's module globals set to
    those values for this step's duration (read when compiled blocks trace too: Dynamo guards on them)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # kvlab's recipe and transformers' Trainer
    it = iter(batches)
    device = next(model.parameters()).device

    def step():
        ids = next(it).to(device, non_blocking=True)
        with contextlib.ExitStack() as stack:
            for module, name, value in patches:
                stack.enter_context(mock.patch.object(module, name, value))
            return _step(ids)

    def _step(ids):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if loss_fn is not None:
                loss = loss_fn(ids)
            elif hf:
                loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts labels itself
            else:
                loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gqa", help="a preset with a transformers class: gqa, mha, mqa, mla, ...")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--loss-rows", type=int, default=0, help="also time kvlab's steps with N-row loss chunks")
    p.add_argument("--attention-in-bf16", action="store_true", help="also time kvlab's steps with SDPA in bf16")
    p.add_argument("--precisions", default="", help="presets (a,b,...): kvlab's eager step in float32 and in bf16")
    p.add_argument("--compiled-blocks", default="", help="presets (a,b,...): kvlab's step eager and compiled")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.precisions:
        return precisions(args.precisions.split(","), args, device)
    if args.compiled_blocks:
        return compiled_blocks(args.compiled_blocks.split(","), args, device, dtype)
    n = 1 + args.repeats + args.steps
    data = torch.randint(0, 4096, (n, args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))

    def model(compiled: bool):
        torch.manual_seed(0)
        m = build_model(ModelConfig.from_yaml(REPO_CONFIGS / f"{args.preset}.yaml")).train().to(device)
        m.compile_blocks = "inductor" if compiled else None
        return m

    eager, compiled = model(False), model(True)
    hf = same_architecture_twin(eager.cpu())  # the preset as `transformers`' own class, with the same weights
    if hf is None:
        raise SystemExit(f"--preset {args.preset}: transformers has no class for it (kvlab exports it as remote code)")
    llama_shaped = type(hf).__name__ == "LlamaForCausalLM"
    litgpt_steps = {}
    if litgpt_peer.MISSING is None and llama_shaped:  # (twins of the weights while they are on the CPU, as above)
        for kind, compile_it in (("eager", False), ("compiled", True)):
            gpt = litgpt_peer.litgpt_twin(eager).train().to(device)
            loss_fn = litgpt_peer.train_forward(gpt, compile_it)
            litgpt_steps[f"litgpt {kind}"] = stepper(gpt, data, False, dtype, loss_fn=loss_fn)
    hf = hf.train().to(device)
    eager.to(device)
    steps = {"kvlab eager": stepper(eager, data, False, dtype), "kvlab compiled": stepper(compiled, data, False, dtype),
             "transformers eager": stepper(hf, data, True, dtype), **litgpt_steps}  # fmt: skip
    if args.loss_rows:
        rows = [(fused_loss, "_rows_per_chunk", lambda vocab, device=None: args.loss_rows)]
        for kind, compile_it in (("eager", False), ("compiled", True)):
            steps[f"kvlab {kind}, {args.loss_rows}-row loss chunks"] = stepper(model(compile_it), data, False, dtype,
                                                                               patches=rows)  # fmt: skip
    if args.attention_in_bf16:
        for kind, compile_it in (("eager", False), ("compiled", True)):
            patches = [(attention_kernel, "BF16_SHORT", 0)]
            steps[f"kvlab {kind}, attention in bf16"] = stepper(model(compile_it), data, False, dtype, patches=patches)
    first, first_loss = {}, {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        first_loss[name] = step()  # the same weights and batch: the same loss, to rounding
        first[name] = time.perf_counter() - t0
    best, _ = best_interleaved(list(steps.items()), args.repeats)
    tokens = args.batch * args.seq
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, litgpt {litgpt_peer.version()}, "
          f"{where}, {args.preset} against {type(hf).__name__}, batch {args.batch} x {args.seq} tokens, "
          f"{args.dtype}, best of {args.repeats}")  # fmt: skip
    print()
    peers = ["transformers eager"] + [name for name in ("litgpt eager", "litgpt compiled") if name in steps]
    print(f"| step | tokens/s | {' | '.join(f'vs {p}' for p in peers)} | first step s (compilation) |")
    print("| --- " * (len(peers) + 3) + "|")
    for name in steps:
        ratios = " | ".join(f"x{best[p] / best[name]:.2f}" for p in peers)
        print(f"| {name} | {tokens / best[name]:,.0f} | {ratios} | {first[name]:.1f} |")
    # (the same for every row but transformers': it shifts its labels itself, so its loss covers one position
    # fewer per row, those with a next token in its input)
    print("first step's loss: " + ", ".join(f"{name} {loss:.6f}" for name, loss in first_loss.items()))
    if litgpt_peer.MISSING is not None:
        print(f"(no litgpt rows: {litgpt_peer.MISSING})")
    elif not llama_shaped:
        print(f"(no litgpt rows: {args.preset} is not a Llama but a {type(hf).__name__})")

    # What no fusion removes: the matrix multiplies and attention of kvlab's eager step (host time: CPU only).
    if device.type == "cpu":
        _profile_share(steps["kvlab eager"])

    # Same losses with and without compilation, from the same weights and data.
    fresh_e, fresh_c = model(False), model(True)
    run_e, run_c = stepper(fresh_e, data, False, dtype), stepper(fresh_c, data, False, dtype)
    diffs = [abs(run_e() - run_c()) for _ in range(args.steps)]
    print(f"losses over {args.steps} steps, eager vs compiled: max |difference| {max(diffs):.2e}")


def precisions(presets: list[str], args, device) -> None:
    """Each preset's eager training step in float32 and under bf16 autocast, the two alternating, best of
    ``--repeats``: what ``trainer.precision=bf16-mixed`` is worth per architecture (any preset: no peer)."""
    data = torch.randint(0, 4096, (1 + args.repeats, args.batch, args.seq + 1),  # each model: a warm-up, the rounds
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    print(f"kvlab's eager training step, batch {args.batch} x {args.seq} tokens, {device}, tokens/s "
          f"(best of {args.repeats})\n")  # fmt: skip
    print("| preset | float32 | bf16 autocast | bf16 faster |\n| --- | --- | --- | --- |")
    for name in presets:
        steps = {}
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = build_model(ModelConfig.from_yaml(REPO_CONFIGS / f"{name}.yaml")).train().to(device)
            steps[dtype] = stepper(model, data, False, dtype)
        for step in steps.values():  # warm-up
            step()
        best, _ = best_interleaved(list(steps.items()), args.repeats)
        fp32, bf16 = (args.batch * args.seq / best[d] for d in steps)
        print(f"| {name} | {fp32:,.0f} | {bf16:,.0f} | x{bf16 / fp32:.2f} |", flush=True)


def compiled_blocks(presets: list[str], args, device, dtype) -> None:
    """Each preset's training step eager and through compiled blocks (``trainer.compile``), and for presets
    with Mamba-1 layers also eager with the scan token by token (on a CPU its compiled chunks off, as under
    ``KVLAB_COMPILE=0`` or below ``COMPILED_SCAN_MIN``; on a GPU the torch backend's loop in place of the
    Triton kernel), interleaved, best of ``--repeats``; the first step of each, which compiles, timed apart
    (any preset: no peer)."""
    data = torch.randint(0, 4096, (1 + args.repeats, args.batch, args.seq + 1),  # each model: a first step, the rounds
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    print(f"kvlab's training step, batch {args.batch} x {args.seq} tokens, {device}, {args.dtype}, tokens/s "
          f"(best of {args.repeats}); first steps (compilation) in seconds\n")  # fmt: skip
    print("| preset | eager, Mamba-1 scan token by token | eager | compiled blocks | compiled vs eager "
          "| first step s: eager / compiled |\n| --- | --- | --- | --- | --- | --- |")  # fmt: skip
    token_by_token = [(ssm, "COMPILED_SCAN_MIN", math.inf)]
    for name in presets:
        steps = {}
        for kind in ("token by token", "eager", "compiled"):
            torch.manual_seed(0)
            model = build_model(ModelConfig.from_yaml(REPO_CONFIGS / f"{name}.yaml")).train().to(device)
            if kind == "token by token" and not any(isinstance(m, Mamba) for m in model.modules()):
                continue
            model.compile_blocks = "inductor" if kind == "compiled" else None
            if kind == "token by token" and device.type == "cuda":
                model.config.kernels = "auto,selective_scan=torch"
            steps[kind] = stepper(model, data, False, dtype, patches=token_by_token if kind == "token by token" else ())
        first = {}
        for kind, step in steps.items():
            t0 = time.perf_counter()
            step()
            first[kind] = time.perf_counter() - t0
        best, _ = best_interleaved(list(steps.items()), args.repeats)
        rate = {kind: args.batch * args.seq / seconds for kind, seconds in best.items()}
        scan = f"{rate['token by token']:,.0f}" if "token by token" in rate else "-"
        print(
            f"| {name} | {scan} | {rate['eager']:,.0f} | {rate['compiled']:,.0f} | "
            f"x{rate['compiled'] / rate['eager']:.2f} | {first['eager']:.1f} / {first['compiled']:.1f} |",
            flush=True,
        )


def _profile_share(step) -> None:
    with profile() as prof:
        for _ in range(2):
            step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    math = sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_")
               or "scaled_dot_product" in e.key)  # fmt: skip
    print()
    print(
        f"kvlab eager step: {100 * math / total:.0f}% in matrix multiplies and attention (profiler self time); "
        f"removing everything else would make it x{total / math:.2f} faster at most"
    )


if __name__ == "__main__":
    main()
