"""Prefill + token-by-token decode must give the logits of one full forward."""

import pytest
import torch

from kvlab import build_model
from tests.conftest import PRESETS, preset_dict, tiny

VARIANTS = {
    "mha": tiny(mixer={"kind": "attention", "n_heads": 4}),
    "gqa": tiny(),
    "gqa_qk_norm": tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True}),  # Qwen3's
    "mqa": tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 1}),
    "window": tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 5}),
    "partial_rope": tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "rope_dims": 8}),
    "bias_tied": tiny(mixer={"kind": "attention", "n_heads": 4, "qkv_bias": True}, tie_embeddings=True),
    "cla2": tiny(kv_sharing={"kind": "cla", "every": 2}),
    "wgqa_cla": tiny(
        mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "kv_merge": 2, "qkv_bias": True},
        kv_sharing={"kind": "cla", "every": 2},
    ),  # fmt: skip
    "kv_source": tiny(kv_source=[0, 0, 0, 3]),
    "uneven_groups_cla": tiny(  # 3 K/V heads for 4 query heads, in groups of 1, 1 and 2
        mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 3, "kv_groups": [0, 2, 1, 2]},
        kv_sharing={"kind": "cla", "every": 2},
    ),
    "kdgqa_cla": tiny(  # query heads split by key norms, per query; readers split by the owner's keys
        mixer={"kind": "attention", "n_heads": 6, "n_kv_heads": 3, "head_dim": 8, "query_allocation": "kdgqa"},
        kv_sharing={"kind": "cla", "every": 2},
    ),
    "matryoshka": tiny(  # key ranks per K/V head (cached packed), one value rank (the preset has uniform ranks)
        mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "kv_ranks": [4, 8, 16], "kv_rank": [[8, 16], 4]}
    ),  # fmt: skip
    "dha_cla": tiny(  # 2 key heads and 3 value heads for 6 query heads, each grouped its own way; CLA readers
        mixer={
            "kind": "attention",
            "n_heads": 6,
            "head_dim": 8,
            "n_kv_heads": 2,
            "kv_groups": [0, 1, 1, 0, 1, 1],
            "n_v_heads": 3,
            "v_groups": [2, 0, 1, 1, 0, 2],
        },
        kv_sharing={"kind": "cla", "every": 2},
    ),  # fmt: skip
    "dgqa": tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "query_allocation": "dgqa"}),
    "gqkva_cla": tiny(  # 2 query heads x 2 K/V heads = 4 attention heads
        mixer={"kind": "attention", "n_heads": 4, "n_q_heads": 2, "n_kv_heads": 2},
        kv_sharing={"kind": "cla", "every": 2},
    ),
    "gemma2_softcaps": tiny(  # Gemma 2's parts: sandwich norms, windows on every other layer, capped scores and logits
        mixer=None,
        pattern="LG",
        post_norms=True,
        norm={"kind": "rmsnorm", "unit_offset": True},
        embed_scale=8.0,
        mlp={"kind": "geglu", "hidden": 96},
        logit_softcap=0.5,
        mixers={
            "L": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 5, "softcap": 0.2},
            "G": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "softcap": 0.2},
        },
    ),  # fmt: skip
    "gpt_oss": tiny(  # gpt-oss's parts: learned sinks, windows on every other layer; experts with biases, clamped
        mixer=None,
        pattern="LG",
        mixers={
            "L": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 5, "learned_sinks": True},
            "G": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "learned_sinks": True, "qkv_bias": True},
        },
        mlp={"kind": "moe", "hidden": 32, "n_experts": 4, "top_k": 2, "bias": True, "swiglu_limit": 0.05},
    ),
    "mla": tiny(mixer={"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 24}),
    "mla_q_lora": tiny(
        mixer={"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 24, "q_lora_rank": 32}
    ),
    "mla_mha2mla_form": tiny(  # per-KV-head RoPE keys at picked frequencies, no latent norm, wider values
        mixer={
            "kind": "mla",
            "n_heads": 4,
            "head_dim": 8,
            "v_head_dim": 16,
            "rope_head_dim": 8,
            "rope_kv_heads": 2,
            "rope_spectrum": 16,
            "kv_lora_rank": 24,
            "latent_norm": False,
        }
    ),  # fmt: skip
    "mla_cla": tiny(  # pairs of layers share one cached latent, each decompressing it its own way
        mixer={"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 24},
        kv_sharing={"kind": "cla", "every": 2},
    ),
    "clla": tiny(  # CLLA-quant: latents shared by layer pairs, cached as 4-bit codes in groups of 8 channels
        mixer={
            "kind": "mla",
            "n_heads": 4,
            "head_dim": 16,
            "rope_head_dim": 8,
            "kv_lora_rank": 24,
            "latent_bits": 4,
            "latent_group": 8,
        },
        kv_sharing={"kind": "cla", "every": 2},
    ),  # fmt: skip
    "rwkv6_shared_mla": tiny(  # RWKV-6 below; one compressed latent computed by layer 2, read by layers 2 and 3
        mixer=None,
        pattern="RRMM",
        mixers={
            "R": {"kind": "rwkv6", "head_dim": 16, "chunk_size": 4},
            "M": {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 8},
        },
        kv_source=[0, 1, 2, 2],
    ),
    "hybrid_mla_window": tiny(
        mixer=None,
        pattern="MW",
        mixers={
            "M": {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 24},
            "W": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 3},
        },
    ),
    "infini": tiny(mixer={"kind": "infini", "n_heads": 4, "n_kv_heads": 2, "segment_len": 5}),
    "infini_linear_mha": tiny(mixer={"kind": "infini", "n_heads": 4, "segment_len": 4, "update": "linear"}),
    "hybrid_infini_gqa": tiny(
        mixer=None,
        pattern="IA",
        mixers={"I": {"kind": "infini", "n_heads": 4, "segment_len": 6}, "A": {"kind": "attention", "n_heads": 4}},
    ),
    "svformer_cla": tiny(  # keys per layer (shared in pairs), one V: layer 0's
        mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "value_residual": "svformer"},
        kv_sharing={"kind": "cla", "every": 2},
    ),
    "resformer_window": tiny(
        mixer={
            "kind": "attention",
            "n_heads": 4,
            "n_kv_heads": 2,
            "window": 5,
            "value_residual": "resformer",
            "value_mix": 0.3,
        }
    ),  # fmt: skip
    "lckv": tiny(kv_sharing={"kind": "lckv", "warmup": 1, "iterations": 24}),  # passes >= tokens: exact
    "yoco_swa": tiny(
        mixer=None,
        pattern="SSCC",
        mixers={
            "S": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 3},
            "C": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        },
        kv_sharing={"kind": "yoco"},
    ),
    "retnet": tiny(mixer={"kind": "retention", "n_heads": 4, "v_head_dim": 24, "chunk_size": 4}),
    "gated_retention": tiny(mixer={"kind": "retention", "n_heads": 2, "decay": "gated", "chunk_size": 5}),
    "yoco_gret": tiny(
        mixer=None,
        pattern="RRCC",
        mixers={
            "R": {"kind": "retention", "n_heads": 4, "decay": "gated", "chunk_size": 4},
            "C": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        },
        kv_sharing={"kind": "yoco"},
    ),
    "mamba2": tiny(mixer={"kind": "mamba2", "head_dim": 16, "state_dim": 8, "n_groups": 2, "chunk_size": 4}),
    "mamba": tiny(mixer={"kind": "mamba", "state_dim": 4, "expand": 1, "chunk_size": 4}),
    "mamba_moe": tiny(  # Jamba's pieces: Mamba with its inner norms, a mixture of experts MLP
        mixer={"kind": "mamba", "state_dim": 4, "expand": 1, "inner_norms": True},
        mlp={"kind": "moe", "hidden": 16, "n_experts": 4, "top_k": 2},
    ),
    # MixCon's Mamba and its output maps; their first, u (W_s u + b_s), is quadratic in the small outputs of a
    # model at its init scale, so a larger one lets the tokens' mixing show
    "conba": tiny(mixer={"kind": "conba", "state_dim": 4, "expand": 1}, init_std=0.05),
    "griffin": tiny(  # Griffin's layers: RG-LRU, local MQA (RecurrentGemma's parts); the RG-LRU on top (last_only)
        mixer=None,
        pattern="RAR",
        n_layers=3,
        mixers={
            "R": {"kind": "rglru", "width": 48},
            "A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 5, "rope_dims": 8, "o_bias": True},
        },
        mlp={"kind": "geglu", "hidden": 96, "bias": True},
        norm={"kind": "rmsnorm", "eps": 1e-6, "unit_offset": True},
        embed_scale=8.0,
        logit_softcap=30.0,
    ),
    "lfm2": tiny(  # LFM2's layers: gated short convolutions and GQA with query/key norms; a convolution on top
        mixer=None,
        pattern="CAC",
        n_layers=3,
        mixers={
            "C": {"kind": "short_conv", "bias": True},
            "A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
        },
    ),
    "minimax": tiny(  # MiniMax-01's: lightning attention beside GQA, experts, the normalised residual scaled
        mixer=None,
        pattern="LAL",
        n_layers=3,
        mixers={
            "L": {"kind": "lightning", "n_heads": 4, "chunk_size": 4},
            "A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        },
        mlp={"kind": "moe", "hidden": 16, "n_experts": 4, "top_k": 2, "norm_topk": True},
        normed_residual=True,
        residual_alpha=1.7,
    ),
    "falcon_h1": tiny(  # Falcon-H1's layer: attention and Mamba-2 (its own width) added
        mixer={
            "kind": "parallel",
            "combine": "sum",
            "mixers": [
                {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
                {"kind": "mamba2", "head_dim": 16, "state_dim": 8, "inner": 48, "chunk_size": 4},
            ],
        },
    ),
    "olmo_hybrid": tiny(  # OLMo Hybrid's: gated DeltaNet in Llama's block, attention in OLMo 2's
        mixer=None,
        pattern="DAD",
        n_layers=3,
        norm_pattern="POP",
        mixers={
            "D": {
                "kind": "gated_deltanet",
                "n_heads": 4,
                "head_dim": 16,
                "negative_eigenvalues": True,
                "chunk_size": 4,
            },
            "A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qk_norm_over": "projection"},
        },
    ),
    "kda": tiny(  # Kimi's KDA (a decay per key channel, low-rank sigmoid gate) in both layers
        n_layers=2,
        mixer={
            "kind": "gated_deltanet",
            "n_heads": 4,
            "head_dim": 16,
            "decay": "channel",
            "gate_rank": 16,
            "gate_activation": "sigmoid",
            "chunk_size": 4,
        },
    ),
    "hybrid_mamba2_window": tiny(  # Samba's layout
        mixer=None,
        pattern="MW",
        mixers={
            "M": {"kind": "mamba2", "head_dim": 32, "state_dim": 8, "conv_kernel": 3, "chunk_size": 8},
            "W": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 4},
        },
    ),
    "rwkv6": tiny(
        mixer={"kind": "rwkv6", "head_dim": 16, "mix_lora_rank": 4, "decay_lora_rank": 8, "chunk_size": 4},
        mlp={"kind": "rwkv_channel_mix", "hidden": 96},
    ),
    "rwkv7": tiny(
        mixer={
            "kind": "rwkv7",
            "head_dim": 16,
            "decay_lora_rank": 8,
            "lr_lora_rank": 8,
            "value_lora_rank": 4,
            "gate_lora_rank": 8,
            "chunk_size": 4,
        },
        mlp={"kind": "rwkv_channel_mix", "hidden": 96},
    ),  # fmt: skip
    "hybrid_rwkv7_window": tiny(
        mixer=None,
        pattern="RW",
        mixers={
            "R": {"kind": "rwkv7", "head_dim": 32, "chunk_size": 5},
            "W": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 4},
        },
    ),
    "hybrid_rwkv6_gqa_swiglu": tiny(  # GoldFinch-like: RWKV-6 layers below attention
        mixer=None,
        pattern="RRA",
        mixers={"R": {"kind": "rwkv6", "head_dim": 32, "chunk_size": 5}, "A": {"kind": "attention", "n_heads": 4}},
    ),
    "gau_flash": tiny(  # larger weights: relu^2 attention is faint at the usual init
        mixer={"kind": "gau", "qk_dim": 16, "chunk_size": 5}, mlp={"kind": "none"}, n_layers=6, init_std=0.05
    ),
    "hybrid_gau_gqa": tiny(
        mixer=None,
        pattern="GA",
        mixers={
            "G": {"kind": "gau", "qk_dim": 8, "expand": 1, "chunk_size": 4},
            "A": {"kind": "attention", "n_heads": 4},
        },
        init_std=0.1,
    ),
    "hymba_heads": tiny(  # attention and SSM heads side by side; full attention in layer 0, windows above
        mixer=None,
        pattern="FSS",
        mixers={
            "F": {
                "kind": "parallel",
                "mixers": [
                    {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
                    {"kind": "mamba2", "head_dim": 16, "state_dim": 8, "expand": 1},
                ],
            },
            "S": {
                "kind": "parallel",
                "mixers": [
                    {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 4},
                    {"kind": "retention", "n_heads": 2, "chunk_size": 4},
                ],
            },
        },
    ),  # fmt: skip
    "hymba": tiny(  # Hymba's layer: one output projection after the normalised branches, wider values; meta
        # tokens, which windows keep in view (sinks); layer 2 reads layer 1's K/V, as consecutive SWA layers do
        mixer=None,
        pattern="FSS",
        kv_source=[0, 1, 1],
        n_layers=3,
        meta_tokens=3,
        mixers={
            kind: {
                "kind": "parallel",
                "shared_output": True,
                "mixers": [
                    {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "v_head_dim": 32, **window},
                    {"kind": "mamba", "state_dim": 4, "expand": 2, "inner_norms": True},
                ],
            }
            for kind, window in (("F", {}), ("S", {"window": 4, "sinks": 3}))
        },
    ),
    "hybrid_window": tiny(
        mixer=None,
        pattern="WWG",
        mixers={
            "W": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 3},
            "G": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
        },
    ),
}


def _model(spec):
    return build_model(spec).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prefill", [0, 1, 7])
def test_decode_matches_forward(name, prefill):
    """In float32, and with a prefill of 7 in float64, where every path computes in float64 (RoPE's tables and
    RetNet's decays as well): the two then agree to float64's rounding, not float32's."""
    dtype = torch.float64 if prefill == 7 else torch.float32
    model = _model(VARIANTS[name]).to(dtype)
    ids = torch.randint(0, 97, (2, 19))  # batch of 2 different prompts
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=32, dtype=dtype)
        steps = [model(ids[:, :prefill], cache=cache)] if prefill else []
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, 19)]
    assert cache.seen == 19 and full.dtype == dtype
    assert (torch.cat(steps, dim=1) - full).abs().max() <= (1e-11 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_prefill_matches_forward(name):
    """Several tokens at a time after a non-empty cache (windows wrap around the ring; the last piece, over twice
    a window, runs block by block, a sink ring's included)."""
    model = _model(VARIANTS[name])
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=23)
        chunks, start = [], 0
        for size in [4, 2, 6, 1, 10]:
            chunks.append(model(ids[:, start : start + size], cache=cache))
            start += size
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["mla", "mla_q_lora", "mla_cla", "clla"])
def test_mla_attends_a_prompt_on_a_filled_cache_expanded_as_it_does_absorbed(name, monkeypatch):
    """From ``EXPANDED_FROM`` queries over a filled cache, MLA decompresses keys and values as in a first
    prefill (the absorbed form below that): chunks of either kind, and after left-padded rows."""
    import kvlab.layers.mla as mla

    monkeypatch.setattr(mla, "EXPANDED_FROM", 3)
    model = _model(VARIANTS[name])
    ids = torch.randint(0, 97, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :4] = 0  # row 0: 4 pads before its prompt
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=16)
        chunks = [model(ids[:, a:b], cache=cache) for a, b in [(0, 4), (4, 6), (6, 13), (13, 16)]]
        padded_full = model(ids, attention_mask=mask)
        cache = model.new_cache(batch_size=2, max_len=16)
        model(ids[:, :9], cache=cache, attention_mask=mask[:, :9])
        padded_chunk = model(ids[:, 9:], cache=cache)
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5
    assert (padded_chunk - padded_full[:, 9:]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_of_the_last_logits_only_then_decode(name):
    """generate()'s prefill asks for the last logits only; stateless top layers then run on one position."""
    model = _model(VARIANTS[name])
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=16)
        last = model(ids[:, :12], cache=cache, last_only=True)
        after = model(ids[:, 12:], cache=cache)
    assert (last - full[:, 11:12]).abs().max() <= 1e-5
    assert (after - full[:, 12:]).abs().max() <= 1e-5


def test_yoco_prefill_runs_the_cross_decoder_on_the_last_token_only():
    model = _model(VARIANTS["yoco_swa"])  # S S C C: layer 2 owns the global K/V, layer 3 only reads it
    seen = []
    model.layers[3].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[1]))
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 9)), cache=model.new_cache(1, 16), last_only=True)
    assert seen == [1]


@pytest.mark.parametrize(
    "name, policy, parts, rows",
    [
        ("gqa", None, ("k_proj", "q_proj", "mlp"), [9, 1, 1]),
        ("gqa", "snapkv", ("k_proj", "q_proj", "mlp"), [9, 9, 1]),  # the cache keeps by the last queries' attention
        ("mla", None, ("kv_a_proj_with_mqa", "q_proj", "mlp"), [9, 1, 1]),
        ("mamba2", None, ("in_proj", "out_proj", "mlp"), [9, 1, 1]),
        ("rwkv6", None, ("mixer", "mlp"), [9, 9]),  # the channel mix's token shift keeps the last input
    ],
)
def test_a_last_only_prefill_runs_the_top_layer_on_the_last_position_where_nothing_keeps_the_rest(
    name, policy, parts, rows
):
    """Keys and values are made for every position (the cache needs them); the query, the attention and the
    MLP after it for the last only, unless a cache or a stateful MLP takes every position in."""
    model = _model(VARIANTS[name])
    seen = []
    top = model.layers[-1]
    for part in parts:
        module = getattr(top.mixer, part, None) or getattr(top, part)
        module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[1]))
    ids = torch.randint(0, 97, (2, 9))
    spec = None if policy is None else {"kind": policy, "budget": 4, "window": 2}
    with torch.no_grad():
        full = model(ids, cache=model.new_cache(2, 16, policy=spec))
        seen.clear()
        last = model(ids, cache=model.new_cache(2, 16, policy=spec), last_only=True)
    assert seen == rows
    assert (last - full[:, -1:]).abs().max() <= 1e-5


def test_a_last_only_forward_of_packed_documents_is_the_last_row_of_the_full_one():
    model = _model(VARIANTS["gqa"])
    ids = torch.randint(0, 97, (2, 9))
    doc_ids = torch.tensor([[0] * 5 + [1] * 4, [0] * 9])
    with torch.no_grad():
        full = model(ids, doc_ids=doc_ids)
        last = model(ids, doc_ids=doc_ids, last_only=True)
    assert (last - full[:, -1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", PRESETS)
def test_decode_matches_forward_presets(name):
    spec = preset_dict(name)
    if (spec.get("kv_sharing") or {}).get("kind") == "lckv":  # as many parallel passes as tokens: exact
        spec["passes"] = {"no_grad": 10, "grad": 2}
    model = _model(spec)
    ids = torch.randint(0, 4096, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=12)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_window_limits_what_a_token_sees():
    """Changing a token outside every window changes no later logit within reach only through layers."""
    spec = tiny(n_layers=1, mixer={"kind": "attention", "n_heads": 4, "window": 3})
    model = _model(spec)
    ids = torch.randint(0, 97, (1, 10))
    other = ids.clone()
    other[0, 2] = (ids[0, 2] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(other)
    # With one layer, position p sees positions p-2..p: token 2 affects positions 2, 3, 4 only.
    changed = ((a - b).abs().amax(dim=-1) > 0)[0].tolist()
    assert changed == [False, False, True, True, True, False, False, False, False, False]


def test_cache_reset_and_reuse():
    model = _model(VARIANTS["window"])
    ids = torch.randint(0, 97, (1, 9))
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        first = model(ids, cache=cache)
        cache.reset()
        assert cache.nbytes() == 0
        second = model(ids, cache=cache)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reordered_cache_continues_the_chosen_rows(name):
    """Beam search's reorder: row r continues the sequence of row batch_idx[r] (windows past their size)."""
    model = _model(VARIANTS[name])
    ids = torch.randint(0, 97, (3, 11))
    batch_idx = torch.tensor([2, 0, 2])
    with torch.no_grad():
        cache = model.new_cache(batch_size=3, max_len=16)
        model(ids[:, :8], cache=cache)
        cache.reorder(batch_idx)
        continued = torch.cat([model(ids[batch_idx, t : t + 1], cache=cache) for t in range(8, 11)], dim=1)
        assert (continued - model(ids[batch_idx])[:, 8:]).abs().max() <= 1e-5


def test_cache_errors_name_the_problem():
    model = _model(VARIANTS["gqa"])
    cache = model.new_cache(batch_size=2, max_len=8)
    with pytest.raises(ValueError, match="batch_size=2"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(2, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model.new_cache(batch_size=1, max_len=65)
