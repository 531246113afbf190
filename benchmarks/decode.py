"""Greedy decoding speed: kvlab (compiled and eager) vs `transformers` Llama and litgpt, one process.

    python benchmarks/decode.py [--presets gqa,mla,cla,yoco_swa,mamba2] [--batches 1,8]
                                [--prompt 128] [--new 128] [--repeats 3] [--device cpu] [--dtype float32]

The peer is `transformers`' LlamaForCausalLM at the presets' common shapes,
holding the gqa preset's weights (kvlab's export of it, loaded back; so its
tokens must equal kvlab gqa's, checked), generating with its default
dynamic cache (eager) and with its static cache under ``torch.compile``
(``cache_implementation="static"``, compiled on CPU too). The second peer, where litgpt is installed
(benchmarks/litgpt_peer.py says how and what its paths are), is litgpt's GPT
built as the same Llama with the same weights (tokens checked too),
generating eagerly and with ``litgpt generate --compile``'s recipe; its
rows follow the first table. A preset other than gqa that `transformers`
has a class for (mla: DeepSeek-V3's) also runs against that class at the
same shapes and weights (kvlab's native export, loaded back), eagerly and
compiled, its tokens checked: a third table. kvlab generates through
``model.generate`` with the compiled decode step (first call: the
compilation, reported apart; on a GPU also captured as a CUDA graph) and
eagerly (``compile=False``). ``--device cuda --dtype bfloat16`` runs it all
on a GPU. Each is timed as the best of ``repeats`` calls after a warm-up,
the runners interleaved so drift hits all alike.

``floor`` is the time to read every weight matrix of the preset once per
token (one ``F.linear`` per matrix at the batch's rows): at batch 1 in fp32
decoding is bound by memory bandwidth, and no implementation of a preset
can beat its floor (mla and mamba2 carry more weights than the peer's
Llama: their floors are lower).

All runs of a batch are timed in one interleaved loop, each preset's
between runs of the peer, so every row is divided by the same best peer
time (measured as often as all presets together): on a shared VM one run's
noise would otherwise land on one row's ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import litgpt_peer  # benchmarks/litgpt_peer.py, beside this script
import torch
import torch.nn.functional as F
import transformers
from common import best_interleaved, sync  # benchmarks/common.py, beside this script

from kvlab import ModelConfig, build_model
from kvlab.archs.decode import decode_step_for
from kvlab.archs.hf import hf_config_from_model, save_hf

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def hf_runner(hf, ids, new: int, compiled: bool):
    # Every prompt position is a token: without an explicit mask `generate` takes pad_token_id's occurrences in
    # the random prompt for padding (seen: a 0 in one row of a batch of 8 changed that row's tokens)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))  # fmt: skip
    if compiled:
        compile_config = transformers.CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        kwargs.update(cache_implementation="static", compile_config=compile_config)

    def run():
        with torch.inference_mode():
            return hf.generate(ids, **kwargs)

    return run


def same_architecture_twin(model):
    """`transformers`' own class for ``model``'s architecture (MLA: DeepseekV3ForCausalLM) with its weights,
    through kvlab's native export; None where `transformers` has none (cross-layer sharing, recurrent mixers)."""
    try:
        architecture = hf_config_from_model(model.config)["architectures"][0]
    except ValueError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, f"{tmp}/twin", remote_code=False)
        twin = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/twin", dtype=torch.float32).eval()
    assert type(twin).__name__ == architecture, (type(twin).__name__, architecture)
    return twin


FLOOR_PASSES = 16


def weight_pass(model, batch: int):
    """A run that multiplies ``batch`` rows by every Linear weight (the LM head included), each weight read once
    per pass, FLOOR_PASSES times: a decode step's weight traffic, which batch-1 decoding cannot go below."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], device=w.device, dtype=w.dtype) for w in weights}

    def passes():
        with torch.inference_mode():
            for _ in range(FLOOR_PASSES):
                for w in weights:
                    F.linear(xs[w.shape[1]], w)

    return passes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="gqa,mla,cla,yoco_swa,mamba2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    presets = args.presets.split(",")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, litgpt {litgpt_peer.version()}, "
          f"{where}, prompt {args.prompt}, new {args.new}, best of {args.repeats}, {args.dtype}")  # fmt: skip
    print()
    print(
        "| preset | batch | kvlab compiled tok/s | kvlab eager tok/s | HF eager tok/s | HF static+compile tok/s "
        "| compiled / HF eager | compiled / HF compiled | floor tok/s | compiled / floor | compile s (kvlab, HF) "
        "| same tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    litgpt_rows, same_rows = [], []
    for batch in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(0)
        gqa = build_model(ModelConfig.from_yaml(PRESETS / "gqa.yaml")).eval()
        hf = same_architecture_twin(gqa).to(device, dtype)  # LlamaForCausalLM, through kvlab's export
        gqa.to(device, dtype)
        ids = torch.randint(0, gqa.config.vocab_size, (batch, args.prompt)).to(device)
        hf_eager, hf_compiled = hf_runner(hf, ids, args.new, False), hf_runner(hf, ids, args.new, True)
        reference = hf_eager()
        t0 = time.perf_counter()
        hf_compiled()
        sync()
        hf_compile_s = time.perf_counter() - t0
        lit, lit_same, lit_compile_s = {}, True, 0.0  # name -> runner; its tokens; the compiled one's first call
        if litgpt_peer.MISSING is None:  # two models: each runner keeps its cache on its own
            for name, compiled in (("litgpt", False), ("litgpt_compiled", True)):
                run = litgpt_peer.generation_runner(litgpt_peer.litgpt_twin(gqa).to(device, dtype).eval(), ids,
                                                    args.new, compiled)  # fmt: skip
                t0 = time.perf_counter()
                lit_same &= torch.equal(run(), reference[:, args.prompt :])
                sync()
                lit[name], lit_compile_s = run, time.perf_counter() - t0
        models, rows, twins = {}, [], {}
        for preset in presets:
            torch.manual_seed(0)
            model = gqa if preset == "gqa" else build_model(ModelConfig.from_yaml(PRESETS / f"{preset}.yaml")).eval()
            model.to(device, dtype)
            t0 = time.perf_counter()
            compiled_out = model.generate(ids, args.new, compile=True)
            sync()
            compile_s = time.perf_counter() - t0
            same = torch.equal(compiled_out, model.generate(ids, args.new, compile=False))
            if preset == "gqa":
                same = same and torch.equal(compiled_out, reference)
            elif (twin := same_architecture_twin(model)) is not None:  # its own tokens: those of kvlab's model
                twin.to(device, dtype)
                twin_runs = [hf_runner(twin, ids, args.new, compiled) for compiled in (False, True)]
                twin_same = all([torch.equal(run(), compiled_out) for run in twin_runs])  # each once: compiles
                twins[preset] = (type(twin).__name__, twin_runs, twin_same)
            models[preset] = model
            rows.append((preset, compile_s, same))
        # One interleaved timing for the batch: each preset's runs between the peer's, so that every row is
        # divided by the same (best) peer time, measured as often as all presets together
        runners = []
        for preset, model in models.items():
            runners += [
                ("hf", hf_eager),
                ("hf_compiled", hf_compiled),
                *lit.items(),
                (f"compiled {preset}", lambda m=model, ids=ids: m.generate(ids, args.new, compile=True)),
                (f"eager {preset}", lambda m=model, ids=ids: m.generate(ids, args.new, compile=False)),
                (f"floor {preset}", weight_pass(model, batch)),  # one step's weights: divided by new below
            ]
            if preset in twins:
                runners += [(f"twin {preset}", twins[preset][1][0]), (f"twin_compiled {preset}", twins[preset][1][1])]
        best, interrupted = best_interleaved(runners, args.repeats)
        rate = {k: batch * args.new / v for k, v in best.items()}  # 0.0: not run before an interrupt
        for preset, compile_s, same in rows:
            step = decode_step_for(models[preset], True)
            compiled, peer, peer_compiled = rate[f"compiled {preset}"], rate["hf"], rate["hf_compiled"]
            floor = rate[f"floor {preset}"] * FLOOR_PASSES / args.new  # a token per pass over the weights
            note = "" if step.compiled else f" (fell back: {step.fallback_reason})"
            print(f"| {preset} | {batch} | {compiled:,.0f}{note} | {rate[f'eager {preset}']:,.0f} | {peer:,.0f} "
                  f"| {peer_compiled:,.0f} | {_ratio(compiled, peer)} | {_ratio(compiled, peer_compiled)} "
                  f"| {floor:,.0f} | {_ratio(compiled, floor, '.0%')} | {compile_s:.0f}, {hf_compile_s:.0f} "
                  f"| {same} |", flush=True)  # fmt: skip
        for preset, (architecture, _, twin_same) in twins.items():
            same_rows.append((preset, batch, architecture, rate[f"compiled {preset}"], rate[f"twin {preset}"],
                              rate[f"twin_compiled {preset}"], twin_same))  # fmt: skip
        if lit:
            litgpt_rows.append((batch, {p: rate[f"compiled {p}"] for p in models}, rate["litgpt"],
                                rate["litgpt_compiled"], lit_compile_s, lit_same))  # fmt: skip
        if interrupted:
            print(f"(interrupted during batch {batch}'s timing: the best of the rounds it completed; 0: not run)")
            break
    _print_litgpt(litgpt_rows)
    _print_same_architecture(same_rows)


def _print_litgpt(rows) -> None:
    print()
    if not rows:
        print(f"(no litgpt rows: {litgpt_peer.MISSING})")
        return
    print(
        "| preset | batch | kvlab compiled tok/s | litgpt eager tok/s | litgpt compiled tok/s "
        "| compiled / litgpt eager | compiled / litgpt compiled | litgpt compile s | litgpt same tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, compiled, eager_rate, compiled_rate, compile_s, same in rows:
        for preset, rate in compiled.items():
            ratios = f"{_ratio(rate, eager_rate)} | {_ratio(rate, compiled_rate)}"
            print(f"| {preset} | {batch} | {rate:,.0f} | {eager_rate:,.0f} | {compiled_rate:,.0f} | {ratios} "
                  f"| {compile_s:.0f} | {same} |")  # fmt: skip


def _print_same_architecture(rows) -> None:
    if not rows:
        return
    print()
    print(
        "| preset | batch | transformers class | kvlab compiled tok/s | its eager tok/s | its static+compile tok/s "
        "| compiled / its eager | compiled / its compiled | same tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for preset, batch, architecture, compiled, eager_rate, compiled_rate, same in rows:
        ratios = f"{_ratio(compiled, eager_rate)} | {_ratio(compiled, compiled_rate)}"
        print(f"| {preset} | {batch} | {architecture} | {compiled:,.0f} | {eager_rate:,.0f} | {compiled_rate:,.0f} "
              f"| {ratios} | {same} |")  # fmt: skip


def _ratio(a: float, b: float, spec: str = ".2f") -> str:
    if not (a and b):
        return "-"
    return f"{a / b:{spec}}" if spec.endswith("%") else f"x{a / b:{spec}}"


if __name__ == "__main__":
    main()
