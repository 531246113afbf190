"""Every kernel op: each backend this machine can run vs the reference, forward + backward.

    python benchmarks/kernel_ops.py [--ops attention,rms_norm,...] [--repeats 3] [--device cpu|cuda] [--compile]
    python benchmarks/kernel_ops.py --memory [--vocab 32000] [--tokens 8192] [--dim 512]
    python benchmarks/kernel_ops.py --dispatch
    python benchmarks/kernel_ops.py --sink-attention
    python benchmarks/kernel_ops.py --gated-deltanet
    python benchmarks/kernel_ops.py --hard-decays
    python benchmarks/kernel_ops.py --diagonal-scan
    python benchmarks/kernel_ops.py --lightning

For every op in ``kvlab.kernels.ops`` and every registered backend that can
run its inputs here (interpreted Triton is left out: it is a correctness
vehicle, not a speed), it checks outputs and input gradients against the
reference (relative error to the largest reference value, bound printed)
and times forward + backward, best of ``--repeats`` after a warm-up. A
speed-up is printed only where the check passed. Shapes are training
shapes of the presets (d_model 256-512, 8 heads of 64, 1K-token rows).
``--compile`` adds a row per op for its ``torch`` backend under
``torch.compile``, with the first call's time (the compilation) beside it.

``--memory``: the fused head + cross-entropy vs the plain one, one
training step each in a fresh process, peak resident memory above the
inputs' (CPU) or peak allocated (CUDA), with the loss and gradients compared.

``--dispatch``: what going through the registry adds to one op call at a
decoding shape (one token, d_model 256), inside a model's ``use_kernels``
and outside it.

``--bf16-attention``: causal attention's forward + backward on bf16 tensors
(a training step under bf16 autocast) through SDPA as it comes and on
float32 copies (the casts timed with it), 2,048 tokens a call (batch x
positions), 8 query heads over 2 K/V heads, over head sizes and row
lengths, and which of the two ``attention`` takes there (BF16_SHORT).

``--sink-attention``: causal attention with gpt-oss's sink logits, forward +
backward in float32, 8 query heads of 32 over 2 K/V heads: the sink as a
key through the fused kernels (what ``attention`` takes over several
queries), the scores formed (what it took before), and plain attention
without sinks for scale; the two with sinks checked equal.

``--gated-deltanet``: gated DeltaNet's rule, forward + backward in float32 (4 heads of 64, 8 x 256 tokens, decays
of Qwen3-Next's init range): its chunked WY form at chunks of 16, 32 and 64, the generalised rule's chunked form
with the decay on every key channel (what the layer first ran on), and `transformers`' torch path
(``torch_chunk_gated_delta_rule``, chunks of 64: Qwen3-Next's without fla); then the whole layer against
`transformers`' Qwen3NextGatedDeltaNet at the same weights (2 query/key heads for 4 value heads, d_model 256),
outputs checked equal.

``--hard-decays``: ``decayed_products`` (the chunked forms' products under a decay per key channel: RWKV-6, RWKV-7,
KDA) at KDA's training shape (8 x 4 heads x 8 chunks of 32 tokens, 64 channels), forward + backward, with decays
that factor whole (-0.05 a token) and with decays that do not (down to -4 a token: channels that forget within a
chunk, factored block by block); then the kimi_linear preset's training step (8 x 256 tokens) as initialised and
with half its KDA channels forgetting at -1 a token.

``--diagonal-scan``: Griffin's RG-LRU recurrence (a decay per channel and token), forward + backward in float32 at
the griffin preset's training shape (8 x 256 tokens, 256 channels, decays as initialised): ``diagonal_scan``
(Hillis and Steele's passes), its token-by-token reference, linear attention's chunked form with each channel a
head of one key and one value (chunks of 8, 16 and 64), and `transformers`' RecurrentGemma scan (a token loop);
then the recurrent block against `transformers`' RecurrentGemmaRecurrentBlock at the same weights, outputs
checked equal.

``--lightning``: MiniMax-01's lightning-attention layer at the minimax_01 preset's training shape (8 x 256 tokens,
d_model 256, 8 heads of 32, layer 1 of 8), forward + backward in float32, kvlab's at chunks of 32 to 256 (the
``linear_attention`` kernel) against `transformers`' MiniMaxLightningAttention (256-token blocks: one here) at the
same weights, outputs checked equal.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import resource
import subprocess
import sys
import time

import torch
from common import rel_error, timed  # benchmarks/common.py, beside this script

from kvlab.kernels import ops, registry
from kvlab.kernels.registry import OPS, choose, use_kernels


def _inputs(op: str, device: str):
    """(args, kwargs) at a training shape; floating tensors require grad."""
    g = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).requires_grad_()
    B, H, T, D = 2, 8, 1024, 64
    if op == "attention":
        return (g(B, H, T, D), g(B, 2, T, D), g(B, 2, T, D)), {"causal": True}
    if op == "attention_weights":  # the probabilities an eviction policy reads: a 256-token prompt's
        return (g(B, H, 256, D), g(B, 2, 256, D)), {"causal": True}
    if op == "dequantize":  # a 4K-token cache of 2 K/V heads of 64 in int4, per-token groups of 32: no gradients
        from kvlab.kernels.quant import quantize

        return (*quantize(torch.randn(B, 2, 4 * T, D, device=device), 4, 32, torch.float32), 4, torch.float32), {}
    if op == "absorbed_attention":
        return (g(B, H, 1, 576), g(B, T, 576), 512), {}
    if op == "linear_attention":
        log_decay = (-torch.rand(B, H, T, device=device) * 0.1).requires_grad_()
        return (g(B, H, T, D, scale=0.3), g(B, H, T, D, scale=0.3), g(B, H, T, D), log_decay), {}
    if op == "delta_rule":
        k = torch.nn.functional.normalize(torch.randn(B, H, T, D, device=device), dim=-1)
        decay = (-torch.rand(B, H, T, D, device=device) * 0.1).requires_grad_()
        eta = torch.rand(B, H, T, D, device=device)  # RWKV-7's in-context learning rate: a = -k eta, b = k eta
        a, b = (-k * eta).requires_grad_(), (k * eta).requires_grad_()
        return (g(B, H, T, D, scale=0.3), k.requires_grad_(), g(B, H, T, D), decay, a, b), {}
    if op == "gated_delta_rule":
        k = torch.nn.functional.normalize(torch.randn(B, H, T, D, device=device), dim=-1).requires_grad_()
        decay = (-torch.rand(B, H, T, device=device)).requires_grad_()
        return (g(B, H, T, D, scale=0.1), k, g(B, H, T, D), decay, torch.rand(B, H, T, device=device)), {}
    if op == "ssd":
        dt = (torch.rand(B, T, H, device=device) * 0.1).requires_grad_()
        return (g(B, T, H, D), dt, (-torch.rand(H, device=device)).requires_grad_(), g(B, T, 1, 64), g(B, T, 1, 64)), {}
    if op == "selective_scan":
        delta = (torch.rand(B, 512, T, device=device) * 0.1).requires_grad_()
        return (g(B, 512, T), delta, (-torch.rand(512, 16, device=device)).requires_grad_(), g(B, 16, T),
                g(B, 16, T)), {}  # fmt: skip
    if op == "diagonal_scan":  # Griffin's RG-LRU: 512 channels, decays as initialised (a^8 of a in [0.9, 0.999])
        return (g(B, T, 512), (-torch.rand(B, T, 512, device=device) * 0.8).requires_grad_()), {}
    if op == "causal_conv1d":
        return (g(B, T, 1024), g(1024, 4), g(1024)), {}
    if op == "rms_norm":
        return (g(B, T, 512), g(512), 1e-5, g(B, T, 512)), {}
    if op == "apply_rope":
        from kvlab.kernels.rope import rope_tables

        cos, sin = rope_tables(D, 10000.0, T, device=device)
        return (g(B, H, T, D), cos, sin), {}
    if op == "linear_cross_entropy":
        labels = torch.randint(0, 32000, (B * 512,), device=device)
        return (g(B * 512, 512), g(32000, 512, scale=0.02), labels), {}
    raise ValueError(op)


def _run(fn, args, kwargs):
    """Outputs (tensors) and the gradients of every grad-requiring input for a fixed random cotangent of the
    first output."""
    out = fn(*args, **kwargs)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None and o.is_floating_point()]
    wanted = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not wanted:  # an op with no differentiable inputs (dequantize): its outputs alone
        return [o.detach() for o in outs]
    # the backward of the main output, as training runs it (a final state, which some backends return
    # detached, feeds only the cache; tests/kernels check its gradients)
    gen = torch.Generator(device=outs[0].device).manual_seed(1)
    cotangent = torch.randn(outs[0].shape, generator=gen, device=outs[0].device, dtype=outs[0].dtype)
    grads = torch.autograd.grad(outs[0], wanted, cotangent, allow_unused=True)
    return [o.detach() for o in outs] + [g for g in grads if g is not None]


def speed(args) -> None:
    device = args.device
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({where})")
    print("| op | backend | fwd+bwd ms | vs reference | max rel. error (bound) |")
    print("|---|---|---:|---:|---|")
    for op in args.ops.split(","):
        torch.manual_seed(0)
        call_args, kwargs = _inputs(op, device)
        fn = getattr(ops, op)
        results = {}
        for backend in registry.ops()[op]:
            with use_kernels(backend):
                if choose(op, call_args, kwargs).name != backend:
                    continue  # not registered, or cannot run these inputs here
                if backend == "triton" and device != "cuda":
                    continue
                outputs = _run(fn, call_args, kwargs)
                seconds = timed(lambda f=fn, a=call_args, k=kwargs: _run(f, a, k), args.repeats)
                results[backend] = (outputs, seconds)
                if backend == "torch" and args.compile:
                    compiled = torch.compile(choose(op, call_args, kwargs).function())
                    start = time.perf_counter()
                    outputs = _run(compiled, call_args, kwargs)
                    first = time.perf_counter() - start
                    seconds = timed(lambda f=compiled, a=call_args, k=kwargs: _run(f, a, k), args.repeats)
                    results[f"torch, compiled (first call {first:.1f} s)"] = (outputs, seconds)
        ref_out, ref_s = results["reference"]
        for backend, (outputs, seconds) in results.items():
            bound = args.bound_half if outputs[0].dtype in (torch.float16, torch.bfloat16) else args.bound
            err = max(rel_error(o, r) for o, r in zip(outputs, ref_out, strict=True))
            ok = err <= bound
            speedup = f"{ref_s / seconds:.1f}x" if ok else "n/a (check failed)"
            verdict = "ok" if ok else "FAIL"
            print(f"| {op} | {backend} | {seconds * 1e3:.1f} | {speedup} | {err:.1e} ({bound:g}) {verdict} |")


def _memory_child(kind: str, vocab: int, tokens: int, dim: int, device: str) -> dict:
    from kvlab.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    torch.manual_seed(0)
    hidden = torch.randn(tokens, dim, device=device, requires_grad=True)
    weight = (torch.randn(vocab, dim, device=device) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    fn = linear_cross_entropy if kind == "fused" else linear_cross_entropy_reference
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = fn(hidden, weight, labels)
    loss.backward()
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"loss": loss.item(), "peak_extra_bytes": peak - base, "grad_hidden": hidden.grad.norm().item(),
            "grad_weight": weight.grad.norm().item()}  # fmt: skip


def memory(args) -> None:
    results = {}
    for kind in ("plain", "fused"):
        cmd = [sys.executable, __file__, "--memory-child", kind, "--vocab", str(args.vocab), "--tokens",
               str(args.tokens), "--dim", str(args.dim), "--device", args.device]  # fmt: skip
        results[kind] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    logits_bytes = args.tokens * args.vocab * 4
    print(f"vocab {args.vocab}, {args.tokens} tokens, d_model {args.dim}, {args.device}; "
          f"float32 logits would take {logits_bytes / 2**20:.0f} MiB")  # fmt: skip
    print("| head + loss | peak memory above inputs | loss | grad norm (hidden, weight) |")
    print("|---|---:|---:|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['peak_extra_bytes'] / 2**20:.0f} MiB | {r['loss']:.6f} | "
              f"{r['grad_hidden']:.6f}, {r['grad_weight']:.6f} |")  # fmt: skip
    p, f = results["plain"], results["fused"]
    same = math.isclose(p["loss"], f["loss"], rel_tol=1e-5) and all(
        math.isclose(p[k], f[k], rel_tol=1e-4) for k in ("grad_hidden", "grad_weight")
    )
    print(f"peak memory {p['peak_extra_bytes'] / max(f['peak_extra_bytes'], 1):.1f}x lower; loss and gradients "
          f"{'equal' if same else 'DIFFER'}")  # fmt: skip


def dispatch_cost(args) -> None:
    import timeit

    x, w = torch.randn(1, 1, 256, device=args.device), torch.ones(256, device=args.device)
    number = 20000

    def per_call(fn) -> float:
        return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6

    backend = choose("rms_norm", (x, w, 1e-6, None)).function()
    direct = per_call(lambda: backend(x, w, 1e-6))
    with use_kernels("auto"):
        inside = per_call(lambda: ops.rms_norm(x, w, 1e-6))
        choice_inside = per_call(lambda: choose("rms_norm", (x, w, 1e-6, None)))
    outside = per_call(lambda: ops.rms_norm(x, w, 1e-6))
    choice_outside = per_call(lambda: choose("rms_norm", (x, w, 1e-6, None)))
    print(f"rms_norm at [1, 1, 256] on {args.device}, us per call (best of 3 x {number}):")
    print("| call | us |\n|---|---:|")
    print(f"| the chosen backend's function, directly | {direct:.2f} |")
    print(f"| through the registry, inside use_kernels | {inside:.2f} |")
    print(f"| through the registry, outside | {outside:.2f} |")
    print(f"| choose alone, inside / outside | {choice_inside:.2f} / {choice_outside:.2f} |")


def bf16_attention(args) -> None:
    import torch.nn.functional as F

    from kvlab.kernels import attention as kernel

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def in_float32(q, k, v):
        return sdpa(q.float(), k.float(), v.float()).to(q.dtype)

    def forward_backward(f, q, k, v, grad):
        f(q, k, v).backward(grad)

    print(f"causal attention forward + backward, bf16 inputs, 2,048 tokens a call, 8 query heads over 2 K/V heads, "
          f"{args.device}, ms (best of {args.repeats})")  # fmt: skip
    print("| head size | positions | batch | SDPA in bf16 | SDPA in float32 | float32 faster | attention takes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for D in (32, 64, 128):
        for T in (128, 256, 512, 1024, 2048):
            B = 2048 // T
            q, k, v = (torch.randn(B, h, T, D, device=args.device, dtype=torch.bfloat16, requires_grad=True)
                       for h in (8, 2, 2))  # fmt: skip
            grad = torch.randn(B, 8, T, D, device=args.device, dtype=torch.bfloat16)
            ms = [timed(functools.partial(forward_backward, f, q, k, v, grad), args.repeats) * 1e3
                  for f in (sdpa, in_float32)]  # fmt: skip
            takes = "float32" if kernel._short_bf16_training_on_cpu(q, k, v) else "bf16"
            print(f"| {D} | {T} | {B} | {ms[0]:.2f} | {ms[1]:.2f} | x{ms[0] / ms[1]:.2f} | {takes} |")


def sink_attention(args) -> None:
    from kvlab.kernels import attention as kernel

    print(f"causal attention with sink logits, forward + backward, float32, 8 query heads of 32 over 2 K/V heads, "
          f"{args.device}, ms (best of {args.repeats})")  # fmt: skip
    print("| positions | batch | sink as a key | scores formed | formed / as a key | no sinks | max difference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for T, B in ((256, 8), (1024, 2), (2048, 1), (4096, 1)):
        q, k, v = (torch.randn(B, h, T, 32, device=args.device, requires_grad=True) for h in (8, 2, 2))
        sinks = torch.randn(8, device=args.device, requires_grad=True)
        runs = {
            "key": functools.partial(kernel._sink_as_key, q, k, v, sinks, None, True, None, None, None),
            "formed": functools.partial(kernel._explicit_attention, q, k, v, None, True, None, None, None, None, sinks),
            "plain": functools.partial(kernel.attention, q, k, v, causal=True),
        }
        difference = (runs["key"]() - runs["formed"]()).abs().max().item()
        ms = {name: timed(lambda f=f: f().sum().backward(), args.repeats) * 1e3 for name, f in runs.items()}
        print(f"| {T} | {B} | {ms['key']:.1f} | {ms['formed']:.1f} | x{ms['formed'] / ms['key']:.1f} | "
              f"{ms['plain']:.1f} | {difference:.1e} |")  # fmt: skip


def gated_deltanet(args) -> None:
    import transformers
    from transformers.models.qwen3_next import modeling_qwen3_next as theirs

    from kvlab.archs.hf_families import _qwen3_next_rows
    from kvlab.kernels.delta_rule import delta_rule_chunked, gated_delta_rule_chunked
    from kvlab.layers.delta_net import GatedDeltaNet, GatedDeltaNetConfig

    B, H, T, D = 8, 4, 256, 64
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, D), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(B, H, T, D, requires_grad=True)
    g = (-torch.rand(B, H, T) * 1.6).requires_grad_()  # up to 16 x softplus(.) ~ 0.1 a token, as initialised
    beta = torch.rand(B, H, T, requires_grad=True)
    runs = {f"WY, chunks of {c}": functools.partial(gated_delta_rule_chunked, q, k, v, g, beta, chunk_size=c)
            for c in (16, 32, 64)}  # fmt: skip

    def generalised():
        written = beta[..., None] * k
        return delta_rule_chunked(q, written, v, g[..., None].expand(-1, -1, -1, D), -g.exp()[..., None] * written, k,
                                  chunk_size=32)  # fmt: skip

    def transformers_torch():  # (it scales the queries by D^-1/2 itself: given q D^1/2)
        out, _ = theirs.torch_chunk_gated_delta_rule(*(x.transpose(1, 2) for x in (q * D**0.5, k, v, g, beta)))
        return out.transpose(1, 2)

    runs |= {"generalised rule, chunks of 32": generalised, "transformers (torch path)": transformers_torch}
    want = runs["WY, chunks of 32"]()[0]
    print(f"gated delta rule, forward + backward, float32, {B} x {T} tokens, {H} heads of {D}, ms (best of "
          f"{args.repeats})\n\n| form | ms | max difference |\n| --- | --- | --- |")  # fmt: skip
    for name, run in runs.items():
        out = run() if name.startswith("transformers") else run()[0]
        ms = timed(lambda r=run, n=name: (r() if n.startswith("transformers") else r()[0]).sum().backward(),
                   args.repeats) * 1e3  # fmt: skip
        print(f"| {name} | {ms:.1f} | {(out - want).abs().max().item():.1e} |")
    cfg = GatedDeltaNetConfig(n_heads=4, n_qk_heads=2, head_dim=64, value_head_dim=64, norm_eps=1e-6)
    ours = GatedDeltaNet(cfg, d_model=256, layer_idx=0, kv_source=0, max_seq_len=T)
    layer = theirs.Qwen3NextGatedDeltaNet(transformers.Qwen3NextConfig(
        hidden_size=256, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
        linear_value_head_dim=64, num_hidden_layers=1, layer_types=["linear_attention"]), 0)  # fmt: skip
    with torch.no_grad():  # our weights in its layouts (as the Qwen3-Next export writes them)
        layer.in_proj_qkvz.weight.copy_(ours.in_proj.weight[_qwen3_next_rows(ours.cfg, "in_proj")])
        layer.in_proj_ba.weight.copy_(ours.beta_decay_proj.weight[_qwen3_next_rows(ours.cfg, "beta_decay_proj")])
        layer.conv1d.weight.copy_(ours.conv_weight[:, None])
        for name in ("dt_bias", "A_log"):
            getattr(layer, name).copy_(getattr(ours, name))
        layer.norm.weight.copy_(ours.norm_weight)
        layer.out_proj.weight.copy_(ours.out_proj.weight)
    x = torch.randn(B, T, 256, requires_grad=True)
    difference = (ours(x) - layer(x)).abs().max().item()
    ms = {name: timed(lambda m=m: m(x).square().sum().backward(), args.repeats) * 1e3
          for name, m in (("kvlab", ours), ("transformers", layer))}  # fmt: skip
    print(f"\nthe layer (d_model 256, 2 query/key heads for 4 value heads of 64), forward + backward: kvlab "
          f"{ms['kvlab']:.1f} ms, transformers {ms['transformers']:.1f} ms, x{ms['transformers'] / ms['kvlab']:.2f}; "
          f"max difference {difference:.1e}")  # fmt: skip


def hard_decays(args) -> None:
    import math

    from kvlab import build_model
    from kvlab.archs.config import ModelConfig
    from kvlab.kernels.linear_attention import decayed_products

    B, H, N, C, D = 8, 4, 8, 32, 64
    x, y = (torch.randn(B, H, N, C, D, requires_grad=True) for _ in range(2))
    visible = torch.ones(C, C, dtype=torch.bool).tril()
    print(f"decayed_products, forward + backward, [{B}, {H}, {N}, {C}, {D}], float32, ms (best of {args.repeats})\n")
    print("| decays a token | ms |\n| --- | --- |")
    for name, scale in (("down to -0.05 (factored whole)", 0.05), ("down to -4 (block by block)", 4.0)):
        cum = (-torch.rand(B, H, N, C, D) * scale).cumsum(-2)
        ms = timed(lambda c=cum: decayed_products(x, y, c, c, visible).sum().backward(), args.repeats) * 1e3
        print(f"| {name} | {ms:.1f} |")
    print("\n| kimi_linear training step, 8 x 256 tokens | tokens/s |\n| --- | --- |")
    for hard in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_yaml("configs/model/kimi_linear.yaml").to_dict()).train()
        if hard:  # as a trained model's fastest channels: half of them at -1 a token
            with torch.no_grad():
                for layer in model.layers:
                    if hasattr(layer.mixer, "decay_up"):
                        layer.mixer.A_log.fill_(math.log(4.0))
                        layer.mixer.dt_bias[::2].fill_(0.0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, 4096, (8, 256))

        def step(m=model, o=opt, ids=ids):
            m(ids, labels=ids).backward()
            o.step()
            o.zero_grad(set_to_none=True)

        seconds = timed(step, args.repeats)
        print(f"| {'half the channels at -1 a token' if hard else 'as initialised'} | {ids.numel() / seconds:,.0f} |")


def diagonal_scan(args) -> None:
    import transformers
    from transformers.models.recurrent_gemma import modeling_recurrent_gemma as theirs

    from kvlab.kernels.diagonal_scan import diagonal_scan_reference
    from kvlab.kernels.linear_attention import linear_attention_chunked
    from kvlab.layers.rglru import RGLRU, RGLRUConfig

    B, T, W = 8, 256, 256
    x = torch.randn(B, T, W, requires_grad=True)
    g = (-torch.rand(B, T, W) * 0.8).requires_grad_()  # -8 r softplus(-Lambda): a^8 r, a in [0.9, 0.999], r in (0, 1)
    ones = torch.ones(B, 1, T, 1)

    def channels_as_heads(chunk):
        out, _ = linear_attention_chunked(ones, ones, x.transpose(1, 2)[..., None], g.transpose(1, 2),
                                          chunk_size=chunk)  # fmt: skip
        return out[..., 0].transpose(1, 2)

    def transformers_scan():
        out, _ = theirs.RecurrentGemmaRglru._rnn_scan(None, x, g.exp(), torch.zeros(B, T, 1, dtype=torch.bool), None)
        return out

    runs = {"diagonal_scan (Hillis and Steele)": lambda: ops.diagonal_scan(x, g)[0],
            "token loop (its reference)": lambda: diagonal_scan_reference(x, g)[0],
            **{f"linear attention, a channel a head, chunks of {c}": functools.partial(channels_as_heads, c)
               for c in (8, 16, 64)},
            "transformers (RecurrentGemma's scan)": transformers_scan}  # fmt: skip
    want = runs["token loop (its reference)"]()
    print(f"diagonal recurrence, forward + backward, float32, {B} x {T} tokens, {W} channels, ms (best of "
          f"{args.repeats})\n\n| form | ms | max difference |\n| --- | --- | --- |")  # fmt: skip
    for name, run in runs.items():
        ms = timed(lambda r=run: r().sum().backward(), args.repeats) * 1e3
        print(f"| {name} | {ms:.1f} | {(run() - want).abs().max().item():.1e} |")
    ours = RGLRU(RGLRUConfig(width=W, n_heads=8), d_model=256, layer_idx=0, kv_source=0, max_seq_len=T)
    config = transformers.RecurrentGemmaConfig(hidden_size=256, lru_width=W, num_attention_heads=8,
                                               num_hidden_layers=1)  # fmt: skip
    block = theirs.RecurrentGemmaRecurrentBlock(config, 0)
    with torch.no_grad():  # our weights in its layouts (as the RecurrentGemma export writes them)
        for part, linear in (("linear_y", 0), ("linear_x", 1)):
            getattr(block, part).weight.copy_(ours.in_proj.weight.chunk(2)[linear])
            getattr(block, part).bias.copy_(ours.in_proj.bias.chunk(2)[linear])
        block.linear_out.load_state_dict(ours.out_proj.state_dict())
        block.conv_1d.weight.copy_(ours.conv_weight[:, None])
        block.conv_1d.bias.copy_(ours.conv_bias)
        lru = block.rg_lru
        for mine, its in (("input_gate", "input_gate"), ("recurrence_gate", "recurrent_gate")):
            getattr(lru, f"{its}_weight").copy_(getattr(ours, f"{mine}_weight"))
            getattr(lru, f"{its}_bias").copy_(getattr(ours, f"{mine}_bias"))
        lru.recurrent_param.copy_(-ours.decay_logit)
    h = torch.randn(B, T, 256, requires_grad=True)
    positions = torch.arange(T)[None].expand(B, T)

    def its(h=h):
        return block(h, positions, None, use_cache=False)[0]

    difference = (ours(h) - its()).abs().max().item()
    ms = {name: timed(lambda f=f: f().square().sum().backward(), args.repeats) * 1e3
          for name, f in (("kvlab", lambda: ours(h)), ("transformers", its))}  # fmt: skip
    print(f"\nthe recurrent block (d_model and width 256, gates in 8 blocks), forward + backward: kvlab "
          f"{ms['kvlab']:.1f} ms, transformers {ms['transformers']:.1f} ms, x{ms['transformers'] / ms['kvlab']:.2f}; "
          f"max difference {difference:.1e}")  # fmt: skip


def lightning(args) -> None:
    import transformers
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    from kvlab.layers.retention import LightningAttention, LightningConfig

    B, T, d, H = 8, 256, 256, 8
    config = transformers.MiniMaxConfig(hidden_size=d, num_attention_heads=H, head_dim=d // H, num_hidden_layers=8,
                                        layer_types=["linear_attention"] * 8, block_size=256)  # fmt: skip
    theirs = MiniMaxLightningAttention(config, 1)
    x = torch.randn(B, T, d, requires_grad=True)
    runs = {}
    for chunk in (32, 64, 128, 256):
        ours = LightningAttention(LightningConfig(n_heads=H, chunk_size=chunk), d_model=d, layer_idx=1, kv_source=1,
                                  max_seq_len=T, n_layers=8)  # fmt: skip
        weights = {name: getattr(theirs, name).weight for name in ("output_gate", "norm", "out_proj")}
        ours.load_state_dict(
            {"in_proj.weight": theirs.qkv_proj.weight} | {f"{n}.weight": w for n, w in weights.items()}
        )
        runs[f"kvlab, chunks of {chunk}"] = ours
    runs["transformers (256-token blocks)"] = lambda h: theirs(h, None, None)[0]
    want = runs["transformers (256-token blocks)"](x)
    print(f"lightning attention, forward + backward, float32, {B} x {T} tokens, d_model {d}, {H} heads, ms (best of "
          f"{args.repeats})\n\n| form | ms | max difference |\n| --- | --- | --- |")  # fmt: skip
    for name, run in runs.items():
        ms = timed(lambda r=run: r(x).square().sum().backward(), args.repeats) * 1e3
        print(f"| {name} | {ms:.1f} | {(run(x) - want).abs().max().item():.1e} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bound", type=float, default=1e-4, help="relative error bound, float32")
    p.add_argument("--bound-half", type=float, default=2e-2)
    p.add_argument("--compile", action="store_true", help="also time the torch backend under torch.compile")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--dispatch", action="store_true", help="the registry's cost per op call")
    p.add_argument("--bf16-attention", action="store_true", help="bf16 training attention: SDPA vs float32 copies")
    p.add_argument("--sink-attention", action="store_true", help="sink logits: as a key vs their scores formed")
    p.add_argument("--gated-deltanet", action="store_true", help="gated DeltaNet's rule and layer vs transformers'")
    p.add_argument("--hard-decays", action="store_true", help="decayed_products factored whole vs block by block")
    p.add_argument("--diagonal-scan", action="store_true", help="Griffin's recurrence: the scan vs other forms")
    p.add_argument("--lightning", action="store_true", help="MiniMax-01's lightning attention vs transformers'")
    p.add_argument("--memory-child", choices=["plain", "fused"])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    args = p.parse_args()
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child, args.vocab, args.tokens, args.dim, args.device)))
    elif args.memory:
        memory(args)
    elif args.dispatch:
        dispatch_cost(args)
    elif args.bf16_attention:
        bf16_attention(args)
    elif args.sink_attention:
        sink_attention(args)
    elif args.gated_deltanet:
        gated_deltanet(args)
    elif args.hard_decays:
        hard_decays(args)
    elif args.diagonal_scan:
        diagonal_scan(args)
    elif args.lightning:
        lightning(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
