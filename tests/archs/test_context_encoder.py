"""Context encoders read by cross-attention (CEPE, XC-Cache): the layers against float64 transcriptions of the
papers' code, the plain decoder as the zero case, decoding from the cached encoder states, the footprint, and
the errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kvlab.archs.model import build_model
from kvlab.layers.base import StepState
from tests.conftest import preset_dict, tiny

CEPE = {"encoder": "separate", "encoder_layers": 1, "encoder_d_model": 32, "encoder_heads": 2, "chunk": 5}
XC = {"encoder": "decoder", "cross": "block", "cross_rope": True, "shared_cross": True, "cross_layers": [1, 3],
      "cross_heads": 4}  # fmt: skip


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / (x.square().mean(-1, keepdim=True) + eps).sqrt() * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama's rotate-half RoPE of x [B, H, T, d] at ``positions`` [T], in x's dtype."""
    d = x.shape[-1]
    angles = positions.to(x.dtype)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)[None]
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1) * sin


def _cross(attn, x: torch.Tensor, states: torch.Tensor, q_pos=None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V over every state, Q = x W_q, K = E W_k, V = E W_v (per head), then W_o; with
    ``q_pos``, RoPE on Q at q_pos and on K at 0..S-1."""
    B, T, _ = x.shape
    S, H = states.shape[1], attn.n_heads
    q = (x @ attn.q_proj.weight.T).view(B, T, H, -1).transpose(1, 2)
    k = (states @ attn.k_proj.weight.T).view(B, S, H, -1).transpose(1, 2)
    v = (states @ attn.v_proj.weight.T).view(B, S, H, -1).transpose(1, 2)
    if q_pos is not None:
        q, k = _rope(q, q_pos), _rope(k, torch.arange(S))
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(B, T, -1) @ attn.o_proj.weight.T


def _swiglu(mlp, x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def test_cepe_layer_cross_attends_between_self_attention_and_the_mlp():
    """CEPE's decoder layer (its code's LlamaDecoderLayer with do_cross_attention): h = x + SelfAttn(norm(x));
    h = h + CrossAttn(norm_c(h), E) with no positions; out = h + MLP(norm(h))."""
    model = build_model(tiny(n_layers=1, context=CEPE)).double().eval()
    layer = model.layers[0]
    x, states = torch.randn(2, 7, 64, dtype=torch.float64), torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x, StepState(context=states))
        h = x + layer.mixer(_rms(x, layer.mixer_norm.weight))  # the self-attention (tested on its own elsewhere)
        h = h + _cross(layer.cross, _rms(h, layer.cross_norm.weight), states)
        want = h + _swiglu(layer.mlp, _rms(h, layer.mlp_norm.weight))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # in float64 throughout


def test_cepe_encoder_is_bidirectional_within_a_chunk_and_chunks_are_independent():
    """CEPE encodes each chunk alone (positions from 0 in each), every token seeing its whole chunk."""
    model = build_model(tiny(context=CEPE)).double().eval()
    ctx = torch.randint(0, 97, (1, 12))  # chunks of 5: [0, 5), [5, 10), [10, 12)
    other = ctx.clone()
    other[0, 7] = (ctx[0, 7] + 1) % 97
    with torch.no_grad():
        a, b = model.encode_context(ctx), model.encode_context(other)
        alone = model.context_encoder(ctx[:, 5:10])
    changed = ((a - b).abs().amax(-1) > 0)[0].tolist()
    assert changed == [False] * 5 + [True] * 5 + [False] * 2  # the whole chunk (before the token too), only it
    torch.testing.assert_close(a[:, 5:10], alone, rtol=0, atol=1e-12)


def test_xc_llama_block_runs_before_the_layer_with_rope_on_both_sides():
    """XC-Llama's CrossAttnLlamaBlock before the decoder layer: h = x + CrossAttn(norm(x), E), queries turned at
    their decoder positions and keys at the context's 0..S-1; h = h + MLP(norm(h)); then the layer. The encoder
    is the decoder itself, frozen: its final normalised states over the context."""
    model = build_model(tiny(context=XC)).double().eval()
    assert model.layers[1].cross_block is None and model.layers[1].__dict__["_shared_cross_block"] is (
        model.shared_cross_block
    )
    block = model.shared_cross_block
    ids, ctx = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 8))
    with torch.no_grad():  # the plain decoder over the context (no context of its own: no cross blocks)
        states = model._output(model._stack(model.embed_tokens(ctx), StepState(), None, False), head=False)
    inputs = {}
    layer = model.layers[3]
    layer.register_forward_pre_hook(lambda _m, args: inputs.__setitem__("layer", args[0]))
    layer.mixer.register_forward_pre_hook(lambda _m, args: inputs.__setitem__("mixer", args[0]))
    with torch.no_grad():
        model(ids, context=ctx)
        x = inputs["layer"]
        h = x + _cross(block.cross, _rms(x, block.cross_norm.weight), states, q_pos=torch.arange(6))
        h = h + _swiglu(block.mlp, _rms(h, block.mlp_norm.weight))
    torch.testing.assert_close(inputs["mixer"], _rms(h, layer.mixer_norm.weight), rtol=1e-12, atol=1e-12)
    assert not model.encode_context(ctx).requires_grad  # no gradient reaches the decoder through the context


@pytest.mark.parametrize("context", [CEPE, XC], ids=["cepe", "xc_cache"])
def test_zeroed_cross_attention_is_the_plain_decoder(context):
    """With the cross-attention's output projection (and XC's block MLP) at zero, the model with a context
    computes what the decoder without one does, which is the plain model with the same weights."""
    model = build_model(tiny(context=context)).double().eval()
    plain = build_model(tiny()).double().eval()
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross.o_proj.weight", "cross_block.mlp.down_proj.weight")):
                p.zero_()
        ids, ctx = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 7))
        assert (model(ids, context=ctx) - plain(ids)).abs().max() < 1e-12
        assert (model(ids) - plain(ids)).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["cepe", "xc_cache"])
def test_presets_decode_from_the_cached_encoder_states(name):
    """decode == forward with a context; the cache holds the encoder's states and nothing else of the context,
    byte for byte what the footprint says (held and allocated)."""
    spec = preset_dict(name) | {"d_model": 64, "n_layers": 6, "vocab_size": 97, "max_seq_len": 32,
                                "mlp": {"kind": "swiglu", "hidden": 96}}  # fmt: skip
    spec["mixer"] = spec["mixer"] | {"n_heads": 4, "n_kv_heads": 4, "head_dim": 16}
    spec["context"] = (
        spec["context"]
        | {"cross_heads": 4, "max_len": 40}
        | ({"encoder_d_model": 32, "encoder_hidden": 64, "chunk": 6} if name == "cepe" else {})
    )
    model = build_model(spec).double().eval()
    ids, ctx = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        full = model(ids, context=ctx)
        assert (full - model(ids)).abs().max() > 1e-3  # the context is read
        cache = model.new_cache(2, 16, dtype=torch.float64, context_len=20)
        steps = [model(ids[:, :4], cache=cache, context=ctx)] + [model(ids[:, t : t + 1], cache=cache)
                                                                 for t in range(4, 10)]  # fmt: skip
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-10
    fp = model.kv_footprint(torch.float64)
    assert fp.context_bytes_per_token == (32 if name == "cepe" else 64) * 8
    assert cache.nbytes() == fp.total_bytes(10, 2, context_len=15)
    assert cache.allocated_bytes() == fp.total_bytes(16, 2, context_len=20)
    assert "bytes per context token" in fp.table()
    with torch.no_grad():
        out = model.generate(ids[:, :4], 6, context=ctx)
    assert torch.equal(out[:, :4], ids[:, :4]) and out.shape == (2, 10)
    cache.reset()
    assert cache.context_len == 0 and cache.nbytes() == 0


def test_bad_contexts_name_the_field():
    for bad, message in [
        ({"cross_layers": [4]}, r"context.cross_layers\[0\]=4: there is no layer 4"),
        ({"cross": "sublayer", "shared_cross": True}, "context.shared_cross=true shares a cross block"),
        ({"encoder": "decoder", "encoder_layers": 2}, "context.encoder_layers is set but context.encoder=decoder"),
        ({"encoder": "lstm"}, "context.encoder"),
        ({"encoder_d_model": 30, "encoder_heads": 4}, "context.encoder_heads=4 must divide encoder_d_model=30"),
        ({"cross_heads": 5}, "context.cross_heads=5 must divide d_model=64"),
        ({"encoder": "decoder", "chunk": 65}, "context.chunk=65: the decoder encodes that many tokens at once"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_model(tiny(context=bad))
    model = build_model(tiny(context=CEPE))
    ids, ctx = torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 6))
    with pytest.raises(ValueError, match="this model has no context encoder"):
        build_model(tiny())(ids, context=ctx)
    with pytest.raises(ValueError, match="context cannot be combined with doc_ids"):
        model(ids, context=ctx, doc_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="context has 2 rows but input_ids has 1"):
        model(ids, context=ctx.repeat(2, 1))
    with pytest.raises(ValueError, match="context of 2048 tokens exceeds context.max_len=1024"):
        model(ids, context=torch.zeros(1, 2048, dtype=torch.long))
    with pytest.raises(ValueError, match="context of 80 tokens: the decoder encodes it at once, beyond its max_seq"):
        build_model(tiny(context=XC))(ids, context=torch.zeros(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match="context_len=2000 exceeds context.max_len=1024"):
        model.new_cache(1, 8, context_len=2000)
    cache = model.new_cache(1, 8, context_len=4)
    with pytest.raises(ValueError, match="context of 6 tokens exceeds the cache's context_len=4"):
        model(ids, cache=cache, context=ctx)
    cache = model.new_cache(1, 8)
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="give the context with the first tokens of an empty cache"):
        model(ids, cache=cache, context=ctx)


@pytest.mark.parametrize("context", [CEPE, XC], ids=["cepe", "xc_cache"])
def test_the_static_decode_step_reads_the_context_from_the_cache(context):
    """decode_step (what generate compiles) takes no context argument: the cache serves the encoded states."""
    model = build_model(tiny(context=context | {"max_len": 40})).eval()
    ids, ctx = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = model(ids, context=ctx)
        cache = model.new_cache(2, 16, context_len=16)
        steps = [model(ids[:, :3], cache=cache, context=ctx)]
        for t in range(3, 9):
            steps.append(model.decode_step(ids[:, t : t + 1], cache, torch.tensor(cache.seen))[:, None])
            cache.seen += 1
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    with torch.no_grad():  # a cache of another dtype keeps the states in it and serves them in the model's
        cache = model.new_cache(2, 16, dtype=torch.bfloat16, context_len=16)
        model(ids[:, :3], cache=cache, context=ctx)
        step = model.decode_step(ids[:, 3:4], cache, torch.tensor(cache.seen))
    assert cache.context.dtype == torch.bfloat16 and (step - full[:, 3]).abs().max() < 0.1


@pytest.mark.parametrize("context", [CEPE, XC], ids=["cepe", "xc"])
@pytest.mark.parametrize("how", ["checkpointed", "compiled"])
def test_checkpointing_and_compiling_reach_the_encoder_and_give_the_same_step(context, how, monkeypatch):
    """CEPE's encoder layers are checkpointed and compiled too, as the trainer asks (a context is often longer
    than its rows), with the loss and gradients of the plain step in float64 (compiled: Dynamo's graphs alone,
    which run eager's ops); XC-Llama's encoder is the frozen decoder, run without gradients."""
    import kvlab.archs.model as model_module
    import kvlab.layers.cross_attention as cross

    calls = []
    if how == "checkpointed":
        real = cross.checkpoint
        monkeypatch.setattr(cross, "checkpoint", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    else:
        real = model_module.compiled_block
        monkeypatch.setattr(model_module, "compiled_block", lambda layer, b: calls.append(layer) or real(layer, b))
    torch.manual_seed(0)
    base = build_model(tiny(context=context)).double().train()
    ids, ctx = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 12))
    steps = []
    for on in (False, True):
        model = copy.deepcopy(base)
        if how == "checkpointed":
            model.activation_checkpointing = on
        else:
            model.compile_blocks = "eager" if on else None
        calls.clear()
        loss = model(ids[:, :-1], labels=ids[:, 1:], context=ctx)
        loss.backward()
        steps.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    # CEPE: two passes of its layers, the two whole chunks of 5 batched and the last 2 tokens
    encoder = list(model.context_encoder.layers) if context is CEPE else []
    assert [c for c in calls if any(c is e for e in encoder)] == encoder * 2
    (loss, grads), (loss_c, grads_c) = steps
    torch.testing.assert_close(loss_c, loss, atol=1e-13, rtol=1e-13)
    assert grads.keys() == grads_c.keys()
    for n, g in grads.items():
        torch.testing.assert_close(grads_c[n], g, atol=1e-12, rtol=1e-10, msg=n)
