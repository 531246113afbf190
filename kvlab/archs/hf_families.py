"""Native `transformers` classes per mixer family: what each family maps to, both ways.

``kvlab.archs.hf`` knows no family: it asks ``NATIVE_FAMILIES[kind]`` (the
mixer kind of every layer) why a model has no native class, for the
family's ``config.json`` fields, and, on import, which family a
``model_type`` belongs to. A family with a native counterpart registers one
``NativeFamily`` here; the others export as remote code.

- ``attention`` <-> Llama, Mistral, Ministral, Qwen2, Qwen3, SmolLM3, Granite,
  Phi-3 (exported where its RoPE is partial) (our attention keeps their projection layout and RoPE
  convention: the weights are a renaming; layers may differ by their
  window or by having RoPE, ``per_layer_fields``); with a mixture of experts,
  Mixtral, Qwen3-MoE and Qwen2-MoE (its shared expert gated);
- ``mla`` <-> DeepSeek-V3, dense or with MoE after its first dense layers,
  and DeepSeek-V2 (its routing); their RoPE channel pairs reordered on import
  (and back on V2's export).

A model that a whole-model class claims (``NATIVE_LAYOUTS``, ``NativeLayout``:
a class with names and layouts of its own) goes there instead: by its set
of mixer kinds, ``attention`` + ``mamba`` <-> Jamba; by its block,
attention layers with LayerNorm or a parallel residual <-> GPT-NeoX (Pythia),
with Gemma's parts (unit-offset norms, scaled embeddings) <-> Gemma 1, 2 or 3
(by its post norms and query/key norms), with post norms alone <-> OLMo 2 and 3;
``mamba`` or ``mamba2`` alone, without MLPs <-> Mamba, Mamba-2 (and Falcon-Mamba, read); ``attention`` +
``mamba2`` <-> Bamba, with Granite's multipliers or experts <-> Granite 4.0-H; attention with learned sinks <->
gpt-oss; ``attention`` + ``gated_deltanet`` <-> Qwen3-Next (and Qwen3.5, read); ``mla`` + ``gated_deltanet`` (KDA)
<-> Kimi Linear.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.archs.config import ModelConfig
from kvlab.kernels.rope import longrope_attention_factor, yarn_mscale
from kvlab.layers import MixerConfig
from kvlab.layers.mamba import inner_width


@dataclass(frozen=True)
class Rope:
    """What ``config.json`` says of RoPE, read once for every family."""

    theta: float
    scaling: dict[str, Any] | None  # kvlab's rope_scaling, or None
    described: str  # e.g. "rope_parameters.rope_type='linear'", for messages


@dataclass(frozen=True)
class NativeFamily:
    kind: str  # the kvlab mixer kind
    model_types: dict[str, str]  # config.json model_type -> transformers architecture class
    # why a model whose every layer is this mixer has no native class (empty: it has one)
    problems: Callable[[ModelConfig, MixerConfig], list[str]]
    # the family's config.json fields (model_type included), or a problem when the settings fit no class
    to_hf: Callable[[ModelConfig, MixerConfig], dict[str, Any] | str]
    # the mixer spec of a config.json, or one per layer where its layers differ
    from_hf: Callable[[dict[str, Any], Rope], dict[str, Any] | list[dict[str, Any]]]
    # after import: change the weights (kvlab names) from the checkpoint's layout to ours, in place
    fix_weights: Callable[[dict[str, Any], dict[str, torch.Tensor], ModelConfig], None] | None = None
    # before export: our weights (kvlab names) into the layout of the class config.json names, in place
    export_weights: Callable[[dict[str, Any], dict[str, torch.Tensor], ModelConfig], None] | None = None
    # the MLPs of a config.json, as ModelConfig fields (mlp, or mlp_pattern and mlps)
    mlps_from_hf: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf: {
        "mlp": {"kind": "swiglu", "hidden": hf["intermediate_size"]}
    }
    per_layer_fields: tuple[str, ...] = ()  # mixer settings its class takes per layer (to_hf reads them all)
    # ModelConfig fields a config.json sets beyond the layers and MLPs (Granite's multipliers)
    model_fields_from_hf: Callable[[dict[str, Any]], dict[str, Any]] = lambda hf: {}


NATIVE_FAMILIES: dict[str, NativeFamily] = {}


def register_native(family: NativeFamily) -> NativeFamily:
    if family.kind in NATIVE_FAMILIES:
        raise ValueError(f"a native transformers family is registered twice for mixer kind {family.kind!r}")
    NATIVE_FAMILIES[family.kind] = family
    return family


def family_of_model_type(model_type: str) -> NativeFamily | None:
    return next((f for f in NATIVE_FAMILIES.values() if model_type in f.model_types), None)


# -- attention: Llama, Mistral, Qwen2 --------------------------------------------------------------

# model_type -> what differs inside the Llama family
LLAMA_TYPES: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": None, "o_bias": None, "window": False, "qk_norm": False},  # None: config.attention_bias
    "mistral": {"qkv_bias": False, "o_bias": False, "window": True, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "o_bias": False, "window": True, "qk_norm": False},
    "qwen3": {"qkv_bias": None, "o_bias": None, "window": True, "qk_norm": True},  # norms with rms_norm_eps
    # Phi-3: projections fused (kvlab.archs.hf splits them, _fuse_phi3 fuses them), RoPE on the first
    # partial_rotary_factor of each head (Phi-4-mini's 0.75); exported as Phi-3 where that is partial, else as the
    # Llama or Mistral it computes
    "phi3": {"qkv_bias": False, "o_bias": False, "window": True, "qk_norm": False},
    # SmolLM3: Llama with RoPE left out of every no_rope_layer_interval-th layer (no_rope_layers), and windows on
    # the layers layer_types names
    "smollm3": {"qkv_bias": None, "o_bias": None, "window": True, "qk_norm": False},
    "ministral": {"qkv_bias": False, "o_bias": False, "window": True, "qk_norm": False},  # Mistral's, per layer
    # Granite: Llama with multipliers (embeddings, sublayer outputs, attention scores, logits)
    "granite": {"qkv_bias": None, "o_bias": None, "window": False, "qk_norm": False},
    # Mixtral and Qwen3-MoE: Mistral's and Qwen3's attention (windows in every layer or none) with a mixture of
    # SwiGLU experts, routed by softmax and top-k (MOE_TYPES); Qwen2-MoE: Qwen2's attention (its query, key and
    # value biases switched by its own field, qkv_bias) beside such experts and a shared expert, gated per token
    "mixtral": {"qkv_bias": False, "o_bias": False, "window": True, "qk_norm": False},
    "qwen3_moe": {"qkv_bias": None, "o_bias": None, "window": True, "qk_norm": True},
    "qwen2_moe": {"qkv_bias": True, "o_bias": False, "window": True, "qk_norm": False},
}
MOE_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe")
# windows on the layers layer_types names (Qwen2/3: by default the layers from max_window_layers on)
PER_LAYER_WINDOWS = ("qwen2", "qwen3", "smollm3", "ministral", "qwen2_moe")


def llama_block_problems(cfg: ModelConfig) -> list[str]:
    """What the blocks of Llama, Mistral, Qwen, DeepSeek-V3 and Jamba lack: an RMSNorm before the mixer, then one
    before the MLP on the mixer's residual."""
    problems = gemma_problems(cfg) + pre_norm_problems(cfg)
    if cfg.norm.kind != "rmsnorm":
        problems.append(f"norm {cfg.norm.kind!r} (rmsnorm is needed)")
    if cfg.parallel_residual:
        problems.append("parallel_residual (the MLP after the mixer is needed)")
    return problems


def same_but(a, b, fields: tuple[str, ...]) -> bool:
    """Whether two mixer configs are equal but for ``fields``."""
    return type(a) is type(b) and all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in fields)


def check_silu(hf: dict[str, Any]) -> None:
    """SwiGLU's gate: a config.json's hidden_act must be silu."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU needs silu)")


def _projection_norms(cfg: ModelConfig) -> bool:
    """Whether any layer normalises its whole query and key projections (qk_norm_over: projection: OLMo's)."""
    return any(getattr(m, "qk_norm_over", "head") == "projection" for m in cfg.layer_mixers)


def pre_norm_problems(cfg: ModelConfig) -> list[str]:
    """The norms before the mixer and the MLP, which all but OLMo 2's classes have; and per-head q/k norms."""
    problems = ["pre_norms=False (OLMo 2's)"] if not cfg.pre_norms else []
    if _projection_norms(cfg):
        problems.append("query and key norms over the whole projections (qk_norm_over: projection, OLMo 2's)")
    return problems


def multiplier_problems(cfg: ModelConfig, but: tuple[str, ...] = ()) -> list[str]:
    """Granite's multipliers (embeddings, sublayer outputs, logits), which only Granite's class has (and Gemma's
    its own embedding scale: ``but``)."""
    parts = [f"{name}={getattr(cfg, name)}" for name in ("embed_scale", "residual_scale", "logit_scale")
             if getattr(cfg, name) is not None and name not in but]  # fmt: skip
    return [f"{' and '.join(parts)} (Granite's multipliers)"] if parts else []


def gemma_problems(cfg: ModelConfig) -> list[str]:
    """Gemma's parts, which only Gemma's class has."""
    parts = ["post_norms=True"] if cfg.post_norms else []
    if cfg.norm.unit_offset:
        parts.append("norm.unit_offset=True")
    if any(getattr(m, "qk_norm_unit_offset", False) for m in cfg.layer_mixers):
        parts.append("qk_norm_unit_offset=True")
    if cfg.logit_softcap is not None:
        parts.append(f"logit_softcap={cfg.logit_softcap}")
    return [f"{' and '.join(parts)} (Gemma's)"] if parts else []


def one_swiglu_problems(cfg: ModelConfig) -> list[str]:
    """Llama's (and dense DeepSeek-V3's) MLP: one SwiGLU, the same in every layer."""
    if any(p.mlp != cfg.mlp for p in cfg.plan):  # mlp_pattern or layers[].mlp
        return [f"mlp {'/'.join(sorted({p.mlp.kind for p in cfg.plan}))} per layer (one swiglu is needed)"]
    if cfg.mlp.kind != "swiglu":
        return [f"mlp {cfg.mlp.kind!r} (one swiglu is needed)"]
    return []


def _attention_problems(cfg: ModelConfig, m) -> list[str]:
    mlp_problems = _moe_problems(cfg, m) if _moe_of(cfg) is not None else one_swiglu_problems(cfg)
    if mlp_problems:
        return llama_block_problems(cfg) + mlp_problems
    problems = llama_block_problems(cfg)
    granite, phi3 = _granite(cfg), _phi3_partial_rope(cfg)
    for x in {id(x): x for x in cfg.layer_mixers}.values():  # (a layer without RoPE is SmolLM3's)
        allowed = ("partial RoPE",) if x.rope_dims == 0 or phi3 else ()
        allowed += ("softmax_scale",) if granite else ()  # (Granite's attention_multiplier)
        problems += [p for p in _attention_layer_problems(x) if p not in problems and not p.startswith(allowed)]
    return problems


def _phi3_partial_rope(cfg: ModelConfig) -> bool:
    """Whether a model's attention has Phi-3's partial RoPE (Phi-4-mini's): one attention in every layer, RoPE on
    part of each head, no multipliers (the other classes take partial RoPE in none of their layers)."""
    m = cfg.layer_mixers[0]
    return all(x == m for x in cfg.layer_mixers) and 0 < m.rope_dims < m.head_dim and not _granite(cfg)


def _phi3_to_hf(cfg: ModelConfig, m) -> dict[str, Any] | str:
    """Phi-3: Llama's attention without biases or query and key norms, RoPE on the first partial_rotary_factor of
    each head (plain or LongRoPE), one window or none; its projections fused on export (``_fuse_phi3``)."""
    factor, scaling = m.rope_dims / m.head_dim, m.rope_scaling
    problems = []
    if m.qkv_bias or m.o_bias or m.qk_norm:
        problems.append(f"qkv_bias={m.qkv_bias}, o_bias={m.o_bias}, qk_norm={m.qk_norm} (Phi-3 has none)")
    if int(m.head_dim * factor) != m.rope_dims:  # (how Phi-3's class counts the rotated channels)
        problems.append(f"rope_dims={m.rope_dims} of head_dim={m.head_dim}, which partial_rotary_factor={factor} "
                        f"gives back as {int(m.head_dim * factor)}")  # fmt: skip
    if scaling is not None and scaling["kind"] != "longrope":
        problems.append(f"rope_scaling of kind {scaling['kind']} (Phi-3 takes longrope)")
    if scaling is not None and m.n_heads * m.head_dim != cfg.d_model:  # (its check of the factors counts by these)
        problems.append(f"LongRoPE with n_heads * head_dim = {m.n_heads * m.head_dim} apart from d_model")
    if problems:
        return "partial RoPE (Phi-3's) with " + "; ".join(problems)
    hf: dict[str, Any] = {"model_type": "phi3", "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
                          "partial_rotary_factor": factor, "sliding_window": m.window,
                          "rope_parameters": rope_parameters(m)}  # fmt: skip
    if scaling is not None:  # (Phi-3's class reads it here, before its RoPE settings, and has 4096 by default)
        hf["original_max_position_embeddings"] = scaling["original_max_seq_len"]
    return hf


def _fuse_phi3(hf: dict[str, Any], state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Phi-3's fused projections from ours, as load_hf splits them: qkv_proj the queries', keys' and values' rows,
    gate_up_proj the gate's and the up projection's."""
    if hf["model_type"] != "phi3":
        return
    for i in range(cfg.n_layers):
        attention, mlp = f"layers.{i}.mixer.", f"layers.{i}.mlp."
        state[attention + "qkv_proj.weight"] = torch.cat([state.pop(f"{attention}{x}_proj.weight") for x in "qkv"])
        state[mlp + "gate_up_proj.weight"] = torch.cat([state.pop(f"{mlp}{x}_proj.weight") for x in ("gate", "up")])


def _granite(cfg: ModelConfig) -> bool:
    """Whether a model has Granite's multipliers (its own softmax scale among them)."""
    return bool(multiplier_problems(cfg)) or any(getattr(m, "softmax_scale", None) is not None
                                                 for m in cfg.layer_mixers)  # fmt: skip


def _attention_layer_problems(m) -> list[str]:
    """What Llama's attention layer lacks: partial RoPE (which classes with their own RoPE leave out of these), and
    every other setting (``_attention_layer_others``)."""
    rope = [f"partial RoPE (rope_dims={m.rope_dims} of head_dim={m.head_dim})"] if m.rope_dims != m.head_dim else []
    return rope + _attention_layer_others(m)


def _attention_layer_others(m) -> list[str]:
    """Every one of them: a class that takes some (Granite a softmax scale, Gemma 2 a cap) filters those out, and
    the rest must still be named."""
    checks = [
        (m.kv_groups is not None, "uneven K/V groups (kv_groups)"),
        (m.n_q_heads is not None, f"GQKVA query heads (n_q_heads={m.n_q_heads})"),
        (m.value_residual is not None, f"value residual ({m.value_residual})"),
        (m.query_allocation is not None, f"query heads allocated by key norms ({m.query_allocation})"),
        (m.kv_ranks is not None, "MatryoshkaKV projections of keys and values (kv_ranks)"),
        (m.n_v_heads is not None or m.v_groups is not None,
         "value heads grouped apart from the key heads (n_v_heads, v_groups)"),
        (m.v_head_dim != m.head_dim,
         f"value heads wider than the key heads (v_head_dim={m.v_head_dim}, head_dim={m.head_dim})"),
        (bool(m.sinks), f"sink positions beside the window (sinks={m.sinks})"),
        (m.softmax_scale is not None, f"softmax_scale={m.softmax_scale} (1/sqrt(head_dim) is needed)"),
        (m.softcap is not None, f"soft-capped scores (softcap={m.softcap}: Gemma 2's)"),
        (m.learned_sinks, "learned sink logits (learned_sinks: gpt-oss's)"),
        (m.output_gate, "gated head outputs (output_gate: Qwen3-Next's)"),
    ]  # fmt: skip
    return [problem for applies, problem in checks if applies]


def _attention_to_hf(cfg: ModelConfig, m) -> dict[str, Any] | str:
    mixers = cfg.layer_mixers
    if _moe_of(cfg) is not None:
        return _moe_to_hf(cfg, m)
    if _phi3_partial_rope(cfg):
        return _phi3_to_hf(cfg, m)
    if _granite(cfg):
        return _granite_to_hf(cfg, m)
    # layers that differ by their window or their RoPE, or have none (SmolLM3's NoPE layers)
    if m.rope_dims == 0 or any(x.window != m.window or x.rope_dims != m.rope_dims for x in mixers):
        return _per_layer_attention_to_hf(cfg, m)
    if m.qk_norm:
        problem = _qwen3_problem(cfg, m)
        if problem:
            return problem
        model_type = "qwen3"
    elif m.window is not None and m.qkv_bias and not m.o_bias:
        model_type = "qwen2"
    elif m.window is not None and not m.qkv_bias and not m.o_bias:
        model_type = "mistral"
    elif m.window is None and m.qkv_bias == m.o_bias:
        model_type = "llama"
    elif m.window is None and m.qkv_bias and not m.o_bias:
        model_type = "qwen2"
    else:
        return f"qkv_bias={m.qkv_bias}, o_bias={m.o_bias}, window={m.window}"
    hf: dict[str, Any] = {"model_type": model_type, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim}
    if m.rope_scaling is not None:
        hf["rope_parameters"] = rope_parameters(m)
    if model_type in ("llama", "qwen3"):
        hf["attention_bias"] = m.qkv_bias
    if model_type == "mistral":
        hf["sliding_window"] = m.window
    elif model_type in PER_LAYER_WINDOWS[:2]:  # on the layers from max_window_layers on (layer_types): all or none
        hf.update(use_sliding_window=m.window is not None, sliding_window=m.window,
                  max_window_layers=0 if m.window is not None else cfg.n_layers)  # fmt: skip
    return hf


def _moe_of(cfg: ModelConfig):
    """The model's mixture of experts (its first), or None."""
    return next((p.mlp for p in cfg.plan if p.mlp.kind == "moe"), None)


def _one_moe_and_swiglu_problems(cfg: ModelConfig) -> list[str]:
    """Experts as most classes with them have: one MoE config wherever there is one, one SwiGLU in the other layers."""
    moe, dense = _moe_of(cfg), [p.mlp for p in cfg.plan if p.mlp.kind != "moe"]
    if any(p.mlp != moe for p in cfg.plan if p.mlp.kind == "moe") or any(x.kind != "swiglu" or x != dense[0]
                                                                         for x in dense):  # fmt: skip
        return ["MLPs other than one MoE, and one SwiGLU in some layers"]
    return []


def _deepseek_v3_routing(moe) -> bool:
    """Whether an MoE routes as DeepSeek-V3's class does (sigmoid scores with a bias to choose, groups ranked by
    their two best)."""
    return moe.score == "sigmoid" and moe.score_bias and (moe.n_groups == 1 or moe.group_rank == "top2_sum")


def _plain_experts(moe) -> bool:
    """Whether an MoE's experts are plain SwiGLUs: no biases, no clamp (gpt-oss's parts, which only its class has)."""
    return not moe.bias and moe.swiglu_limit is None


def _softmax_top_k(moe, shared: str | None = None, clamped: bool = False) -> bool:
    """Whether an MoE routes as Mixtral, Qwen3-MoE, OLMoE and Jamba do: softmax scores, the top k of every expert
    (no groups, no score bias), unscaled, no shared experts, plain experts (the chosen scores renormalised or not:
    each class says which); ``shared``: "gated", with shared experts gated per token, as Qwen2-MoE's, or
    "ungated", as Granite 4.0-H's; ``clamped``: experts with biases and the clamped SwiGLU, as gpt-oss's."""
    shared_ok = {None: not moe.n_shared, "gated": bool(moe.n_shared and moe.shared_gate),
                 "ungated": bool(moe.n_shared and not moe.shared_gate)}[shared]  # fmt: skip
    experts_ok = (moe.bias and moe.swiglu_limit is not None) if clamped else _plain_experts(moe)
    return (moe.score == "softmax" and shared_ok and not moe.score_bias and moe.n_groups == 1
            and moe.routed_scale == 1 and experts_ok)  # fmt: skip


def _moe_problems(cfg: ModelConfig, m) -> list[str]:
    """What Mixtral's, Qwen3-MoE's and Qwen2-MoE's MLPs lack: one MoE routed by softmax and top-k in every layer
    (Qwen3-MoE and Qwen2-MoE: or a SwiGLU in the layers mlp_only_layers names), shared experts gated per token in
    Qwen2-MoE's alone."""
    moe, problems = _moe_of(cfg), _one_moe_and_swiglu_problems(cfg)
    dense = [p.mlp for p in cfg.plan if p.mlp.kind != "moe"]
    if not _softmax_top_k(moe, shared="gated" if moe.shared_gate else None):
        problems.append(f"MoE routing other than Mixtral's, Qwen3-MoE's and Qwen2-MoE's (score={moe.score!r}, "
                        f"n_shared={moe.n_shared}, shared_gate={moe.shared_gate}, score_bias={moe.score_bias}, "
                        f"n_groups={moe.n_groups}, routed_scale={moe.routed_scale}, bias={moe.bias}, swiglu_limit="
                        f"{moe.swiglu_limit}; theirs: softmax, top-k, no groups, bias or scale, plain SwiGLU "
                        "experts, and no shared experts but Qwen2-MoE's gated ones)")  # fmt: skip
    if moe.shared_gate:
        problems += _qwen2_moe_attention_problems(cfg, m)
    elif not m.qk_norm and (dense or not moe.norm_topk):
        problems.append(f"dense layers or norm_topk={moe.norm_topk} without qk_norm (Mixtral has experts in "
                        "every layer and renormalises the chosen scores; Qwen3-MoE, with qk_norm, "
                        "may not)")  # fmt: skip
    same = (lambda x: same_but(x, m, ("window",))) if moe.shared_gate else (lambda x: x == m)
    if _granite(cfg) or not all(same(x) for x in cfg.layer_mixers) or m.rope_dims != m.head_dim:
        problems.append("experts with layers that differ, Granite's multipliers or partial RoPE (Mixtral, "
                        "Qwen3-MoE and Qwen2-MoE have one attention, RoPE on every channel; Qwen2-MoE's layers may "
                        "differ by a window)")  # fmt: skip
    return problems


def _qwen2_moe_attention_problems(cfg: ModelConfig, m) -> list[str]:
    """Qwen2-MoE's attention: no query or key norms, no output bias, windows of one size (on any layers)."""
    windows = {x.window for x in cfg.layer_mixers} - {None}
    if m.qk_norm or m.o_bias or len(windows) > 1:
        return [
            f"shared experts gated (Qwen2-MoE's) with qk_norm={m.qk_norm}, o_bias={m.o_bias} or windows of "
            f"sizes {sorted(windows)} (Qwen2-MoE has no query or key norms, no output bias, one sliding_window)"
        ]
    return []


def _moe_to_hf(cfg: ModelConfig, m) -> dict[str, Any] | str:
    """Mixtral (Mistral's attention) or Qwen3-MoE (Qwen3's), by the attention's query and key norms; Qwen2-MoE by
    its gated shared experts."""
    moe = _moe_of(cfg)
    dense = [i for i, p in enumerate(cfg.plan) if p.mlp.kind != "moe"]
    hf: dict[str, Any] = {"num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "sliding_window": m.window,
                          "num_experts_per_tok": moe.top_k,
                          # transformers' balance loss is top_k times ours: the same term, its coefficient over top_k
                          "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k}  # fmt: skip
    if m.rope_scaling is not None:
        hf["rope_parameters"] = rope_parameters(m)
    if moe.shared_gate:  # (its windows on the layers layer_types names)
        windows = [x.window for x in cfg.layer_mixers]
        window = next((w for w in windows if w is not None), None)
        return hf | {"model_type": "qwen2_moe", "qkv_bias": m.qkv_bias, "sliding_window": window,
                     "use_sliding_window": window is not None, "max_window_layers": cfg.n_layers,
                     "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows],
                     "num_experts": moe.n_experts, "moe_intermediate_size": moe.hidden,
                     "shared_expert_intermediate_size": moe.n_shared * moe.hidden, "norm_topk_prob": moe.norm_topk,
                     "decoder_sparse_step": 1, "mlp_only_layers": dense,
                     "intermediate_size": cfg.plan[dense[0]].mlp.hidden if dense else moe.hidden}  # fmt: skip
    if m.qk_norm:
        problem = _qwen3_problem(cfg, m)
        if problem:
            return problem
        return hf | {"model_type": "qwen3_moe", "attention_bias": m.qkv_bias,
                     "use_sliding_window": m.window is not None, "num_experts": moe.n_experts,
                     "moe_intermediate_size": moe.hidden, "norm_topk_prob": moe.norm_topk,
                     "decoder_sparse_step": 1, "mlp_only_layers": dense,
                     "intermediate_size": cfg.plan[dense[0]].mlp.hidden if dense else moe.hidden}  # fmt: skip
    if m.qkv_bias or m.o_bias:
        return f"qkv_bias={m.qkv_bias}, o_bias={m.o_bias} with experts (Mixtral's attention has no biases)"
    return hf | {"model_type": "mixtral", "num_local_experts": moe.n_experts, "intermediate_size": moe.hidden}


def _llama_mlps_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """One SwiGLU in every layer; Mixtral's, Qwen3-MoE's and Qwen2-MoE's experts (the Qwens: SwiGLU in their
    mlp_only_layers and where decoder_sparse_step skips; Qwen2-MoE's shared expert as n_shared experts' width)."""
    model_type, n = hf["model_type"], hf["num_hidden_layers"]
    swiglu = {"kind": "swiglu", "hidden": hf["intermediate_size"]}
    if model_type not in MOE_TYPES:
        return {"mlp": swiglu}
    if hf.get("router_jitter_noise"):
        raise ValueError(f"config.json: router_jitter_noise={hf['router_jitter_noise']} is not supported (kvlab's "
                         "router takes no noise in training)")  # fmt: skip
    mixtral, qwen2 = model_type == "mixtral", model_type == "qwen2_moe"
    defaults = {"mixtral": (2, 8, None), "qwen3_moe": (8, 128, 768), "qwen2_moe": (4, 60, 1408)}[model_type]
    top_k = hf.get("num_experts_per_tok", defaults[0])
    # (the Qwens' num_experts, which transformers 5 writes as num_local_experts)
    n_experts = next((hf[k] for k in ("num_local_experts", "num_experts") if hf.get(k) is not None), defaults[1])
    hidden = hf["intermediate_size"] if mixtral else hf.get("moe_intermediate_size", defaults[2])
    moe = {"kind": "moe", "hidden": hidden,
           "n_experts": n_experts, "top_k": top_k, "norm_topk": mixtral or bool(hf.get("norm_topk_prob", False)),
           "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001) * top_k}  # fmt: skip
    if qwen2:
        moe.update(n_shared=_qwen2_shared_experts(hf, moe["hidden"]), shared_gate=True)
    step, only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or [])
    sparse = [mixtral or (n_experts > 0 and i not in only and (i + 1) % step == 0) for i in range(n)]
    if not any(sparse):
        return {"mlp": swiglu}
    if all(sparse):
        return {"mlp": moe}
    return {"mlp_pattern": "".join("E" if s else "D" for s in sparse), "mlps": {"D": swiglu, "E": moe}}


def _qwen2_shared_experts(hf: dict[str, Any], hidden: int) -> int:
    """Qwen2-MoE's shared expert as kvlab's n_shared experts of the routed experts' width (its checkpoints' are
    whole multiples: 4 in Qwen1.5-MoE-A2.7B, 8 in Qwen2-57B-A14B)."""
    width = hf.get("shared_expert_intermediate_size", 5632)
    if width <= 0 or width % hidden:
        raise ValueError(f"config.json: shared_expert_intermediate_size={width} is not supported (a positive "
                         f"multiple of moe_intermediate_size={hidden} is: kvlab's shared experts are n_shared "
                         "routed experts wide)")  # fmt: skip
    return width // hidden


def _granite_to_hf(cfg: ModelConfig, m) -> dict[str, Any] | str:
    """Granite: Llama with multipliers on the embeddings, the sublayer outputs, the attention scores, the
    logits (logits_scaling divides them)."""
    if (any(x != m for x in cfg.layer_mixers) or m.window is not None or m.qk_norm or m.qkv_bias != m.o_bias
            or m.rope_dims != m.head_dim):  # fmt: skip
        return (f"Granite's multipliers with layers that differ, a window, qk_norm, biases on some projections or "
                f"RoPE on some channels (window={m.window}, qk_norm={m.qk_norm}, qkv_bias={m.qkv_bias}, o_bias="
                f"{m.o_bias}, rope_dims={m.rope_dims} of head_dim={m.head_dim})")  # fmt: skip
    hf: dict[str, Any] = {"model_type": "granite", "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
                          "attention_bias": m.qkv_bias, **_granite_multipliers(cfg, m)}  # fmt: skip
    if m.rope_scaling is not None:
        hf["rope_parameters"] = rope_parameters(m)
    return hf


def _granite_multipliers(cfg: ModelConfig, m) -> dict[str, Any]:
    """Granite's multipliers under its classes' names (Granite's and Granite 4.0-H's), ``m`` the attention; the
    inverse of ``_granite_fields``."""
    return {"embedding_multiplier": cfg.embed_scale if cfg.embed_scale is not None else 1.0,
            "residual_multiplier": cfg.residual_scale if cfg.residual_scale is not None else 1.0,
            "logits_scaling": 1 / cfg.logit_scale if cfg.logit_scale is not None else 1.0,
            "attention_multiplier": m.softmax_scale or m.head_dim**-0.5}  # fmt: skip


def _granite_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Granite's multipliers as ModelConfig fields (1: none)."""
    if hf.get("model_type") != "granite":
        return {}
    fields = {"embed_scale": hf.get("embedding_multiplier", 1.0), "residual_scale": hf.get("residual_multiplier", 1.0),
              "logit_scale": 1 / hf.get("logits_scaling", 1.0)}  # fmt: skip
    return {k: float(v) for k, v in fields.items() if v != 1}


def _qwen3_problem(cfg: ModelConfig, m) -> str | None:
    """Qwen3's query and key norms take the model's rms_norm_eps; its biases are all or none (attention_bias)."""
    if m.qkv_bias != m.o_bias:
        return f"qk_norm with qkv_bias={m.qkv_bias}, o_bias={m.o_bias} (Qwen3 has both or neither)"
    if cfg.norm.kind != "rmsnorm" or m.qk_norm_eps != cfg.norm.eps:
        return f"qk_norm_eps={m.qk_norm_eps} apart from the model's norm eps={cfg.norm.eps} (Qwen3 has one)"
    return None


def _per_layer_attention_to_hf(cfg: ModelConfig, m) -> dict[str, Any] | str:
    """Layers that differ by their window or by having RoPE or none: Qwen2, Qwen3 and Ministral (windows on the
    layers layer_types names), SmolLM3 (that, and layers without RoPE)."""
    mixers = cfg.layer_mixers
    windows = {x.window for x in mixers} - {None}
    if len(windows) > 1:
        return f"windows of different sizes ({sorted(windows)}; one sliding_window is needed)"
    no_rope = [x.rope_dims == 0 for x in mixers]
    if m.qk_norm and not any(no_rope):
        model_type = _qwen3_problem(cfg, m) or "qwen3"
    elif m.qkv_bias and not m.o_bias and not any(no_rope):
        model_type = "qwen2"
    elif not m.qkv_bias and not m.o_bias and not m.qk_norm and not any(no_rope):
        model_type = "ministral"
    elif m.qkv_bias == m.o_bias and not m.qk_norm:
        model_type = "smollm3"
    else:
        model_type = (f"layers without RoPE with qk_norm={m.qk_norm}, qkv_bias={m.qkv_bias}, o_bias={m.o_bias} "
                      "(SmolLM3 has no query or key norms and its biases all or none)")  # fmt: skip
    if model_type not in LLAMA_TYPES:
        return model_type
    types = ["sliding_attention" if x.window is not None else "full_attention" for x in mixers]
    window = next(iter(windows), None)
    hf: dict[str, Any] = {"model_type": model_type, "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
                          "sliding_window": window, "layer_types": types}  # fmt: skip
    if m.rope_scaling is not None:
        hf["rope_parameters"] = rope_parameters(m)
    if model_type == "ministral":  # (its windows are where layer_types puts them, no switch)
        return hf
    hf["use_sliding_window"] = window is not None
    if model_type != "qwen2":
        hf["attention_bias"] = m.qkv_bias
    if model_type == "smollm3":
        hf["no_rope_layers"] = [0 if x else 1 for x in no_rope]
    else:  # (transformers 5 reads layer_types; before it, the windows from max_window_layers on)
        hf["max_window_layers"] = types.index("sliding_attention") if window is not None else cfg.n_layers
    return hf


def rope_parameters(m) -> dict[str, Any]:
    """An attention mixer's RoPE settings under transformers' names (``rope_parameters``)."""
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    s = m.rope_scaling
    if s is not None:
        out["rope_type"] = s["kind"]
        if "factor" in s:  # (LongRoPE's are per frequency)
            out["factor"] = s["factor"]
        if s["kind"] == "llama3":
            out.update(low_freq_factor=s["low_freq_factor"], high_freq_factor=s["high_freq_factor"],
                       original_max_position_embeddings=s["original_max_seq_len"])  # fmt: skip
        if s["kind"] == "yarn":
            out.update(original_max_position_embeddings=s["original_max_seq_len"], beta_fast=s["beta_fast"],
                       beta_slow=s["beta_slow"], attention_factor=s["attention_factor"],
                       **({"truncate": False} if s.get("truncate", True) is False else {}))  # fmt: skip
        if s["kind"] == "longrope":
            out.update(short_factor=list(s["short_factor"]), long_factor=list(s["long_factor"]),
                       original_max_position_embeddings=s["original_max_seq_len"],
                       attention_factor=s["attention_factor"])  # fmt: skip
    return out


def read_rope(hf: dict[str, Any]) -> Rope:
    """What ``config.json`` says of RoPE, as transformers reads it: a legacy ``rope_scaling``, when set, takes the
    place of ``rope_parameters``; ``rope_theta`` in either, or beside them (GPT-NeoX: ``rotary_emb_base``)."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if hf.get("model_type") == "phi3" and rope_type in ("su", "yarn"):  # (Phi-3's earlier names of its LongRoPE)
        rope_type = "longrope"
    if rope_type not in ("default", "linear", "llama3", "yarn", "longrope"):
        raise ValueError(
            f"config.json: {field}.rope_type={rope_type!r}: this RoPE scaling is not supported (default, linear, "
            "llama3, yarn and longrope are); importing without it would change the model's outputs"
        )
    scaling = None
    if rope_type == "linear":
        scaling = {"kind": "linear", "factor": rope["factor"]}
    elif rope_type == "llama3":
        scaling = {"kind": "llama3", "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
                   "high_freq_factor": rope["high_freq_factor"],
                   "original_max_seq_len": original_context(rope, hf)}  # fmt: skip
    elif rope_type == "yarn":
        scaling = yarn_scaling(rope, hf)
    elif rope_type == "longrope":
        original = original_context(rope, hf)
        factor = rope.get("factor") or hf.get("max_position_embeddings", original) / original
        scaling = {"kind": "longrope", "short_factor": [float(f) for f in rope["short_factor"]],
                   "long_factor": [float(f) for f in rope["long_factor"]], "original_max_seq_len": original,
                   "attention_factor": float(rope.get("attention_factor") or
                                             longrope_attention_factor(factor, original))}  # fmt: skip
    theta = rope.get("rope_theta") or hf.get("rope_theta") or hf.get("rotary_emb_base") or 10000.0
    return Rope(float(theta), scaling, f"{field}.rope_type={rope_type!r}")


def original_context(rope: dict[str, Any], hf: dict[str, Any]) -> int:
    """The context a scaled RoPE extends, as `transformers` reads it: Phi-3's ``original_max_position_embeddings``
    beside the RoPE settings (a field of its class: 4096 where config.json has none); any other's among them,
    else max_position_embeddings."""
    if hf.get("model_type") == "phi3":
        return int(hf.get("original_max_position_embeddings", 4096))
    return int(rope.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 2048))


def yarn_scaling(rope: dict[str, Any], hf: dict[str, Any]) -> dict[str, Any]:
    """kvlab's yarn ``rope_scaling`` of a config's YaRN settings, read as `transformers` reads them: a missing
    factor is max_position_embeddings over the original context; the attention factor, unless given, is
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) with both, else mscale(factor)."""
    original = original_context(rope, hf)
    factor = rope.get("factor") or hf["max_position_embeddings"] / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, all_dims = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dims) if mscale and all_dims
                            else yarn_mscale(factor))  # fmt: skip
    return {"kind": "yarn", "factor": float(factor), "original_max_seq_len": int(original),
            "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1),
            "attention_factor": float(attention_factor),
            **({"truncate": False} if rope.get("truncate", True) is False else {})}  # fmt: skip


def rope_of_layer_type(hf: dict[str, Any], layer_type: str) -> Rope:
    """The RoPE of one kind of layer where ``rope_parameters`` holds one per kind (Gemma 3, OLMo 3:
    ``sliding_attention``, ``full_attention``), else the model's."""
    per_type = hf.get("rope_parameters") or {}
    return read_rope({"rope_parameters": per_type[layer_type]} if layer_type in per_type else hf)


LAYER_TYPES = ("sliding_attention", "full_attention")  # transformers' layer_types, where a class has two kinds


def attention_of_layer_types(cfg: ModelConfig) -> dict[str, Any]:
    """The attention of each of the two kinds of layer (Gemma 3, OLMo 3: windowed or full), None where no layer
    is of that kind."""
    mixers = cfg.layer_mixers
    return {kind: next((m for m in mixers if (m.window is not None) == (kind == "sliding_attention")), None)
            for kind in LAYER_TYPES}  # fmt: skip


def layers_of_types(hf: dict[str, Any], attention: dict[str, Any], types: list[str]) -> dict[str, Any]:
    """``pattern`` and ``mixers`` for layers of the two kinds ``types`` names: ``attention`` with each kind's
    RoPE, ``L`` with ``sliding_window`` and ``G`` without (the kinds no layer has left out)."""
    mixers = {}
    for letter, kind in zip("LG", LAYER_TYPES, strict=True):
        rope = rope_of_layer_type(hf, kind)
        mixers[letter] = {**attention, "rope_theta": rope.theta, "rope_scaling": rope.scaling,
                          "window": hf.get("sliding_window") if letter == "L" else None}  # fmt: skip
    pattern = "".join("L" if t == "sliding_attention" else "G" for t in types)
    return {"pattern": pattern, "mixers": {k: v for k, v in mixers.items() if k in pattern}}


def _attention_from_hf(hf: dict[str, Any], rope: Rope) -> dict[str, Any] | list[dict[str, Any]]:
    """The attention of a config.json: one mixer spec, or one per layer where layers differ (windows on some
    layers only, SmolLM3's layers without RoPE)."""
    model_type = hf["model_type"]
    kind = LLAMA_TYPES[model_type]
    n = hf["num_hidden_layers"]
    window = None
    if kind["window"] and (model_type in ("mistral", "phi3", "ministral", "mixtral") or hf.get("use_sliding_window")):
        window = hf.get("sliding_window")
    if window is not None and window >= hf.get("max_position_embeddings", float("inf")):
        window = None  # it covers every position the model takes: full attention (a config of kvlab's refuses it)
    windows, roped = [window] * n, [True] * n
    if model_type in PER_LAYER_WINDOWS:  # layer_types (and no_rope_layers) as transformers derives them
        import transformers

        derived = transformers.AutoConfig.for_model(**hf)
        windows = [window if t == "sliding_attention" else None for t in derived.layer_types]
        roped = [bool(r) for r in getattr(derived, "no_rope_layers", roped)]
    bias = {k: bool(hf.get("attention_bias")) if kind[k] is None else kind[k] for k in ("qkv_bias", "o_bias")}
    if model_type == "qwen2_moe":  # (a field of its own, true unless set)
        bias["qkv_bias"] = bool(hf.get("qkv_bias", True))
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    rotated = hf.get("partial_rotary_factor", 1.0) if model_type == "phi3" else 1.0
    scale = hf.get("attention_multiplier", 1.0) if model_type == "granite" else head_dim**-0.5
    layers = [
        {
            "kind": "attention",
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
            "head_dim": head_dim,
            **({"rope_dims": int(head_dim * rotated) if has_rope else 0} if rotated != 1.0 or not has_rope else {}),
            "rope_theta": rope.theta,
            "rope_scaling": rope.scaling,
            "window": window,
            **bias,
            **({"qk_norm": True, "qk_norm_eps": hf.get("rms_norm_eps", 1e-6)} if kind["qk_norm"] else {}),
            **({"softmax_scale": float(scale)} if scale != head_dim**-0.5 else {}),
        }
        for window, has_rope in zip(windows, roped, strict=True)
    ]
    return layers[0] if all(layer == layers[0] for layer in layers) else layers


register_native(
    NativeFamily(
        kind="attention",
        model_types={
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "phi3": "Phi3ForCausalLM",
            "smollm3": "SmolLM3ForCausalLM",
            "ministral": "MinistralForCausalLM",
            "granite": "GraniteForCausalLM",
            "mixtral": "MixtralForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM",
        },  # fmt: skip
        problems=_attention_problems,
        to_hf=_attention_to_hf,
        from_hf=_attention_from_hf,
        mlps_from_hf=_llama_mlps_from_hf,
        export_weights=_fuse_phi3,
        per_layer_fields=("window", "rope_dims"),
        model_fields_from_hf=_granite_fields,
    )
)


# -- MLA: dense DeepSeek-V3 ------------------------------------------------------------------------


def _deepseek_mlps(cfg: ModelConfig) -> tuple[int, Any]:
    """(the dense layers before the first MoE one, the MoE config or None)."""
    first = next((i for i, p in enumerate(cfg.plan) if p.mlp.kind == "moe"), cfg.n_layers)
    return first, cfg.plan[first].mlp if first < cfg.n_layers else None


def _deepseek_v2_routing(moe) -> bool:
    """Whether an MoE routes as DeepSeek-V2's class does (softmax, the top k of all or of the groups with the best
    scores, scaled, not renormalised)."""
    groups = moe.n_groups == 1 or moe.group_rank == "max"
    return moe.score == "softmax" and not moe.score_bias and groups and not moe.norm_topk


def _deepseek_mlp_problems(cfg: ModelConfig) -> list[str]:
    """DeepSeek-V2's or V3's MLPs: SwiGLU in the first k layers, one MoE in the rest, routed as one of them routes,
    with shared experts."""
    first, moe = _deepseek_mlps(cfg)
    if moe is None:
        return one_swiglu_problems(cfg)
    dense, rest = [p.mlp for p in cfg.plan[:first]], [p.mlp for p in cfg.plan[first:]]
    problems = []
    if any(m.kind != "swiglu" or m != dense[0] for m in dense) or any(m != moe for m in rest):
        problems.append("MLPs other than SwiGLU in the first layers and one MoE in all the rest")
    if (
        not (_deepseek_v3_routing(moe) or _deepseek_v2_routing(moe))
        or not moe.n_shared
        or moe.shared_gate
        or not _plain_experts(moe)
    ):
        problems.append(f"MoE routing other than DeepSeek-V2's or V3's (score={moe.score!r}, score_bias="
                        f"{moe.score_bias}, n_groups={moe.n_groups}, group_rank={moe.group_rank}, norm_topk="
                        f"{moe.norm_topk}, n_shared={moe.n_shared}, shared_gate={moe.shared_gate}, bias={moe.bias}, "
                        f"swiglu_limit={moe.swiglu_limit}; V3's: sigmoid with a score bias, groups by their two best; "
                        "V2's: softmax, groups by their best, not renormalised; both with shared experts, ungated, "
                        "plain SwiGLU experts)")  # fmt: skip
    return problems


# DeepSeek-V2/V3 build their latent norms (q_a_layernorm, kv_a_layernorm) with RMSNorm's default eps, not
# rms_norm_eps (the block norms'): so does `transformers`, so a checkpoint's latent eps is always this one.
DEEPSEEK_LATENT_EPS = 1e-6


def _mla_problems(cfg: ModelConfig, m) -> list[str]:
    problems = llama_block_problems(cfg) + multiplier_problems(cfg) + _deepseek_mlp_problems(cfg)
    if m.norm_eps != DEEPSEEK_LATENT_EPS:
        problems.append(f"MLA norm_eps={m.norm_eps} (DeepSeek-V3's latent norms have eps {DEEPSEEK_LATENT_EPS}, "
                        "whatever rms_norm_eps is)")  # fmt: skip
    if m.rope_kv_heads != 1 or m.rope_spectrum is not None or not m.latent_norm:
        problems.append("MLA with per-head RoPE keys, picked RoPE frequencies or no latent norm (MHA2MLA's form)")
    if m.latent_bits is not None:
        problems.append(f"MLA latents quantized to {m.latent_bits} bits (CLLA-quant)")
    if not m.rope:
        problems.append("MLA without RoPE (rope: false, Kimi Linear's)")
    return problems


def _mla_to_hf(cfg: ModelConfig, m) -> dict[str, Any]:
    first, moe = _deepseek_mlps(cfg)
    experts = {}
    if moe is not None and _deepseek_v2_routing(moe):  # DeepSeek-V2's class (its RoPE pairs: export_weights)
        return {
            **_deepseek_attention_fields(m), "model_type": "deepseek_v2",
            "intermediate_size": cfg.plan[0].mlp.hidden if first else moe.hidden, "first_k_dense_replace": first,
            "n_routed_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.hidden,
            "n_shared_experts": moe.n_shared, "norm_topk_prob": False,
            **({"topk_method": "greedy"} if moe.n_groups == 1 else {"topk_method": "group_limited_greedy",
                                                                      "n_group": moe.n_groups,
                                                                      "topk_group": moe.topk_groups}),
            "routed_scaling_factor": moe.routed_scale, "aux_loss_alpha": moe.aux_loss_coef,
        }  # fmt: skip
    if moe is not None:
        experts = {
            "n_routed_experts": moe.n_experts,
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.hidden,
            "n_shared_experts": moe.n_shared,
            "n_group": moe.n_groups,
            "topk_group": moe.topk_groups,
            "norm_topk_prob": moe.norm_topk,
            "routed_scaling_factor": moe.routed_scale,
        }
    return {  # RoPE pairs as ours
        "model_type": "deepseek_v3",
        "intermediate_size": cfg.plan[0].mlp.hidden if first else moe.hidden,
        **experts,
        "first_k_dense_replace": first,
        **_deepseek_attention_fields(m),
        "rope_interleave": False,
    }


def _deepseek_attention_fields(m) -> dict[str, Any]:
    return {
        "num_key_value_heads": m.n_heads,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.head_dim,
        "qk_rope_head_dim": m.rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "attention_bias": False,
        **({"rope_parameters": {**rope_parameters(m), "mscale_all_dim": m.mscale_all_dim}} if m.rope_scaling else {}),
    }


def _mla_from_hf(hf: dict[str, Any], rope: Rope) -> dict[str, Any]:
    # DeepSeek's YaRN (V2, V3: factor 40 over 4,096 positions) also folds mscale_all_dim into the softmax scale
    all_dims = (hf.get("rope_scaling") or hf.get("rope_parameters") or {}).get("mscale_all_dim") or 0.0
    if all_dims and (rope.scaling or {}).get("kind") != "yarn":
        raise ValueError(f"config.json: {rope.described} with mscale_all_dim={all_dims} is not supported (DeepSeek "
                         "folds mscale_all_dim into the softmax scale with yarn)")  # fmt: skip
    if hf.get("attention_bias"):
        raise ValueError("config.json: attention_bias=true is not supported for MLA")
    return {
        "kind": "mla",
        "n_heads": hf["num_attention_heads"],
        "head_dim": hf["qk_nope_head_dim"],
        "v_head_dim": hf["v_head_dim"],
        "rope_head_dim": hf["qk_rope_head_dim"],
        "kv_lora_rank": hf["kv_lora_rank"],
        "q_lora_rank": hf.get("q_lora_rank"),
        "rope_theta": rope.theta,
        "rope_scaling": rope.scaling,
        "mscale_all_dim": float(all_dims),
        "norm_eps": DEEPSEEK_LATENT_EPS,
    }


def _deepseek_mlps_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """SwiGLU in the first ``first_k_dense_replace`` layers, MoE in the rest (every layer: DeepSeek-V2's and V3's
    moe_layer_freq is 1)."""
    v2 = hf["model_type"] == "deepseek_v2"
    n, first = hf["num_hidden_layers"], min(hf.get("first_k_dense_replace", 0 if v2 else 3), hf["num_hidden_layers"])
    if first == n:
        return {"mlp": {"kind": "swiglu", "hidden": hf["intermediate_size"]}}
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"config.json: moe_layer_freq={hf['moe_layer_freq']} is not supported (MoE in every layer "
                         "after the first dense ones is)")  # fmt: skip
    if v2:
        dense = {"kind": "swiglu", "hidden": hf["intermediate_size"]}
        return {"mlp_pattern": "D" * first + "E" * (n - first), "mlps": {"D": dense, "E": _deepseek_v2_moe(hf)}}
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(
            f"config.json: DeepSeek routing scoring_func={hf.get('scoring_func')!r}, topk_method="
            f"{hf.get('topk_method')!r} is not supported (DeepSeek-V3's sigmoid / noaux_tc is)"
        )
    moe = {"kind": "moe", "hidden": hf["moe_intermediate_size"], "n_experts": hf.get("n_routed_experts", 256),
           "top_k": hf.get("num_experts_per_tok", 8), "n_shared": hf.get("n_shared_experts", 1), "score": "sigmoid",
           "score_bias": True, "norm_topk": bool(hf.get("norm_topk_prob", True)),
           "routed_scale": float(hf.get("routed_scaling_factor", 2.5)), "n_groups": hf.get("n_group", 8),
           "topk_groups": hf.get("topk_group", 4),
           # continued training balances as DeepSeek-V3 trained: its bias update speed and its tiny auxiliary
           # weight (the paper's sequence-wise loss; ours is over the batch)
           "bias_update": 0.001, "aux_loss_coef": 0.0001}  # fmt: skip
    return {"mlp_pattern": "D" * first + "E" * (n - first),
            "mlps": {"D": {"kind": "swiglu", "hidden": hf["intermediate_size"]}, "E": moe}}  # fmt: skip


def _deepseek_v2_moe(hf: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2's experts as `transformers` routes them: softmax scores, the top k of all (``greedy``: V2-Lite's)
    or of the ``topk_group`` groups with the best scores (``group_limited_greedy``: V2's, V2.5's), times
    routed_scaling_factor, not renormalised; shared experts beside them."""
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"config.json: topk_method={method!r} is not supported for deepseek_v2 (greedy and "
                         "group_limited_greedy are)")  # fmt: skip
    groups = {"n_groups": hf["n_group"], "topk_groups": hf["topk_group"], "group_rank": "max"} if (
        method == "group_limited_greedy") else {}  # fmt: skip
    if hf.get("norm_topk_prob"):
        raise ValueError("config.json: norm_topk_prob=true with model_type deepseek_v2 is not supported: "
                         "transformers' DeepSeek-V2 router does not renormalise, DeepSeek's own code does")  # fmt: skip
    return {"kind": "moe", "hidden": hf["moe_intermediate_size"], "n_experts": hf.get("n_routed_experts", 64),
            "top_k": hf.get("num_experts_per_tok") or 6, "n_shared": hf.get("n_shared_experts") or 0,
            "score": "softmax", "routed_scale": float(hf.get("routed_scaling_factor", 1.0)), **groups,
            # (DeepSeek-V2's expert-level balance loss, which kvlab's is)
            "aux_loss_coef": float(hf.get("aux_loss_alpha", 0.001))}  # fmt: skip


def _rope_rows(hf: dict[str, Any], state: dict[str, torch.Tensor], cfg: ModelConfig, inverse: bool) -> None:
    """DeepSeek checkpoints rotate neighbouring channel pairs; we rotate (i, i + d/2) pairs. Reordering the RoPE
    output rows of the query and key projections to [even channels, odd channels] turns theirs into ours exactly
    (q.k is unchanged); ``inverse``: ours into theirs. DeepSeek-V2's class always rotates neighbours (complex
    products), V3's as ``rope_interleave`` says."""
    if hf["model_type"] == "deepseek_v3" and not hf.get("rope_interleave", True):
        return
    for i, m in enumerate(cfg.layer_mixers):
        D, R, r = m.head_dim, m.rope_head_dim, m.kv_lora_rank
        perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
        perm = perm.argsort() if inverse else perm
        q_name = f"layers.{i}.mixer.{'q_proj' if m.q_lora_rank is None else 'q_b_proj'}.weight"
        q = state[q_name].view(m.n_heads, D + R, -1)
        state[q_name] = torch.cat([q[:, :D], q[:, D:][:, perm]], dim=1).reshape(m.n_heads * (D + R), -1)
        kv_name = f"layers.{i}.mixer.kv_a_proj_with_mqa.weight"
        state[kv_name] = torch.cat([state[kv_name][:r], state[kv_name][r:][perm]])


register_native(
    NativeFamily(
        kind="mla",
        model_types={"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"},
        problems=_mla_problems,
        to_hf=_mla_to_hf,
        from_hf=_mla_from_hf,
        fix_weights=functools.partial(_rope_rows, inverse=False),
        export_weights=functools.partial(_rope_rows, inverse=True),
        mlps_from_hf=_deepseek_mlps_from_hf,
    )
)


# -- Whole-model layouts: Jamba (a hybrid), GPT-NeoX (its own block) ----------------------------


@dataclass(frozen=True)
class NativeLayout:
    """A `transformers` class with names and layouts of its own for the whole model, both ways."""

    model_type: str
    architecture: str
    describes: str  # which models it claims, for messages (empty: none, it is read only)
    claims: Callable[[ModelConfig], bool]  # whether a model exports to this class (or says why not)
    problems: Callable[[ModelConfig], list[str]]  # why this model has no such class (empty: it has)
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # config.json's fields, model_type included
    # our state dict -> theirs (names and layouts); import inverts it name by name (``import_state``)
    export_state: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> a ModelConfig dict
    # their weights in our layouts, under the names export_state gives each of ours alone: fused tensors split,
    # values offset, the buffers old checkpoints hold dropped (None: as they are)
    prepare: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None
    mlp_bias: bool = False  # its gated MLPs (SwiGLU, GeGLU) take biases (RecurrentGemma's)
    normed_residual: bool = False  # its block takes each residual after the norm (MiniMax's)
    norm_pattern: bool = False  # its layers place their norms by kind (OLMo Hybrid's)
    # after import, config.json's multipliers folded into our weights (names ours, in place; None: none)
    fold: Callable[[dict[str, Any], dict[str, torch.Tensor], ModelConfig], None] | None = None

    def import_state(self, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], cfg: ModelConfig):
        """Their weights under our names and in our layouts, for our model's state ``ours`` (shapes wanted):
        each of our names is exported alone to find its name there (``theirs`` prepared first)."""
        state = {}
        for name, like in ours.items():
            # (one of ours may be several of theirs, its rows split among them: Kimi Linear's q, k and v)
            names = list(self.export_state({name: like}, cfg))
            if all(n in theirs for n in names):
                value = theirs[names[0]] if len(names) == 1 else torch.cat([theirs[n] for n in names])
                state[name] = value.reshape(like.shape) if value.numel() == like.numel() else value
        return state


NATIVE_LAYOUTS: dict[str, NativeLayout] = {}


def layout_for(cfg: ModelConfig) -> NativeLayout | None:
    """The whole-model class that claims a model (None: none does; it is a family's, or remote code's)."""
    return next((layout for layout in NATIVE_LAYOUTS.values() if layout.claims(cfg)), None)


def _period(layers: list[int], n_layers: int) -> tuple[int, int] | None:
    """(period, offset) such that ``layers`` are exactly those i < n_layers with i % period == offset."""
    for period in range(1, n_layers + 1):
        for offset in range(period):
            if [i for i in range(n_layers) if i % period == offset] == layers:
                return period, offset
    return None


def _jamba_parts(cfg: ModelConfig):
    attention = [i for i, m in enumerate(cfg.layer_mixers) if m.kind == "attention"]
    mamba = [i for i, m in enumerate(cfg.layer_mixers) if m.kind == "mamba"]
    experts = [i for i, p in enumerate(cfg.plan) if p.mlp.kind == "moe"]
    return attention, mamba, experts


def _jamba_problems(cfg: ModelConfig) -> list[str]:
    attention, mamba, experts = _jamba_parts(cfg)
    problems = llama_block_problems(cfg) + multiplier_problems(cfg)
    a, s = cfg.layer_mixers[attention[0]], cfg.layer_mixers[mamba[0]]
    if any(cfg.layer_mixers[i] != a for i in attention) or any(cfg.layer_mixers[i] != s for i in mamba):
        problems.append("attention or Mamba layers that differ from one another (Jamba has one of each)")
    if _period(attention, cfg.n_layers) is None:
        problems.append(f"attention in layers {attention}, which no attn_layer_period/offset gives")
    if _period(experts, cfg.n_layers) is None and experts:
        problems.append(f"MoE MLPs in layers {experts}, which no expert_layer_period/offset gives")
    if a.rope_dims != 0:
        problems.append(f"RoPE in attention (rope_dims={a.rope_dims}; Jamba's attention has no positions: 0)")
    problems += [p for p in _attention_layer_problems(a) if not p.startswith("partial RoPE")]
    if a.window is not None or a.qkv_bias or a.o_bias:
        problems.append("a windowed or biased attention layer")
    if s.inner is not None:
        problems.append(f"Mamba with inner={s.inner} given outright (Jamba's width is mamba_expand * hidden_size)")
    if not s.inner_norms or s.norm_eps != cfg.norm.eps:
        problems.append("Mamba without inner_norms, or with norm_eps other than norm.eps (Jamba's one rms_norm_eps)")
    mlps = [p.mlp for p in cfg.plan]
    if any(m.kind not in ("swiglu", "moe") for m in mlps) or len({m.hidden for m in mlps}) > 1:
        problems.append("MLPs other than SwiGLU/MoE, or of different widths (Jamba has one intermediate_size)")
    moe = [m for m in mlps if m.kind == "moe"]
    if moe and (any(m != moe[0] for m in moe) or not _softmax_top_k(moe[0]) or moe[0].norm_topk):
        problems.append("MoE layers that differ, or routing other than Jamba's (softmax, the top k of every "
                        "expert, not renormalised, no groups, score bias, scale or shared experts, plain SwiGLU "
                        "experts)")  # fmt: skip
    return problems


def _jamba_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    attention, mamba, experts = _jamba_parts(cfg)
    a, s = cfg.layer_mixers[attention[0]], cfg.layer_mixers[mamba[0]]
    attn_period, attn_offset = _period(attention, cfg.n_layers)
    moe = cfg.plan[experts[0]].mlp if experts else None
    expert_period, expert_offset = _period(experts, cfg.n_layers) if experts else (1, 0)
    return {
        "model_type": "jamba",
        "intermediate_size": cfg.plan[0].mlp.hidden,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "attn_layer_period": attn_period,
        "attn_layer_offset": attn_offset,
        "expert_layer_period": expert_period,
        "expert_layer_offset": expert_offset,
        "num_experts": moe.n_experts if moe else 1,
        "num_experts_per_tok": moe.top_k if moe else 1,
        # transformers' balance loss is top_k times ours: the same term needs its coefficient over top_k
        "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k if moe else 0.001,
        "mamba_d_state": s.state_dim,
        "mamba_d_conv": s.conv_kernel,
        "mamba_expand": s.expand,
        "mamba_dt_rank": s.dt_rank,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
    }


# A Mamba mixer's weights under transformers' names (Jamba's, Mamba's, Mamba-2's); Mamba's dt bias on its projection
_MAMBA_NAMES = {"conv_weight": "conv1d.weight", "conv_bias": "conv1d.bias", "norm_weight": "norm.weight",
                "dt_norm.weight": "dt_layernorm.weight", "b_norm.weight": "b_layernorm.weight",
                "c_norm.weight": "c_layernorm.weight"}  # fmt: skip


def _mamba_weight(name: str, value: torch.Tensor, kind: str) -> tuple[str, torch.Tensor]:
    """A Mamba mixer's weight (our name within the mixer) under transformers' name, in its layout: the convolution
    as nn.Conv1d holds it, Mamba-1's dt bias on its projection."""
    theirs = "dt_proj.bias" if name == "dt_bias" and kind == "mamba" else _MAMBA_NAMES.get(name, name)
    return theirs, value[:, None] if name == "conv_weight" else value


_JAMBA_MOE = {
    "router.weight": "router.weight",
    "gate_up_proj": "experts.gate_up_proj",
    "down_proj": "experts.down_proj",
}


_JAMBA_TOP = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.final_layernorm.weight"}


def _jamba_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Jamba's names, which Bamba's are too."""
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[_JAMBA_TOP.get(name, name)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        prefix = f"model.layers.{i}."
        if part in ("mixer_norm", "mlp_norm"):
            out[prefix + {"mixer_norm": "input_layernorm.", "mlp_norm": "pre_ff_layernorm."}[part] + rest] = value
        elif part == "mixer" and cfg.layer_mixers[int(i)].kind == "attention":
            out[prefix + "self_attn." + rest] = value
        elif part == "mixer":  # (Jamba's Mamba, Bamba's Mamba-2)
            theirs, value = _mamba_weight(rest, value, cfg.layer_mixers[int(i)].kind)
            out[prefix + "mamba." + theirs] = value
        elif cfg.plan[int(i)].mlp.kind == "moe":
            out[prefix + "feed_forward." + _JAMBA_MOE[rest]] = value
        else:
            out[prefix + "feed_forward." + rest] = value
    return out


def _jamba_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    if not hf.get("mamba_conv_bias", True) or hf.get("mamba_proj_bias", False):
        raise ValueError("config.json: Jamba with mamba_conv_bias=false or mamba_proj_bias=true is not supported")
    n, d, heads = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    attn = (hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4))
    expert = (hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1))
    n_experts, top_k = hf.get("num_experts", 16), hf.get("num_experts_per_tok", 2)
    dt_rank = hf.get("mamba_dt_rank", "auto")
    eps = hf.get("rms_norm_eps", 1e-6)
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": n,
        "max_seq_len": hf.get("max_position_embeddings", 262144),
        "norm": {"kind": "rmsnorm", "eps": eps},
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "pattern": "".join("A" if i % attn[0] == attn[1] else "M" for i in range(n)),
        "mixers": {
            "A": {"kind": "attention", "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
                  "head_dim": hf.get("head_dim") or d // heads, "rope_dims": 0},
            "M": {"kind": "mamba", "state_dim": hf.get("mamba_d_state", 16), "expand": hf.get("mamba_expand", 2),
                  "conv_kernel": hf.get("mamba_d_conv", 4), "dt_rank": -(-d // 16) if dt_rank == "auto" else dt_rank,
                  "inner_norms": True, "norm_eps": eps},
        },
        "mlp_pattern": "".join("E" if n_experts > 1 and i % expert[0] == expert[1] else "D" for i in range(n)),
        "mlps": {
            "D": {"kind": "swiglu", "hidden": hf["intermediate_size"]},
            "E": {"kind": "moe", "hidden": hf["intermediate_size"], "n_experts": max(n_experts, top_k),
                  "top_k": top_k, "aux_loss_coef": hf.get("router_aux_loss_coef", 0.001) * top_k},
        },
    }  # fmt: skip


def _mixer_kinds(cfg: ModelConfig) -> set[str]:
    return {m.kind for m in cfg.layer_mixers}


NATIVE_LAYOUTS["jamba"] = NativeLayout(
    model_type="jamba",
    architecture="JambaForCausalLM",
    describes="attention+mamba as jamba",
    claims=lambda cfg: _mixer_kinds(cfg) == {"attention", "mamba"},
    problems=_jamba_problems,
    to_hf=_jamba_to_hf,
    export_state=_jamba_state,
    from_hf=_jamba_from_hf,
)


# GPT-NeoX (Pythia): attention and a GELU MLP side by side on LayerNorms, the projections biased, RoPE on the
# first rotary_pct of each head, q, k and v fused head by head. A model of attention layers with LayerNorm or a
# parallel residual is its; the problems say what else it needs.

NEOX_ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # hidden_act -> approximate


def _neox_claims(cfg: ModelConfig) -> bool:
    return _mixer_kinds(cfg) == {"attention"} and (cfg.parallel_residual or cfg.norm.kind == "layernorm")


def _neox_problems(cfg: ModelConfig) -> list[str]:
    m, problems = cfg.layer_mixers[0], gemma_problems(cfg) + pre_norm_problems(cfg) + multiplier_problems(cfg)
    if any(x != m for x in cfg.layer_mixers[1:]):
        problems.append("layers with different mixers")
    if cfg.norm.kind != "layernorm":
        problems.append(f"norm {cfg.norm.kind!r} (GPT-NeoX's are LayerNorms)")
    if any(p.mlp != cfg.mlp for p in cfg.plan) or cfg.mlp.kind != "gelu" or not cfg.mlp.bias:
        problems.append("MLPs other than one GELU with biases in every layer")
    problems += [p for p in _attention_layer_problems(m) if not p.startswith("partial RoPE")]
    if m.n_kv_heads != m.n_heads:
        problems.append(f"n_kv_heads={m.n_kv_heads} below n_heads={m.n_heads} (GPT-NeoX's attention is MHA)")
    if m.n_heads * m.head_dim != cfg.d_model:
        problems.append(f"n_heads * head_dim = {m.n_heads * m.head_dim} apart from d_model={cfg.d_model}")
    if m.qkv_bias != m.o_bias or m.window is not None or m.qk_norm:
        problems.append("attention with biases on some projections only, a window or query/key norms")
    return problems


def _neox_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.layer_mixers[0]
    return {
        "model_type": "gpt_neox",
        "intermediate_size": cfg.mlp.hidden,
        "hidden_act": "gelu" if cfg.mlp.approximate == "none" else "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.norm.eps,
        "use_parallel_residual": cfg.parallel_residual,
        "attention_bias": m.qkv_bias,
        "rope_parameters": {**rope_parameters(m), "partial_rotary_factor": m.rope_dims / m.head_dim},
    }


_NEOX_TOP = {"embed_tokens.": "gpt_neox.embed_in.", "norm.": "gpt_neox.final_layer_norm.", "lm_head.": "embed_out."}
_NEOX_PARTS = {"mixer_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               "mixer.o_proj": "attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
               "mlp.down_proj": "mlp.dense_4h_to_h"}  # fmt: skip
_NEOX_QKV = re.compile(r"^(gpt_neox\.layers\.\d+\.attention\.)([qkv])_proj\.(weight|bias)$")


def _neox_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        top = next((p for p in _NEOX_TOP if name.startswith(p)), None)
        if top is not None:
            out[_NEOX_TOP[top] + name.removeprefix(top)] = value
            continue
        _, i, rest = name.split(".", 2)
        part, _, tail = rest.rpartition(".")
        out[f"gpt_neox.layers.{i}.{_NEOX_PARTS.get(part, part.replace('mixer.', 'attention.'))}.{tail}"] = value
    # q, k and v fused as GPT-NeoX holds them: per head, its query rows, key rows, value rows
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name in [n for n in out if _NEOX_QKV.match(n)]:
        prefix, which, tail = _NEOX_QKV.match(name).groups()
        parts.setdefault((prefix, tail), {})[which] = out.pop(name)
    heads = cfg.layer_mixers[0].n_heads
    for (prefix, tail), qkv in parts.items():
        if len(qkv) < 3:  # a part alone (import_state asks each name): its own name
            out.update({f"{prefix}{which}_proj.{tail}": v for which, v in qkv.items()})
            continue
        per_head = [qkv[w].reshape(heads, -1, *qkv[w].shape[1:]) for w in "qkv"]
        out[f"{prefix}query_key_value.{tail}"] = torch.cat(per_head, dim=1).flatten(0, 1)
    return out


_NEOX_BUFFERS = re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")  # old checkpoints hold them


def _neox_prepare(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    heads, out = cfg.layer_mixers[0].n_heads, {}
    for name, value in theirs.items():
        if _NEOX_BUFFERS.search(name):
            continue
        if name == "lm_head.weight":  # (transformers 5 names the head so; checkpoints, embed_out)
            name = "embed_out.weight"
        prefix, fused, tail = name.rpartition("query_key_value.")
        if not fused:
            out[name] = value
            continue
        if value.shape[0] % (3 * heads):
            raise ValueError(f"{name} has {value.shape[0]} rows, not 3 per head of num_attention_heads={heads}")
        q, k, v = value.reshape(heads, 3, -1, *value.shape[1:]).unbind(1)
        out.update({f"{prefix}{w}_proj.{tail}": x.flatten(0, 1) for w, x in zip("qkv", (q, k, v), strict=True)})
    return out


def _neox_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act", "gelu")
    if act not in NEOX_ACTIVATIONS:
        raise ValueError(
            f"config.json: hidden_act={act!r} is not supported for gpt_neox ({', '.join(NEOX_ACTIVATIONS)} are)"
        )
    rope = read_rope(hf)
    n_heads, d = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = d // n_heads
    params = hf.get("rope_parameters") or {}
    rotated = params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    bias = bool(hf.get("attention_bias", True))
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "norm": {"kind": "layernorm", "eps": hf.get("layer_norm_eps", 1e-5)},
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "parallel_residual": bool(hf.get("use_parallel_residual", True)),
        "mixer": {"kind": "attention", "n_heads": n_heads, "n_kv_heads": n_heads, "head_dim": head_dim,
                  "rope_dims": int(head_dim * rotated), "rope_theta": rope.theta, "rope_scaling": rope.scaling,
                  "qkv_bias": bias, "o_bias": bias},
        "mlp": {"kind": "gelu", "hidden": hf["intermediate_size"], "bias": True, "approximate": NEOX_ACTIVATIONS[act]},
    }  # fmt: skip


NATIVE_LAYOUTS["gpt_neox"] = NativeLayout(
    model_type="gpt_neox",
    architecture="GPTNeoXForCausalLM",
    describes="attention with LayerNorm or parallel_residual as gpt_neox",
    claims=_neox_claims,
    problems=_neox_problems,
    to_hf=_neox_to_hf,
    export_state=_neox_state,
    from_hf=_neox_from_hf,
    prepare=_neox_prepare,
)


# Gemma's three generations of classes, each with GeGLU, embeddings times sqrt(hidden_size) and every RMSNorm
# weighing by 1 + w (unit_offset): gemma (Gemma 1: Llama's block, full attention); gemma2 ("sandwich" norms:
# post_norms; sliding windows on the layers layer_types names; scores and logits soft-capped; the softmax scale from
# query_pre_attn_scalar); gemma3_text (as gemma2 with query and key norms in every layer, each kind of layer with its
# own RoPE, 5 windowed layers of 6 in Gemma 3, its logits' soft cap off by default).


def _gemma_generation(cfg: ModelConfig) -> str:
    """The Gemma class a model with Gemma's parts exports to: gemma without post norms, gemma3_text with query and
    key norms, else gemma2."""
    if not cfg.post_norms:
        return "gemma"
    return "gemma3_text" if any(getattr(m, "qk_norm", False) for m in cfg.layer_mixers) else "gemma2"


def _gemma_claims(model_type: str) -> Callable[[ModelConfig], bool]:
    def claims(cfg: ModelConfig) -> bool:  # any of Gemma's parts, and this generation's
        gemma = _mixer_kinds(cfg) == {"attention"} and cfg.pre_norms and bool(gemma_problems(cfg))
        return gemma and _gemma_generation(cfg) == model_type

    return claims


def _gemma_problems(cfg: ModelConfig, model_type: str) -> list[str]:
    problems = pre_norm_problems(cfg) + multiplier_problems(cfg, but=("embed_scale",))
    post = model_type != "gemma"
    if (
        cfg.post_norms != post
        or cfg.embed_scale != cfg.d_model**0.5
        or cfg.norm.kind != "rmsnorm"
        or not cfg.norm.unit_offset
    ):
        has = "post norms" if post else "no post norms"
        problems.append(f"post_norms={cfg.post_norms}, embed_scale={cfg.embed_scale}, norm {cfg.norm.kind!r} with "
                        f"unit_offset={cfg.norm.unit_offset} ({model_type} has {has}, RMSNorms weighing by 1 + w, "
                        f"embeddings times sqrt(d_model) = {cfg.d_model**0.5:g})")  # fmt: skip
    if cfg.parallel_residual:
        problems.append("parallel_residual (the MLP after the mixer is needed)")
    if any(p.mlp != cfg.mlp for p in cfg.plan) or cfg.mlp.kind != "geglu":
        problems.append("MLPs other than one GeGLU in every layer")
    kinds = attention_of_layer_types(cfg)
    for m in cfg.layer_mixers:
        same = kinds["sliding_attention" if m.window is not None else "full_attention"]
        if m != same:
            problems.append("layers of one kind (windowed, or full) that differ (Gemma has one setting per kind)")
            break
    present = [m for m in kinds.values() if m is not None]
    a = present[0]
    for m in present:  # (Gemma 2 and 3's softmax scale is their query_pre_attn_scalar; their caps: below)
        own = ("softmax_scale", "soft-capped") if post else ()
        problems += [p for p in _attention_layer_problems(m) if p not in problems and not any(o in p for o in own)]
    shared = ("n_heads", "n_kv_heads", "head_dim", "qkv_bias", "o_bias", "qk_norm", "qk_norm_eps", "softmax_scale",
              "softcap")  # fmt: skip
    if any(getattr(m, f) != getattr(a, f) for m in present for f in shared):
        problems.append("the windowed and full layers' heads, biases, norms, scales or caps differ")
    if a.qkv_bias != a.o_bias:
        problems.append("biases on some of the attention's projections only")
    if model_type == "gemma3_text" and a.softcap is not None:
        problems.append(f"soft-capped scores (softcap={a.softcap}: transformers' Gemma 3 reads "
                        "attn_logit_softcapping and does not apply it; Gemma 2's class does)")  # fmt: skip
    if model_type == "gemma3_text" and (not a.qk_norm or not a.qk_norm_unit_offset or a.qk_norm_eps != cfg.norm.eps):
        problems.append("attention without qk_norm (unit_offset, at the model's norm eps)")
    if model_type != "gemma3_text" and any(m.qk_norm for m in present):
        problems.append(f"query and key norms (qk_norm: Gemma 3's, which {model_type} has not)")
    if model_type != "gemma3_text" and not same_but(a, present[-1], ("window",)):
        problems.append(f"RoPE per kind of layer (Gemma 3's; {model_type} has one)")
    if model_type == "gemma" and (kinds["sliding_attention"] is not None or cfg.logit_softcap is not None):
        problems.append(f"windows={kinds['sliding_attention'] is not None}, logit_softcap={cfg.logit_softcap} "
                        "(the first Gemma's attention is full, its logits uncapped: Gemma 2's have these, with "
                        "post_norms)")  # fmt: skip
    return problems


def _gemma_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    kinds = attention_of_layer_types(cfg)
    a = next(m for m in kinds.values() if m is not None)
    hf = {
        "model_type": model_type,
        "intermediate_size": cfg.mlp.hidden,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": "gelu_pytorch_tanh",  # (in place of the common fields' silu; Gemma 2 and 3 read the next)
        "attention_bias": a.qkv_bias,
        "rope_parameters": rope_parameters(a),
    }
    if model_type == "gemma":
        return hf
    if model_type == "gemma3_text":
        hf["rope_parameters"] = {kind: rope_parameters(m or a) for kind, m in kinds.items()}
    return {
        **hf,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": a.head_dim if a.softmax_scale is None else _scalar(a.softmax_scale),
        # (transformers builds the windowed mask whether a layer uses it or not: a window over every position)
        "sliding_window": kinds["sliding_attention"].window if kinds["sliding_attention"] else cfg.max_seq_len,
        "layer_types": ["sliding_attention" if m.window is not None else "full_attention" for m in cfg.layer_mixers],
        "final_logit_softcapping": cfg.logit_softcap,
        "attn_logit_softcapping": a.softcap,
    }


_GEMMA_NORMS = {"mixer_norm": "input_layernorm", "mixer_post_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}  # fmt: skip


def _scalar(softmax_scale: float) -> int | float:
    """Gemma's query_pre_attn_scalar for a softmax scale: s with s**-0.5 the scale (an integer where it is one)."""
    s = softmax_scale**-2
    return round(s) if abs(s - round(s)) < 1e-6 * s else s


def _llama_top_name(name: str) -> str:
    """One of our names outside the layers as Llama's class holds it (under model., but the head)."""
    return name if name == "lm_head.weight" else "model." + name


def _gemma_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Names with post norms (Gemma 2 and 3, OLMo), or Llama's without them (Gemma 1)."""
    norms = (
        _GEMMA_NORMS if cfg.post_norms else {"mixer_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    )
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[_llama_top_name(name)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        part = norms.get(part, {"mixer": "self_attn"}.get(part, part))
        out[f"model.layers.{i}.{part}.{rest}"] = value
    return out


def _gemma_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    hf = transformers.AutoConfig.for_model(**hf).to_dict()  # layer_types and rope_parameters as transformers reads them
    model_type = hf["model_type"]
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention=true is not supported (kvlab's models are causal)")
    if model_type == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        raise ValueError(f"config.json: attn_logit_softcapping={hf['attn_logit_softcapping']} with model_type "
                         "gemma3_text is not supported: transformers' Gemma 3 does not apply it (Gemma 2's does), so "
                         "which model the checkpoint is cannot be told")  # fmt: skip
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"  # (Gemma 1 reads hidden_act)
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"config.json: hidden_activation={act!r} is not supported (GeGLU with tanh's GELU is)")
    n_heads, d = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or d // n_heads
    # Gemma 2 and 3 scale scores by query_pre_attn_scalar**-0.5 (Gemma 3 27B: 168, heads of 128); Gemma 1 by head_dim's
    scalar = hf.get("query_pre_attn_scalar") or head_dim
    eps, bias = hf.get("rms_norm_eps", 1e-6), bool(hf.get("attention_bias"))
    qk_norm = model_type == "gemma3_text"
    attention = {"kind": "attention", "n_heads": n_heads, "n_kv_heads": hf["num_key_value_heads"],
                 "head_dim": head_dim, "qkv_bias": bias, "o_bias": bias, "softcap": hf.get("attn_logit_softcapping"),
                 "softmax_scale": None if scalar == head_dim else float(scalar) ** -0.5,
                 **({"qk_norm": True, "qk_norm_eps": eps, "qk_norm_unit_offset": True} if qk_norm else {})}  # fmt: skip
    types = hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"],
        "max_seq_len": hf.get("max_position_embeddings", 131072),
        "norm": {"kind": "rmsnorm", "eps": eps, "unit_offset": True},
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "post_norms": model_type != "gemma",
        "embed_scale": d**0.5, "logit_softcap": hf.get("final_logit_softcapping"),
        **layers_of_types(hf, attention, types),
        "mlp": {"kind": "geglu", "hidden": hf["intermediate_size"]},
    }  # fmt: skip


for _type, _architecture, _names in (
    ("gemma", "GemmaForCausalLM", "Llama's block"),
    ("gemma2", "Gemma2ForCausalLM", "post_norms, without qk_norm"),
    ("gemma3_text", "Gemma3ForCausalLM", "post_norms and qk_norm"),
):
    NATIVE_LAYOUTS[_type] = NativeLayout(
        model_type=_type,
        architecture=_architecture,
        describes=f"attention with Gemma's parts (unit-offset norms, embed_scale) and {_names} as {_type}",
        claims=_gemma_claims(_type),
        problems=functools.partial(_gemma_problems, model_type=_type),
        to_hf=functools.partial(_gemma_to_hf, model_type=_type),
        export_state=_gemma_state,
        from_hf=_gemma_from_hf,
    )


# Gemma 3's multimodal checkpoints (4B, 12B, 27B: Gemma3ForConditionalGeneration): their text model, read as
# gemma3_text; the vision tower and its projector are not read (kvlab's models take tokens). Exported back as
# gemma3_text.
_GEMMA_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                        ("language_model.lm_head.", "lm_head."))  # fmt: skip
_GEMMA_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _gemma_text_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in theirs.items():
        if name.startswith(_GEMMA_VISION):
            continue
        old, new = next(((o, n) for o, n in _GEMMA_TEXT_PREFIXES if name.startswith(o)), ("", ""))
        out[new + name.removeprefix(old)] = value
    return out


NATIVE_LAYOUTS["gemma3"] = NativeLayout(
    model_type="gemma3",
    architecture="Gemma3ForConditionalGeneration",
    describes="",  # (no model exports to it)
    claims=lambda cfg: False,  # a text model exports as gemma3_text
    problems=functools.partial(_gemma_problems, model_type="gemma3_text"),
    to_hf=functools.partial(_gemma_to_hf, model_type="gemma3_text"),
    export_state=_gemma_state,
    from_hf=lambda hf: _gemma_from_hf({"model_type": "gemma3_text", **hf.get("text_config", {})}),
    prepare=_gemma_text_weights,
)


# OLMo 2 (and OLMo 3, its windows on the layers layer_types names): no norm before the attention or the MLP,
# an RMSNorm after each (post_norms, pre_norms false); queries and keys RMS-normalised over the whole projection
# (qk_norm_over: projection); SwiGLU. Names as Gemma's post norms (_gemma_state).


def _olmo_claims(cfg: ModelConfig) -> bool:  # (OLMoE's: norms before the sublayers and experts; EXAONE 4.0's)
    olmoe = cfg.pre_norms and _moe_of(cfg) is not None
    return (_mixer_kinds(cfg) == {"attention"} and (not cfg.pre_norms or _projection_norms(cfg)) and not olmoe
            and not _exaone4_claims(cfg))  # fmt: skip


def _olmo_problems(cfg: ModelConfig) -> list[str]:
    problems = multiplier_problems(cfg)
    if cfg.logit_softcap is not None:
        problems.append(f"logit_softcap={cfg.logit_softcap} (Gemma 2's)")
    if cfg.norm.unit_offset or any(m.qk_norm_unit_offset for m in cfg.layer_mixers):
        problems.append("norms weighing by 1 + w (Gemma's)")
    if cfg.pre_norms or not cfg.post_norms or cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"pre_norms={cfg.pre_norms}, post_norms={cfg.post_norms}, norm {cfg.norm.kind!r}, "
                        f"parallel_residual={cfg.parallel_residual} (OLMo 2 normalises each sublayer's output alone, "
                        "with RMSNorms, one after the other)")  # fmt: skip
    problems += one_swiglu_problems(cfg)
    mixers = cfg.layer_mixers
    m = mixers[0]
    kinds = attention_of_layer_types(cfg)  # (OLMo 3's two kinds of layer, each with its RoPE)
    if any(x != kinds["sliding_attention" if x.window is not None else "full_attention"] for x in mixers):
        problems.append("layers of one kind (windowed, or full) that differ (OLMo 3 has one setting per kind)")
    present = [x for x in kinds.values() if x is not None]
    if any(not same_but(x, m, ("window", "rope_theta", "rope_scaling")) for x in present):
        problems.append("the windowed and full layers differ by more than their window and RoPE")
    windows = {x.window for x in mixers} - {None}
    if len(windows) > 1:
        problems.append(f"windows of different sizes ({sorted(windows)}; one sliding_window is needed)")
    problems += _attention_layer_problems(m)
    if not m.qk_norm or m.qk_norm_over != "projection" or m.qk_norm_eps != cfg.norm.eps or m.qkv_bias != m.o_bias:
        problems.append("attention without query and key norms over the projections at the model's norm eps, or "
                        "with biases on some projections only")  # fmt: skip
    return problems


def _olmo_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.layer_mixers[0]
    windows = {x.window for x in cfg.layer_mixers} - {None}
    hf = {
        "model_type": "olmo3" if windows else "olmo2",
        "intermediate_size": cfg.mlp.hidden,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,  # (the classes read it where given, else hidden_size / num_attention_heads)
        "attention_bias": m.qkv_bias,
        "rope_parameters": rope_parameters(m),
    }
    if windows:  # OLMo 3: RoPE per kind of layer
        hf["rope_parameters"] = {kind: rope_parameters(x or m) for kind, x in attention_of_layer_types(cfg).items()}
        hf["sliding_window"] = next(iter(windows))
        hf["layer_types"] = [
            "sliding_attention" if x.window is not None else "full_attention" for x in cfg.layer_mixers
        ]
    return hf


def _olmo_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    check_silu(hf)
    hf = transformers.AutoConfig.for_model(**hf).to_dict()  # (OLMo 3's layer_types as transformers derives them)
    n_heads, d, eps = hf["num_attention_heads"], hf["hidden_size"], hf.get("rms_norm_eps", 1e-6)
    bias = bool(hf.get("attention_bias"))
    types = hf.get("layer_types") or ["full_attention"] * hf["num_hidden_layers"]  # (OLMo 2: every layer full)
    attention = {"kind": "attention", "n_heads": n_heads, "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
                 "head_dim": hf.get("head_dim") or d // n_heads, "qkv_bias": bias, "o_bias": bias, "qk_norm": True,
                 "qk_norm_eps": eps, "qk_norm_over": "projection"}  # fmt: skip
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"],
        "max_seq_len": hf.get("max_position_embeddings", 4096), "norm": {"kind": "rmsnorm", "eps": eps},
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "pre_norms": False, "post_norms": True,
        **layers_of_types(hf, attention, types),
        "mlp": {"kind": "swiglu", "hidden": hf["intermediate_size"]},
    }  # fmt: skip


for _olmo in ("olmo2", "olmo3"):
    NATIVE_LAYOUTS[_olmo] = NativeLayout(
        model_type=_olmo,
        architecture=f"{_olmo.capitalize()}ForCausalLM",
        describes="" if _olmo == "olmo3" else "attention with post norms alone as olmo2 (with windows: olmo3)",
        claims=_olmo_claims if _olmo == "olmo2" else lambda cfg: False,  # (olmo2's to_hf picks between them)
        problems=_olmo_problems,
        to_hf=_olmo_to_hf,
        export_state=_gemma_state,
        from_hf=_olmo_from_hf,
    )


# OLMoE: Llama's block (norms before the sublayers) with OLMo's query and key norms over the whole projections and
# a mixture of 64 SwiGLU experts in every layer, routed by softmax and top-8 (the chosen scores as they are).


def _olmoe_claims(cfg: ModelConfig) -> bool:
    return _mixer_kinds(cfg) == {"attention"} and cfg.pre_norms and _projection_norms(cfg) and _moe_of(cfg) is not None


def _olmoe_problems(cfg: ModelConfig) -> list[str]:
    problems = gemma_problems(cfg) + multiplier_problems(cfg)
    if cfg.post_norms or cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"post_norms={cfg.post_norms}, norm {cfg.norm.kind!r}, parallel_residual="
                        f"{cfg.parallel_residual} (OLMoE has Llama's block)")  # fmt: skip
    m, moe = cfg.layer_mixers[0], _moe_of(cfg)
    if any(x != m for x in cfg.layer_mixers) or any(p.mlp != moe for p in cfg.plan):
        problems.append("layers that differ (OLMoE has one attention and one MoE in every layer)")
    problems += _attention_layer_problems(m)
    if m.window is not None or m.qk_norm_eps != cfg.norm.eps or m.qkv_bias != m.o_bias:
        problems.append(f"window={m.window}, qk_norm_eps={m.qk_norm_eps}, qkv_bias={m.qkv_bias}, o_bias={m.o_bias} "
                        "(OLMoE: full attention, its norms at the model's eps, biases on all projections or "
                        "none)")  # fmt: skip
    if m.n_heads * m.head_dim != cfg.d_model:
        problems.append(f"n_heads * head_dim = {m.n_heads * m.head_dim} apart from d_model={cfg.d_model} (OLMoE's "
                        "query norm spans hidden_size)")  # fmt: skip
    if not _softmax_top_k(moe):
        problems.append("MoE routing other than OLMoE's (softmax, top-k, no shared experts, groups, bias or scale, "
                        "plain SwiGLU experts)")  # fmt: skip
    return problems


def _olmoe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m, moe = cfg.layer_mixers[0], _moe_of(cfg)
    return {
        "model_type": "olmoe", "num_key_value_heads": m.n_kv_heads, "attention_bias": m.qkv_bias,
        "rope_parameters": rope_parameters(m), "intermediate_size": moe.hidden, "num_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.norm_topk, "clip_qkv": None,
        # transformers' balance loss is top_k times ours: the same term, its coefficient over top_k
        "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k,
    }  # fmt: skip


def _olmoe_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from kvlab.archs.hf import kvlab_to_hf_name  # (Llama's names: the module imports this one)

    return {kvlab_to_hf_name(name): value for name, value in state.items()}


def _olmoe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"config.json: clip_qkv={hf['clip_qkv']} is not supported (kvlab clamps no projections)")
    n_heads, d, eps = hf["num_attention_heads"], hf["hidden_size"], hf.get("rms_norm_eps", 1e-5)
    rope, bias, top_k = read_rope(hf), bool(hf.get("attention_bias")), hf.get("num_experts_per_tok", 8)
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"],
        "max_seq_len": hf.get("max_position_embeddings", 4096), "norm": {"kind": "rmsnorm", "eps": eps},
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "mixer": {"kind": "attention", "n_heads": n_heads, "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
                  "head_dim": d // n_heads, "qkv_bias": bias, "o_bias": bias, "qk_norm": True, "qk_norm_eps": eps,
                  "qk_norm_over": "projection", "rope_theta": rope.theta, "rope_scaling": rope.scaling},
        "mlp": {"kind": "moe", "hidden": hf["intermediate_size"], "n_experts": hf.get("num_experts", 64),
                "top_k": top_k, "norm_topk": bool(hf.get("norm_topk_prob", False)),
                "aux_loss_coef": hf.get("router_aux_loss_coef", 0.01) * top_k},
    }  # fmt: skip


NATIVE_LAYOUTS["olmoe"] = NativeLayout(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    describes="attention with query and key norms over the projections and experts, norms before them, as olmoe",
    claims=_olmoe_claims,
    problems=_olmoe_problems,
    to_hf=_olmoe_to_hf,
    export_state=_olmoe_state,
    from_hf=_olmoe_from_hf,
)


# gpt-oss (OpenAI 2025; `transformers`' GptOssForCausalLM): Llama's block; attention with biases on every projection
# or none (attention_bias), a learned sink logit per head (its ``sinks``), windows of sliding_window on the layers
# layer_types names (every other one), YaRN (truncate false); in every layer a mixture of experts with biases and the
# clamped SwiGLU, routed by a softmax over the top k logits (= the top k of the softmax, renormalised). Its experts
# are kept transposed, gate_up_proj [E, D, 2H] with the gate's and the up projection's columns interleaved and
# down_proj [E, H, D]; OpenAI's checkpoints hold both as MXFP4 (blocks of 32 four-bit values and a power-of-two
# scale each), dequantized on import.

_GPT_OSS_EXPERTS = {"gate_up_proj": "experts.gate_up_proj", "gate_up_bias": "experts.gate_up_proj_bias",
                    "down_proj": "experts.down_proj", "down_bias": "experts.down_proj_bias"}  # fmt: skip
_MXFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1's magnitudes; the code's fourth bit is the sign


def _gpt_oss_claims(cfg: ModelConfig) -> bool:
    return _mixer_kinds(cfg) == {"attention"} and any(m.learned_sinks for m in cfg.layer_mixers)


def _gpt_oss_problems(cfg: ModelConfig) -> list[str]:
    problems = llama_block_problems(cfg) + multiplier_problems(cfg)
    m, moe = cfg.layer_mixers[0], _moe_of(cfg)
    if any(not same_but(x, m, ("window",)) for x in cfg.layer_mixers):
        problems.append("attention layers that differ beyond their window (gpt-oss has one, sinks in every layer)")
    windows = {x.window for x in cfg.layer_mixers} - {None}
    if len(windows) > 1:
        problems.append(f"windows of sizes {sorted(windows)} (gpt-oss has one sliding_window)")
    problems += [p for p in _attention_layer_problems(m) if not p.startswith("learned sink logits")]
    if m.qk_norm or m.qkv_bias != m.o_bias:
        problems.append(f"qk_norm={m.qk_norm}, qkv_bias={m.qkv_bias}, o_bias={m.o_bias} (gpt-oss: no query or key "
                        "norms, biases on every projection or none)")  # fmt: skip
    if m.rope_scaling is not None and m.rope_scaling["kind"] == "longrope":
        problems.append("LongRoPE beside learned sinks (not checked against gpt-oss's class)")
    if moe is None or any(p.mlp != moe for p in cfg.plan):
        problems.append("MLPs other than one MoE in every layer (gpt-oss's)")
    elif not (_softmax_top_k(moe, clamped=True) and moe.norm_topk):
        problems.append(f"experts other than gpt-oss's (norm_topk={moe.norm_topk}, bias={moe.bias}, swiglu_limit="
                        f"{moe.swiglu_limit}, score={moe.score!r}, n_shared={moe.n_shared}; its: the top k "
                        "renormalised, biases, the clamped SwiGLU, softmax, no shared experts, groups, score bias or "
                        "scale)")  # fmt: skip
    return problems


def _gpt_oss_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m, moe = cfg.layer_mixers[0], _moe_of(cfg)
    window = next((x.window for x in cfg.layer_mixers if x.window is not None), None)
    return {
        "model_type": "gpt_oss", "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim,
        "attention_bias": m.qkv_bias, "rope_parameters": rope_parameters(m),
        "sliding_window": window or cfg.max_seq_len,  # (a field it always reads; no layer has one if None)
        "layer_types": ["full_attention" if x.window is None else "sliding_attention" for x in cfg.layer_mixers],
        "intermediate_size": moe.hidden, "num_local_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
        "swiglu_limit": moe.swiglu_limit, "swiglu_alpha": moe.swiglu_alpha,
        # transformers' balance loss is top_k times ours: the same term, its coefficient over top_k
        "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k,
    }  # fmt: skip


def _gpt_oss_name(name: str) -> str:
    from kvlab.archs.hf import kvlab_to_hf_name  # (Llama's names: the module imports this one)

    if name.endswith(".mixer.sink_logits"):
        return "model." + name.replace(".mixer.sink_logits", ".self_attn.sinks")
    if ".mlp." in name:  # its router keeps our name
        prefix, _, last = name.rpartition(".mlp.")
        return f"model.{prefix}.mlp.{_GPT_OSS_EXPERTS.get(last, last)}"
    return kvlab_to_hf_name(name)


def _interleaved(gate_up: torch.Tensor) -> torch.Tensor:
    """[E, 2H, ...] rows gate then up -> the gate's and the up projection's rows alternating (gpt-oss's)."""
    return gate_up.unflatten(1, (2, gate_up.shape[1] // 2)).transpose(1, 2).reshape(gate_up.shape)


def _gpt_oss_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        last = name.rpartition(".")[2]
        if last in ("gate_up_proj", "gate_up_bias"):
            value = _interleaved(value)
        if last in ("gate_up_proj", "down_proj"):  # theirs are [E, in, out]
            value = value.transpose(1, 2)
        out[_gpt_oss_name(name)] = value
    return out


def _gpt_oss_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Their experts in our layouts, under their names: MXFP4 dequantized, [E, in, out] transposed, the gate's and
    the up projection's rows apart again."""
    out = {}
    for name, value in theirs.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):  # (dequantized as [E, out, in]: not transposed)
            name, value = (
                name.removesuffix("_blocks"),
                dequantize_mxfp4(value, theirs[name[: -len("blocks")] + "scales"]),
            )
        elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            value = value.transpose(1, 2)
        if name.endswith((".experts.gate_up_proj", ".experts.gate_up_proj_bias")):  # rows: gate, up, gate, ...
            value = torch.cat([value[:, 0::2], value[:, 1::2]], dim=1)
        out[name] = value
    return out


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 (OCP's microscaling format, as OpenAI's gpt-oss checkpoints hold their experts) as float32: ``blocks``
    [..., G, 16] bytes, each two 4-bit E2M1 codes (the low nibble first: sign bit, then the index of its magnitude),
    ``scales`` [..., G] E8M0 exponents (2**(e - 127) for the group's 32 values) -> [..., G * 32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 weights: blocks {list(blocks.shape)} {blocks.dtype}, scales {list(scales.shape)} "
                         f"{scales.dtype} (uint8 blocks [..., G, 16] and scales [..., G] are needed)")  # fmt: skip
    if blocks.dim() > 2:  # one leading index at a time: a layer's codes as indices would take 8 bytes per weight
        return torch.stack([dequantize_mxfp4(b, s) for b, s in zip(blocks, scales, strict=True)])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).int()  # [G, 32]
    magnitude = torch.tensor(_MXFP4_VALUES)[codes & 0x7]
    values = torch.where(codes >= 8, -magnitude, magnitude)
    return torch.ldexp(values, scales.int()[..., None] - 127).flatten(-2)


def _gpt_oss_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    quantized = hf.get("quantization_config") or {}
    if quantized and quantized.get("quant_method") != "mxfp4":
        raise ValueError(f"config.json: quantization_config.quant_method={quantized.get('quant_method')!r} is not "
                         "supported (mxfp4, OpenAI's, is dequantized on import)")  # fmt: skip
    derived = transformers.GptOssConfig(**{k: v for k, v in hf.items() if k != "quantization_config"})
    read = {
        "model_type": "gpt_oss",
        "rope_parameters": derived.rope_parameters,
        "max_position_embeddings": derived.max_position_embeddings,
        "sliding_window": derived.sliding_window,
    }
    bias, top_k = bool(derived.attention_bias), derived.num_experts_per_tok
    attention = {
        "kind": "attention",
        "n_heads": derived.num_attention_heads,
        "head_dim": derived.head_dim,
        "n_kv_heads": derived.num_key_value_heads,
        "qkv_bias": bias,
        "o_bias": bias,
        "learned_sinks": True,
    }
    return {
        "vocab_size": derived.vocab_size, "d_model": derived.hidden_size, "n_layers": derived.num_hidden_layers,
        "max_seq_len": derived.max_position_embeddings, "norm": {"kind": "rmsnorm", "eps": derived.rms_norm_eps},
        "tie_embeddings": bool(derived.tie_word_embeddings),
        **layers_of_types(read, attention, derived.layer_types),
        "mlp": {"kind": "moe", "hidden": derived.intermediate_size, "n_experts": derived.num_local_experts,
                "top_k": top_k, "norm_topk": True, "bias": True, "swiglu_limit": float(derived.swiglu_limit),
                "swiglu_alpha": float(derived.swiglu_alpha), "aux_loss_coef": derived.router_aux_loss_coef * top_k},
    }  # fmt: skip


NATIVE_LAYOUTS["gpt_oss"] = NativeLayout(
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    describes="attention with learned sinks and experts with biases and the clamped SwiGLU, as gpt_oss",
    claims=_gpt_oss_claims,
    problems=_gpt_oss_problems,
    to_hf=_gpt_oss_to_hf,
    export_state=_gpt_oss_state,
    from_hf=_gpt_oss_from_hf,
    prepare=_gpt_oss_weights,
)


# Mamba and Mamba-2 (`transformers`' MambaForCausalLM, Mamba2ForCausalLM: state-spaces' and Codestral's
# checkpoints): every layer an RMSNorm and the mixer on the residual, no MLP. The convolution as nn.Conv1d holds
# it; Mamba's dt bias on its projection. They have no position limit: max_seq_len travels in config.json as
# max_position_embeddings, which they do not read (a hub config has none: NO_POSITION_LIMIT).

NO_POSITION_LIMIT = 2**20
_MAMBA_TOP = {"embed_tokens.weight": "backbone.embeddings.weight", "norm.weight": "backbone.norm_f.weight"}


def _mamba_problems(cfg: ModelConfig) -> list[str]:
    m, problems = cfg.layer_mixers[0], gemma_problems(cfg) + pre_norm_problems(cfg) + multiplier_problems(cfg)
    if any(x != m for x in cfg.layer_mixers[1:]):
        problems.append(f"{m.kind} layers that differ (its class has one mixer in every layer)")
    if cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"norm {cfg.norm.kind!r} or parallel_residual (an RMSNorm before the mixer is needed)")
    if any(p.mlp.kind != "none" for p in cfg.plan):
        problems.append(f"MLPs ({'/'.join(sorted({p.mlp.kind for p in cfg.plan}))}; its blocks have none: kind none)")
    if m.kind == "mamba" and m.inner_norms:
        problems.append("Mamba with inner_norms (Jamba's; MambaForCausalLM has none)")
    if m.kind == "mamba2" and m.norm_eps != cfg.norm.eps:
        problems.append(f"Mamba-2 norm_eps={m.norm_eps} apart from norm.eps={cfg.norm.eps} (its class has one "
                        "layer_norm_epsilon)")  # fmt: skip
    if m.kind == "mamba2" and m.inner is not None:
        problems.append(f"Mamba-2 with inner={m.inner} given outright (its width is expand * hidden_size)")
    if m.kind == "mamba2" and not m.gated_norm:
        problems.append("Mamba-2 with gated_norm=False (its output is normalised)")
    return problems


def _mamba_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.layer_mixers[0]
    hf = {"model_type": m.kind, "hidden_size": cfg.d_model, "state_size": m.state_dim, "expand": m.expand,
          "conv_kernel": m.conv_kernel, "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": cfg.norm.eps,
          "max_position_embeddings": cfg.max_seq_len}  # fmt: skip
    if m.kind == "mamba":  # (its class reads intermediate_size where config.json gives it)
        inner = inner_width(m, cfg.d_model)
        return hf | {"time_step_rank": m.dt_rank, "intermediate_size": inner}
    return hf | {"num_heads": m.expand * cfg.d_model // m.head_dim, "head_dim": m.head_dim, "n_groups": m.n_groups,
                 "chunk_size": m.chunk_size, "time_step_limit": [0.0, float("inf")]}  # fmt: skip


def _mamba_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[_MAMBA_TOP.get(name, name)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        if part == "mixer_norm":
            out[f"backbone.layers.{i}.norm.{rest}"] = value
        else:
            theirs, value = _mamba_weight(rest, value, cfg.layer_mixers[0].kind)
            out[f"backbone.layers.{i}.mixer.{theirs}"] = value
    return out


def time_step_limit(hf: dict[str, Any]) -> tuple[float, ...]:
    """A Mamba-2 config.json's time_step_limit as floats: transformers writes infinity as {"__float__": "Infinity"}
    (JSON has none), and config classes take floats."""
    return tuple(float(x["__float__"]) if isinstance(x, dict) else float(x)
                 for x in hf.get("time_step_limit") or (0.0, float("inf")))  # fmt: skip


def class_config(name: str, hf: dict[str, Any]):
    """config.json as `transformers`' config class ``name`` reads it: its defaults filled, time_step_limit's JSON
    infinity parsed where config.json gives one (``time_step_limit``)."""
    import transformers

    fields = {k: v for k, v in hf.items() if k != "model_type"}
    if "time_step_limit" in hf:
        fields["time_step_limit"] = time_step_limit(hf)
    return getattr(transformers, name)(**fields)


def _mamba_from_hf(hf: dict[str, Any], width_given: bool = False) -> dict[str, Any]:
    """``width_given``: Mamba-2's width is its heads' (num_heads * head_dim), whatever expand says (Nemotron-H's)."""
    falcon, d = hf["model_type"] == "falcon_mamba", hf["hidden_size"]
    kind = "mamba" if falcon else hf["model_type"]
    if hf.get("use_bias", False) or not hf.get("use_conv_bias", True):
        raise ValueError(f"config.json: use_bias={hf.get('use_bias')}, use_conv_bias={hf.get('use_conv_bias')} is not "
                         "supported (kvlab's Mamba projections have no biases, its convolution has one)")  # fmt: skip
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (Mamba's silu is)")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    mixer: dict[str, Any] = {"kind": kind, "state_dim": hf.get("state_size", 16 if kind == "mamba" else 128),
                             "expand": hf.get("expand", 2), "conv_kernel": hf.get("conv_kernel", 4)}  # fmt: skip
    if kind == "mamba":
        rank = hf.get("time_step_rank", "auto")
        mixer["dt_rank"] = -(-d // 16) if rank == "auto" else rank
        inner = hf.get("intermediate_size") or int(mixer["expand"] * d)  # (which its class reads first)
        if inner != mixer["expand"] * d:
            mixer.update(inner=inner, expand=max(1, round(mixer["expand"])))
        if falcon:  # its RMS norms of dt, B and C, weightless: ours with weights of one (_falcon_norms)
            mixer.update(inner_norms=True, norm_eps=hf.get("mixer_rms_eps", 1e-6))
    else:
        limit = time_step_limit(hf)
        if limit[0] > 0 or limit[1] != float("inf"):
            raise ValueError(f"config.json: time_step_limit={limit} is not supported (kvlab does not clamp dt)")
        heads, head_dim = hf.get("num_heads", 128), hf.get("head_dim", 64)
        if width_given and heads * head_dim != mixer["expand"] * d:
            mixer["inner"] = heads * head_dim
        elif heads * head_dim != mixer["expand"] * d:
            raise ValueError(f"config.json: num_heads * head_dim = {heads * head_dim} apart from expand * "
                             f"hidden_size = {mixer['expand'] * d} is not supported")  # fmt: skip
        mixer.update(head_dim=head_dim, n_groups=hf.get("n_groups", 8), chunk_size=hf.get("chunk_size", 256),
                     norm_eps=eps)  # fmt: skip
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"],
        "max_seq_len": hf.get("max_position_embeddings") or NO_POSITION_LIMIT,
        "norm": {"kind": "rmsnorm", "eps": eps}, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "mixer": mixer, "mlp": {"kind": "none"},
    }  # fmt: skip


def _falcon_norms(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Falcon-Mamba's inner norms have no weights: ours, which do, start at one (exported then as remote code, a
    trained weight being one no longer)."""
    m = cfg.layer_mixers[0]
    widths = {"dt_layernorm": m.dt_rank, "b_layernorm": m.state_dim, "c_layernorm": m.state_dim}
    ones = {f"backbone.layers.{i}.mixer.{norm}.weight": torch.ones(width)
            for i in range(cfg.n_layers) for norm, width in widths.items()}  # fmt: skip
    return {**theirs, **ones}


# read only (describes nothing): a Mamba with inner norms exports as remote code
NATIVE_LAYOUTS["falcon_mamba"] = NativeLayout(
    model_type="falcon_mamba",
    architecture="FalconMambaForCausalLM",
    describes="",
    claims=lambda cfg: False,
    problems=_mamba_problems,
    to_hf=_mamba_to_hf,
    export_state=_mamba_state,
    from_hf=_mamba_from_hf,
    prepare=_falcon_norms,
)

for _kind, _class in (("mamba", "MambaForCausalLM"), ("mamba2", "Mamba2ForCausalLM")):
    NATIVE_LAYOUTS[_kind] = NativeLayout(
        model_type=_kind,
        architecture=_class,
        describes=f"{_kind} alone, without MLPs, as {_kind}",
        # (Mamba-2 with squared-ReLU MLPs is Nemotron-H's)
        claims=functools.partial(lambda kind, cfg: _mixer_kinds(cfg) == {kind} and not _squared_relu(cfg), _kind),
        problems=_mamba_problems,
        to_hf=_mamba_to_hf,
        export_state=_mamba_state,
        from_hf=_mamba_from_hf,
    )


# Bamba (IBM's Bamba-9B): Jamba's block and names with Mamba-2 for Mamba, attention in the layers
# attn_layer_indices names, RoPE on the first half of each head, a SwiGLU in every layer.


def _bamba_problems(cfg: ModelConfig) -> list[str]:
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    problems = llama_block_problems(cfg) + multiplier_problems(cfg) + one_swiglu_problems(cfg)
    problems += _ibm_layer_problems(cfg, "Bamba")
    if a.rope_dims != a.head_dim // 2 or a.rope_scaling is not None:
        problems.append(f"attention with rope_dims={a.rope_dims} of head_dim={a.head_dim} or rope_scaling "
                        f"{a.rope_scaling} (Bamba's RoPE: the first half of each head, unscaled)")  # fmt: skip
    problems += [p for p in _attention_layer_problems(a) if not p.startswith("partial RoPE")]
    if a.window is not None or a.qkv_bias != a.o_bias or a.qk_norm:
        problems.append(f"attention with window={a.window}, qkv_bias={a.qkv_bias}, o_bias={a.o_bias}, qk_norm="
                        f"{a.qk_norm} (Bamba's: full, biases on all projections or none, no norms)")  # fmt: skip
    return problems


def _bamba_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    s = next(m for m in cfg.layer_mixers if m.kind == "mamba2")
    return {
        "model_type": "bamba", "intermediate_size": cfg.mlp.hidden, "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim, "attention_bias": a.qkv_bias, "rope_parameters": rope_parameters(a),
        "attn_layer_indices": [i for i, m in enumerate(cfg.layer_mixers) if m.kind == "attention"],
        **_ibm_mamba2_fields(cfg, s),
    }  # fmt: skip


def _ibm_mamba2_fields(cfg: ModelConfig, s) -> dict[str, Any]:
    """The mamba_* fields of Bamba's and Granite 4.0-H's config.json for the Mamba-2 mixer ``s``."""
    return {
        "mamba_n_heads": s.expand * cfg.d_model // s.head_dim, "mamba_d_head": s.head_dim,
        "mamba_n_groups": s.n_groups, "mamba_d_state": s.state_dim, "mamba_d_conv": s.conv_kernel,
        "mamba_expand": s.expand, "mamba_chunk_size": s.chunk_size, "mamba_conv_bias": True,
        "mamba_proj_bias": False, "time_step_limit": [0.0, float("inf")],
    }  # fmt: skip


def _ibm_layer_problems(cfg: ModelConfig, who: str, width_given: bool = False) -> list[str]:
    """Bamba's and Granite 4.0-H's layers: one attention and one Mamba-2, which takes the model's norm eps
    (``width_given``: Nemotron-H's, whose Mamba-2 is as wide as its heads, expand * d_model or not)."""
    attention = [m for m in cfg.layer_mixers if m.kind == "attention"]
    mamba = [m for m in cfg.layer_mixers if m.kind == "mamba2"]
    problems = []
    if any(m != attention[0] for m in attention) or any(m != mamba[0] for m in mamba):
        problems.append(f"attention or Mamba-2 layers that differ from one another ({who} has one of each)")
    if mamba and mamba[0].norm_eps != cfg.norm.eps:
        problems.append(f"Mamba-2 norm_eps={mamba[0].norm_eps} apart from norm.eps={cfg.norm.eps} ({who} has one "
                        "rms_norm_eps)")  # fmt: skip
    if mamba and not mamba[0].gated_norm:
        problems.append(f"Mamba-2 with gated_norm=False ({who}'s output is normalised)")
    if mamba and mamba[0].inner is not None and not width_given:
        problems.append(f"Mamba-2 with inner={mamba[0].inner} given outright ({who}'s width is expand * hidden_size)")
    return problems


def _ibm_mamba2(hf: dict[str, Any]) -> dict[str, Any]:
    """The Mamba-2 of Bamba's and Granite 4.0-H's config.json (mamba_* fields), as a ModelConfig dict of Mamba-2
    alone (``_mamba_from_hf``: its checks and defaults)."""
    check_silu(hf)
    if hf.get("mamba_proj_bias", False) or not hf.get("mamba_conv_bias", True):
        raise ValueError(f"config.json: {hf['model_type']} with mamba_proj_bias=true or mamba_conv_bias=false is not "
                         "supported")  # fmt: skip
    d, n, heads = hf["hidden_size"], hf["num_hidden_layers"], hf.get("mamba_n_heads", 128)
    expand, d_head = hf.get("mamba_expand", 2), hf.get("mamba_d_head", "auto")
    # its Mamba-2 as Mamba2ForCausalLM's config.json would say it (the checks and defaults: _mamba_from_hf's)
    as_mamba2 = {"model_type": "mamba2", "hidden_size": d, "vocab_size": hf["vocab_size"], "num_hidden_layers": n,
                 "state_size": hf.get("mamba_d_state", 256), "expand": expand, "num_heads": heads,
                 "head_dim": expand * d // heads if d_head == "auto" else d_head,
                 "n_groups": hf.get("mamba_n_groups", 1), "conv_kernel": hf.get("mamba_d_conv", 4),
                 "chunk_size": hf.get("mamba_chunk_size", 256), "time_step_limit": hf.get("time_step_limit"),
                 "layer_norm_epsilon": hf.get("rms_norm_eps", 1e-5)}  # fmt: skip
    return _mamba_from_hf(as_mamba2)


def _bamba_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    model, d, n = _ibm_mamba2(hf), hf["hidden_size"], hf["num_hidden_layers"]
    n_heads, rope, bias = hf["num_attention_heads"], read_rope(hf), bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim") or d // n_heads
    attention = {"kind": "attention", "n_heads": n_heads, "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
                 "head_dim": head_dim, "rope_dims": int(head_dim * 0.5), "rope_theta": rope.theta,
                 "rope_scaling": rope.scaling, "qkv_bias": bias, "o_bias": bias}  # fmt: skip
    layers = set(hf.get("attn_layer_indices") or [])
    return model | {
        "max_seq_len": hf.get("max_position_embeddings", 262144), "mixer": None,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "pattern": "".join("A" if i in layers else "M" for i in range(n)),
        "mixers": {"A": attention, "M": model["mixer"]}, "mlp": {"kind": "swiglu", "hidden": hf["intermediate_size"]},
    }  # fmt: skip


NATIVE_LAYOUTS["bamba"] = NativeLayout(
    model_type="bamba",
    architecture="BambaForCausalLM",
    describes="attention+mamba2 as bamba",
    claims=lambda cfg: (
        _mixer_kinds(cfg) == {"attention", "mamba2"} and not _granite_hybrid(cfg) and not _squared_relu(cfg)
    ),
    problems=_bamba_problems,
    to_hf=_bamba_to_hf,
    export_state=_jamba_state,
    from_hf=_bamba_from_hf,
)


# Granite 4.0-H (IBM's granite-4.0-h-micro, -tiny, -small; `transformers`' GraniteMoeHybridForCausalLM): Bamba's
# layers (Mamba-2, and attention where layer_types puts it, with RoPE on every channel or none: NoPE in the
# released models) in Granite's block and multipliers (embeddings, sublayer outputs, attention scores, logits),
# and in every layer a SwiGLU (shared_mlp) beside a mixture of experts routed by a softmax over the top k logits
# (none in the dense models): ours, experts with n_shared ungated shared ones of their width. Its names: Bamba's
# for the mixers, Granite-MoE's for the experts (block_sparse_moe: router.layer, input_linear with the gate's rows
# then the up projection's, output_linear), the SwiGLU's projections fused (shared_mlp.input_linear, gate then up).

_GRANITE_EXPERTS = {"router.weight": "block_sparse_moe.router.layer.weight",
                    "gate_up_proj": "block_sparse_moe.input_linear.weight",
                    "down_proj": "block_sparse_moe.output_linear.weight"}  # fmt: skip


def _granite_hybrid(cfg: ModelConfig) -> bool:
    """Whether a model is Granite 4.0's: attention + Mamba-2 with Granite's multipliers or softmax scale, experts, or
    RoPE other than on half of each head (else Bamba's); or attention alone beside experts with ungated shared ones,
    or without RoPE with Granite's multipliers (Granite 4.0's attention-only models: no other class has these)."""
    attention, moe = [m for m in cfg.layer_mixers if m.kind == "attention"], _moe_of(cfg)
    if _mixer_kinds(cfg) == {"attention"}:
        nope = _granite(cfg) and all(m.rope_dims == 0 for m in attention)
        return nope or (moe is not None and bool(moe.n_shared) and not moe.shared_gate)
    return (
        _mixer_kinds(cfg) == {"attention", "mamba2"}
        and not _squared_relu(cfg)
        and (_granite(cfg) or moe is not None or any(m.rope_dims != m.head_dim // 2 for m in attention))
    )


def _granite_hybrid_problems(cfg: ModelConfig) -> list[str]:
    a, moe = next(m for m in cfg.layer_mixers if m.kind == "attention"), _moe_of(cfg)
    problems = llama_block_problems(cfg) + _ibm_layer_problems(cfg, "Granite 4.0-H")
    if a.rope_dims not in (0, a.head_dim) or (a.rope_dims == 0 and a.rope_scaling is not None):
        problems.append(f"attention with rope_dims={a.rope_dims} of head_dim={a.head_dim} (Granite 4.0-H's RoPE: on "
                        "every channel or none)")  # fmt: skip
    problems += [p for p in _attention_layer_problems(a) if not p.startswith(("partial RoPE", "softmax_scale"))]
    if a.window is not None or a.qkv_bias != a.o_bias or a.qk_norm or a.n_heads * a.head_dim != cfg.d_model:
        problems.append(f"attention with window={a.window}, qkv_bias={a.qkv_bias}, o_bias={a.o_bias}, qk_norm="
                        f"{a.qk_norm}, n_heads * head_dim = {a.n_heads * a.head_dim} (Granite 4.0-H's: full, biases "
                        "on all projections or none, no norms, heads spanning d_model)")  # fmt: skip
    if moe is None:
        problems += one_swiglu_problems(cfg)
    elif any(p.mlp != moe for p in cfg.plan) or not (_softmax_top_k(moe, shared="ungated") and moe.norm_topk):
        problems.append(f"experts other than Granite 4.0-H's in every layer (norm_topk={moe.norm_topk}, n_shared="
                        f"{moe.n_shared}, score={moe.score!r}; its: the top k renormalised beside ungated shared "
                        "experts, softmax, no groups, biases, score bias, scale or clamp)")  # fmt: skip
    return problems


def _granite_hybrid_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    s = next((m for m in cfg.layer_mixers if m.kind == "mamba2"), None)
    moe = _moe_of(cfg)
    # (no Mamba-2 layer: one head, which divides any width, for its class's checks of fields it will not use)
    mamba = _ibm_mamba2_fields(cfg, s) if s is not None else {"mamba_n_heads": 1, "mamba_d_head": "auto"}
    mlp = {"num_local_experts": 0, "shared_intermediate_size": cfg.mlp.hidden, "intermediate_size": cfg.mlp.hidden}
    if moe is not None:
        mlp = {"num_local_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "intermediate_size": moe.hidden,
               "shared_intermediate_size": moe.n_shared * moe.hidden,
               # transformers' balance loss is top_k times ours: the same term, its coefficient over top_k
               "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k}  # fmt: skip
    return {
        "model_type": "granitemoehybrid", "num_key_value_heads": a.n_kv_heads, "attention_bias": a.qkv_bias,
        **_granite_multipliers(cfg, a), "position_embedding_type": "rope" if a.rope_dims else "nope",
        "rope_parameters": rope_parameters(a),
        "layer_types": ["mamba" if m.kind == "mamba2" else "attention" for m in cfg.layer_mixers],
        **mamba, **mlp,
    }  # fmt: skip


def _granite_hybrid_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out, swiglu = {}, {}
    mixers = {name: value for name, value in state.items() if ".mlp." not in name}
    for name, value in _jamba_state(mixers, cfg).items():  # (Bamba's names for the mixers and the norms)
        out[name.replace(".pre_ff_layernorm.", ".post_attention_layernorm.").replace(".final_layernorm.", ".norm.")] = (
            value
        )
    for name, value in state.items():
        layer, mlp, part = name.partition(".mlp.")
        if not mlp:
            continue
        if part in _GRANITE_EXPERTS:
            out[f"model.{layer}.{_GRANITE_EXPERTS[part]}"] = value
        else:  # a SwiGLU, dense or the experts' shared one: shared_mlp, gate and up fused
            swiglu.setdefault(f"model.{layer}", {})[part.removeprefix("shared.").split("_proj")[0]] = value
    for prefix, parts in swiglu.items():
        if "down" in parts:
            out[prefix + ".shared_mlp.output_linear.weight"] = parts.pop("down")
        if len(parts) == 2:
            out[prefix + ".shared_mlp.input_linear.weight"] = torch.cat([parts["gate"], parts["up"]])
        else:  # a part alone (import_state asks each name): its own name
            out.update({f"{prefix}.shared_mlp.{which}_proj.weight": v for which, v in parts.items()})
    return out


def _granite_hybrid_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Their fused SwiGLU (shared_mlp.input_linear: the gate's rows, then the up projection's) split."""
    out = {}
    for name, value in theirs.items():
        prefix, fused, _ = name.rpartition(".shared_mlp.input_linear.weight")
        if fused:
            out[prefix + ".shared_mlp.gate_proj.weight"], out[prefix + ".shared_mlp.up_proj.weight"] = value.chunk(2)
        else:
            out[name] = value
    return out


def _granite_hybrid_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    # its defaults and its layer types' current names (the time steps' limit, written with a JSON tag for infinity,
    # _ibm_mamba2 reads)
    derived = transformers.GraniteMoeHybridConfig(**{k: v for k, v in hf.items() if k != "time_step_limit"})
    model, d = _ibm_mamba2(hf), derived.hidden_size
    n_heads, bias = derived.num_attention_heads, bool(derived.attention_bias)
    roped = derived.position_embedding_type == "rope"
    rope = read_rope({"model_type": "granitemoehybrid", "rope_parameters": derived.rope_parameters,
                      "max_position_embeddings": derived.max_position_embeddings})  # fmt: skip
    attention = {"kind": "attention", "n_heads": n_heads, "n_kv_heads": derived.num_key_value_heads,
                 "head_dim": d // n_heads, "rope_dims": d // n_heads if roped else 0, "rope_theta": rope.theta,
                 "rope_scaling": rope.scaling if roped else None, "qkv_bias": bias, "o_bias": bias,
                 "softmax_scale": float(derived.attention_multiplier)}  # fmt: skip
    shared, E, top_k = derived.shared_intermediate_size, derived.num_local_experts, derived.num_experts_per_tok
    mlp: dict[str, Any] = {"kind": "swiglu", "hidden": shared}
    if E:
        hidden = derived.intermediate_size
        if shared <= 0 or shared % hidden:
            raise ValueError(f"config.json: shared_intermediate_size={shared} is not supported (a positive multiple "
                             f"of intermediate_size={hidden} is: kvlab's shared experts are n_shared routed experts "
                             "wide)")  # fmt: skip
        mlp = {"kind": "moe", "hidden": hidden, "n_experts": E, "top_k": top_k, "norm_topk": True,
               "n_shared": shared // hidden, "aux_loss_coef": derived.router_aux_loss_coef * top_k}  # fmt: skip
    return model | {
        "max_seq_len": derived.max_position_embeddings, "mixer": None,
        "tie_embeddings": bool(derived.tie_word_embeddings),
        "pattern": (pattern := "".join("M" if t == "linear_attention" else "A" for t in derived.layer_types)),
        "mixers": {k: v for k, v in {"A": attention, "M": model["mixer"]}.items() if k in pattern}, "mlp": mlp,
        **_granite_fields({"model_type": "granite", "embedding_multiplier": derived.embedding_multiplier,
                           "residual_multiplier": derived.residual_multiplier,
                           "logits_scaling": derived.logits_scaling}),
    }  # fmt: skip


NATIVE_LAYOUTS["granitemoehybrid"] = NativeLayout(
    model_type="granitemoehybrid",
    architecture="GraniteMoeHybridForCausalLM",
    describes="attention+mamba2 with Granite's multipliers or experts beside a shared SwiGLU as granitemoehybrid",
    claims=_granite_hybrid,
    problems=_granite_hybrid_problems,
    to_hf=_granite_hybrid_to_hf,
    export_state=_granite_hybrid_state,
    from_hf=_granite_hybrid_from_hf,
    prepare=_granite_hybrid_weights,
)


# Qwen3-Next (Qwen's Qwen3-Next-80B-A3B; `transformers`' Qwen3NextForCausalLM): gated DeltaNet (linear_attn) and
# gated attention (self_attn) where layer_types puts them, Llama's block with zero-centred RMSNorms (1 + w: Gemma's
# convention, and ours with unit_offset), Qwen3's query/key norms (zero-centred too), RoPE on the first
# partial_rotary_factor of each head; experts as Qwen2-MoE's (a shared expert gated per token) where
# decoder_sparse_step and mlp_only_layers put them, a SwiGLU elsewhere. Its gated DeltaNet's projections are grouped
# by query/key head: in_proj_qkvz holds, per query/key head, its q, its k, then the v and z of its value heads (ours:
# every head's q, then every k, v, z); in_proj_ba, per query/key head, its value heads' b then their a. Its
# attention's q_proj holds, per head, the query's rows then the output gate's (ours: q_proj and gate_proj).

_QWEN3_NEXT_MIXER = {"in_proj.weight": "in_proj_qkvz.weight", "beta_decay_proj.weight": "in_proj_ba.weight",
                     "conv_weight": "conv1d.weight", "norm_weight": "norm.weight"}  # fmt: skip


def _qwen3_next_claims(cfg: ModelConfig) -> bool:
    """Gated DeltaNet beside attention: its class's cache needs an attention layer to generate (without one,
    transformers 5.25 fails at the first step), so gated DeltaNet alone exports as remote code."""
    return _mixer_kinds(cfg) == {"attention", "gated_deltanet"} and cfg.norm_pattern is None


def _qwen3_next_problems(cfg: ModelConfig) -> list[str]:
    problems = pre_norm_problems(cfg) + multiplier_problems(cfg)
    if cfg.norm.kind != "rmsnorm" or not cfg.norm.unit_offset or cfg.post_norms or cfg.parallel_residual:
        problems.append(f"norm {cfg.norm.kind!r} with unit_offset={cfg.norm.unit_offset}, post_norms or "
                        "parallel_residual (Qwen3-Next's: an RMSNorm weighing by 1 + w before each "
                        "sublayer)")  # fmt: skip
    if cfg.logit_softcap is not None:
        problems.append(f"logit_softcap={cfg.logit_softcap} (Gemma's)")
    attention = [m for m in cfg.layer_mixers if m.kind == "attention"]
    linear = [m for m in cfg.layer_mixers if m.kind == "gated_deltanet"]
    if any(m != attention[0] for m in attention) or any(m != linear[0] for m in linear):
        problems.append("attention or gated DeltaNet layers that differ from one another (Qwen3-Next has one of each)")
    g, a = linear[0], attention[0]
    if g.decay != "head" or g.gate_rank is not None or g.gate_activation != "silu":
        problems.append(f"gated DeltaNet with decay={g.decay!r}, gate_rank={g.gate_rank}, gate_activation="
                        f"{g.gate_activation!r} (Kimi Linear's KDA; Qwen3-Next's: one decay per head, a full silu "
                        "gate)")  # fmt: skip
    if not g.output_gate or g.norm_eps != cfg.norm.eps:
        problems.append(f"gated DeltaNet with output_gate={g.output_gate}, norm_eps={g.norm_eps} (Qwen3-Next's: "
                        f"gated outputs, normalised at the model's eps {cfg.norm.eps})")  # fmt: skip
    problems += [p for p in _attention_layer_problems(a) if not p.startswith(("partial RoPE", "gated head"))]
    rotated = int(a.head_dim * (a.rope_dims / a.head_dim))  # (the channels its class computes from the factor)
    gated_qwen3 = a.output_gate and a.qk_norm and a.qk_norm_unit_offset and a.qk_norm_eps == cfg.norm.eps
    if not gated_qwen3 or a.window is not None or a.qkv_bias != a.o_bias or not a.rope_dims or rotated != a.rope_dims:
        problems.append(f"attention with output_gate={a.output_gate}, qk_norm={a.qk_norm}, qk_norm_unit_offset="
                        f"{a.qk_norm_unit_offset}, qk_norm_eps={a.qk_norm_eps}, window={a.window}, qkv_bias="
                        f"{a.qkv_bias}, o_bias={a.o_bias}, rope_dims={a.rope_dims} (Qwen3-Next's: gated outputs, "
                        "zero-centred query and key norms at the model's eps, no window, biases on every "
                        "projection or none, RoPE on some channels)")  # fmt: skip
    if a.rope_scaling is not None and a.rope_scaling["kind"] == "longrope":
        problems.append("LongRoPE beside partial RoPE (not checked against Qwen3-Next's class)")
    moe = _moe_of(cfg)
    if moe is None:
        return problems + one_swiglu_problems(cfg)
    problems += _one_moe_and_swiglu_problems(cfg)
    if not _softmax_top_k(moe, shared="gated"):
        problems.append(f"experts other than Qwen3-Next's (score={moe.score!r}, n_shared={moe.n_shared}, shared_gate="
                        f"{moe.shared_gate}, bias={moe.bias}; its: softmax, top k, shared experts gated per token, "
                        "no groups, biases, score bias, scale or clamp)")  # fmt: skip
    return problems


def _qwen3_next_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    g = next(m for m in cfg.layer_mixers if m.kind == "gated_deltanet")
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    return {
        "model_type": "qwen3_next",
        "layer_types": ["linear_attention" if m.kind == "gated_deltanet" else "full_attention"
                        for m in cfg.layer_mixers],
        "linear_num_value_heads": g.n_heads, "linear_num_key_heads": g.n_qk_heads,
        "linear_key_head_dim": g.head_dim, "linear_value_head_dim": g.value_head_dim,
        "linear_conv_kernel_dim": g.conv_kernel, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
        "attention_bias": a.qkv_bias,
        "rope_parameters": rope_parameters(a) | {"partial_rotary_factor": a.rope_dims / a.head_dim},
        **_qwen3_next_mlps(cfg),
    }  # fmt: skip


def _qwen3_next_mlps(cfg: ModelConfig) -> dict[str, Any]:
    moe = _moe_of(cfg)
    if moe is None:
        return {"num_experts": 0, "intermediate_size": cfg.mlp.hidden}
    dense = [i for i, p in enumerate(cfg.plan) if p.mlp.kind != "moe"]
    return {"num_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.hidden,
            "shared_expert_intermediate_size": moe.n_shared * moe.hidden, "norm_topk_prob": moe.norm_topk,
            "decoder_sparse_step": 1, "mlp_only_layers": dense,
            "intermediate_size": cfg.plan[dense[0]].mlp.hidden if dense else moe.hidden,
            # transformers' balance loss is top_k times ours: the same term, its coefficient over top_k
            "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k}  # fmt: skip


def _qwen3_next_rows(m, projection: str) -> torch.Tensor:
    """Our rows of a gated DeltaNet's ``projection`` (in_proj or beta_decay_proj) in Qwen3-Next's order: grouped by
    query/key head (its in_proj_qkvz, in_proj_ba)."""
    per = m.n_heads // m.n_qk_heads  # value heads per query/key head
    if projection == "beta_decay_proj":  # ours: every b, then every a
        parts = [(0, per), (m.n_heads, per)]
    else:  # ours: every q, k, v, then z
        key, value, vw = m.n_qk_heads * m.head_dim, m.n_heads * m.value_head_dim, per * m.value_head_dim
        parts = [(0, m.head_dim), (key, m.head_dim), (2 * key, vw), (2 * key + value, vw)]
    return torch.cat([torch.arange(start + group * width, start + (group + 1) * width)
                      for group in range(m.n_qk_heads) for start, width in parts])  # fmt: skip


def _qwen3_next_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from kvlab.archs.hf import kvlab_to_hf_name  # (Llama's names: the module imports this one)

    out, queries = {}, {}
    for name, value in state.items():
        if ".mlp." in name:
            out[kvlab_to_hf_name(name).replace(".mlp.shared_experts.", ".mlp.shared_expert.")] = value
            continue
        layer, mixer, rest = name.partition(".mixer.")
        m = cfg.layer_mixers[int(layer.split(".")[1])] if mixer else None
        if m is not None and m.kind == "gated_deltanet":
            projection = rest.partition(".")[0]
            if projection in ("in_proj", "beta_decay_proj"):
                value = value[_qwen3_next_rows(m, projection)]
            elif projection == "conv_weight":  # nn.Conv1d's [channels, 1, taps]
                value = value.unsqueeze(1)
            out[f"model.{layer}.linear_attn.{_QWEN3_NEXT_MIXER.get(rest, rest)}"] = value
        elif m is not None and rest.split(".")[0] in ("q_proj", "gate_proj"):  # fused per head where both are here
            queries.setdefault((f"model.{layer}.self_attn.", rest.split(".")[1]), {})[rest.split(".")[0]] = value
        else:
            out[kvlab_to_hf_name(name)] = value
    for (prefix, tensor), parts in queries.items():
        if len(parts) == 2:
            heads = cfg.layer_mixers[int(prefix.split(".")[2])].n_heads
            fused = torch.stack(
                [parts["q_proj"].unflatten(0, (heads, -1)), parts["gate_proj"].unflatten(0, (heads, -1))], 1
            )
            out[f"{prefix}q_proj.{tensor}"] = fused.flatten(0, 2)
        else:  # a part alone (import_state asks each name): its own name
            out.update({f"{prefix}{which}.{tensor}": v for which, v in parts.items()})
    return out


def _qwen3_next_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig, grouped: bool = True):
    """Theirs in our layouts: each head's query and gate rows apart (q_proj, gate_proj), the gated DeltaNet's
    projections in our row order (``grouped``: Qwen3-Next's, by query/key head; else Qwen3.5's, ours already)."""
    out = {}
    for name, value in theirs.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        prefix, fused, tensor = name.rpartition(".self_attn.q_proj.")
        if fused:
            heads = cfg.layer_mixers[int(layer)].n_heads
            query, gate = value.unflatten(0, (heads, 2, -1)).unbind(1)
            out[f"{prefix}.self_attn.q_proj.{tensor}"] = query.flatten(0, 1)
            out[f"{prefix}.self_attn.gate_proj.{tensor}"] = gate.flatten(0, 1)
            continue
        for projection, theirs_name in (("in_proj", ".in_proj_qkvz.weight"), ("beta_decay_proj", ".in_proj_ba.weight")):
            if grouped and name.endswith(".linear_attn" + theirs_name):
                value = value[torch.argsort(_qwen3_next_rows(cfg.layer_mixers[int(layer)], projection))]
        out[name] = value
    return out


def _qwen3_next_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    check_silu(hf)
    derived = transformers.Qwen3NextConfig(**hf)
    types = derived.layer_types
    if set(types) - {"linear_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types {sorted(set(types))} are not supported (linear_attention and "
                         "full_attention are)")  # fmt: skip
    rope = read_rope({"model_type": "qwen3_next", "rope_parameters": derived.rope_parameters})
    head_dim, eps, bias = derived.head_dim, derived.rms_norm_eps, bool(derived.attention_bias)
    attention = {"kind": "attention", "n_heads": derived.num_attention_heads,
                 "n_kv_heads": derived.num_key_value_heads, "head_dim": head_dim,
                 "rope_dims": int(head_dim * derived.rope_parameters.get("partial_rotary_factor", 1.0)),
                 "rope_theta": rope.theta, "rope_scaling": rope.scaling, "qkv_bias": bias, "o_bias": bias,
                 "qk_norm": True, "qk_norm_unit_offset": True, "qk_norm_eps": eps, "output_gate": True}  # fmt: skip
    linear = {"kind": "gated_deltanet", "n_heads": derived.linear_num_value_heads,
              "n_qk_heads": derived.linear_num_key_heads, "head_dim": derived.linear_key_head_dim,
              "value_head_dim": derived.linear_value_head_dim, "conv_kernel": derived.linear_conv_kernel_dim,
              "output_gate": True, "norm_eps": eps}  # fmt: skip
    pattern = "".join("D" if t == "linear_attention" else "A" for t in types)
    # its MLPs as Qwen2-MoE's config.json would say them (the checks and defaults: _llama_mlps_from_hf's)
    as_qwen2_moe = {"model_type": "qwen2_moe", "num_hidden_layers": derived.num_hidden_layers,
                    "intermediate_size": derived.intermediate_size, "num_experts": derived.num_experts,
                    "num_experts_per_tok": derived.num_experts_per_tok,
                    "moe_intermediate_size": derived.moe_intermediate_size,
                    "shared_expert_intermediate_size": derived.shared_expert_intermediate_size,
                    "norm_topk_prob": derived.norm_topk_prob, "router_aux_loss_coef": derived.router_aux_loss_coef,
                    "decoder_sparse_step": derived.decoder_sparse_step,
                    "mlp_only_layers": derived.mlp_only_layers}  # fmt: skip
    return {
        "vocab_size": derived.vocab_size, "d_model": derived.hidden_size, "n_layers": derived.num_hidden_layers,
        "max_seq_len": derived.max_position_embeddings,
        "norm": {"kind": "rmsnorm", "eps": eps, "unit_offset": True},
        "tie_embeddings": bool(derived.tie_word_embeddings), "mixer": None, "pattern": pattern,
        "mixers": {k: v for k, v in {"A": attention, "D": linear}.items() if k in pattern},
        **_llama_mlps_from_hf(as_qwen2_moe),
    }  # fmt: skip


NATIVE_LAYOUTS["qwen3_next"] = NativeLayout(
    model_type="qwen3_next",
    architecture="Qwen3NextForCausalLM",
    describes="gated_deltanet beside gated attention as qwen3_next",
    claims=_qwen3_next_claims,
    problems=_qwen3_next_problems,
    to_hf=_qwen3_next_to_hf,
    export_state=_qwen3_next_state,
    from_hf=_qwen3_next_from_hf,
    prepare=_qwen3_next_weights,
)


# Qwen3.5 (Qwen's Qwen3.5 models; `transformers`' Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, and the hub's multimodal
# Qwen3_5(Moe)ForConditionalGeneration, whose text model is read): Qwen3-Next's layers and block (the MoE models'
# experts in every layer, renormalised, beside a gated shared expert; the dense models' SwiGLU) with the gated
# DeltaNet's projections apart (in_proj_qkv in our order, in_proj_z, in_proj_b, in_proj_a), and multimodal RoPE,
# which on text (one position for its three sections) is RoPE. Read only: such a model exports as Qwen3-Next,
# which computes the same. The vision tower and the multi-token prediction layers are not read.

_QWEN3_5_SKIPPED = ("model.visual.", "mtp.")
_QWEN3_5_FUSED = {"in_proj_qkvz": ("in_proj_qkv", "in_proj_z"), "in_proj_ba": ("in_proj_b", "in_proj_a")}


def _qwen3_5_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    text = {k: v for k, v in hf.get("text_config", hf).items() if k != "model_type"}
    moe = hf["model_type"].startswith("qwen3_5_moe")
    derived = (transformers.Qwen3_5MoeTextConfig if moe else transformers.Qwen3_5TextConfig)(**text)
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "rms_norm_eps", "attention_bias", "rope_parameters", "max_position_embeddings",
              "tie_word_embeddings", "layer_types", "linear_conv_kernel_dim", "linear_key_head_dim",
              "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads")  # fmt: skip
    as_qwen3_next = {name: getattr(derived, name) for name in fields}
    if moe:  # (experts in every layer, the chosen scores renormalised)
        experts = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                   "router_aux_loss_coef")  # fmt: skip
        as_qwen3_next |= {name: getattr(derived, name) for name in experts}
        as_qwen3_next |= {"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": []}
    else:
        as_qwen3_next |= {"num_experts": 0, "intermediate_size": derived.intermediate_size}
    return _qwen3_next_from_hf(as_qwen3_next)


def _qwen3_5_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The text model's weights under Qwen3-Next's names, its gated DeltaNet's projections fused as ours."""
    text = {}
    for name, value in theirs.items():
        if not name.startswith(_QWEN3_5_SKIPPED):
            text[re.sub(r"^model\.language_model\.", "model.", name)] = value
    for name in [n for n in text if n.endswith(".linear_attn.in_proj_qkv.weight")]:
        prefix = name.removesuffix("in_proj_qkv.weight")
        for fused, parts in _QWEN3_5_FUSED.items():
            text[f"{prefix}{fused}.weight"] = torch.cat([text.pop(f"{prefix}{part}.weight") for part in parts])
    return _qwen3_next_weights(text, cfg, grouped=False)


for _type, _class in (("qwen3_5_text", "Qwen3_5ForCausalLM"), ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
                      ("qwen3_5", "Qwen3_5ForConditionalGeneration"),
                      ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")):  # fmt: skip
    NATIVE_LAYOUTS[_type] = NativeLayout(
        model_type=_type,
        architecture=_class,
        describes="",  # (read only: exported as Qwen3-Next)
        claims=lambda cfg: False,
        problems=_qwen3_next_problems,
        to_hf=_qwen3_next_to_hf,
        export_state=_qwen3_next_state,
        from_hf=_qwen3_5_from_hf,
        prepare=_qwen3_5_weights,
    )


# Kimi Linear (Moonshot's Kimi-Linear-48B-A3B; `transformers`' KimiLinearForCausalLM): Kimi Delta Attention (gated
# DeltaNet with a decay per key channel, decay: channel, its low-rank forget gate and sigmoid output gate) and MLA
# without RoPE (rope: false) where layer_types puts them, both under self_attn; Llama's block of plain RMSNorms; a
# SwiGLU where mlp_layer_types says dense, elsewhere DeepSeek-V3's experts (sigmoid scores with a bias to choose,
# groups, renormalised, scaled, ungated shared experts). KDA's q, k and v are projections apart (ours: one, in_proj).

_KDA = {"beta_decay_proj.weight": "b_proj.weight", "decay_down.weight": "forget_gate.f_a_proj.weight",
        "decay_up.weight": "forget_gate.f_b_proj.weight", "dt_bias": "forget_gate.dt_bias",
        "A_log": "forget_gate.A_log", "gate_down.weight": "g_a_proj.weight", "gate_up.weight": "g_b_proj.weight",
        "norm_weight": "o_norm.weight", "out_proj.weight": "o_proj.weight", "conv_weight": "conv1d.weight"}  # fmt: skip


def _kimi_claims(cfg: ModelConfig) -> bool:
    return _mixer_kinds(cfg) == {"mla", "gated_deltanet"}


def _kimi_problems(cfg: ModelConfig) -> list[str]:
    problems = llama_block_problems(cfg) + multiplier_problems(cfg)
    mla = [m for m in cfg.layer_mixers if m.kind == "mla"]
    kda = [m for m in cfg.layer_mixers if m.kind == "gated_deltanet"]
    if any(m != mla[0] for m in mla) or any(m != kda[0] for m in kda):
        problems.append("MLA or KDA layers that differ from one another (Kimi Linear has one of each)")
    m, g = mla[0], kda[0]
    if m.rope or m.rope_kv_heads != 1 or m.rope_spectrum is not None or not m.latent_norm or m.latent_bits:
        problems.append(f"MLA with rope={m.rope}, rope_kv_heads={m.rope_kv_heads}, rope_spectrum={m.rope_spectrum}, "
                        f"latent_norm={m.latent_norm}, latent_bits={m.latent_bits} (Kimi Linear's: no RoPE, one "
                        "shared key slice, the latent normalised, not quantized)")  # fmt: skip
    if m.norm_eps != DEEPSEEK_LATENT_EPS:
        problems.append(f"MLA norm_eps={m.norm_eps} (its latent norms have eps {DEEPSEEK_LATENT_EPS})")
    kda_parts = (g.decay == "channel" and g.decay_rank == g.head_dim and g.gate_rank == g.head_dim
                 and g.gate_activation == "sigmoid" and g.output_gate and g.n_qk_heads == g.n_heads
                 and g.value_head_dim == g.head_dim and g.norm_eps == cfg.norm.eps)  # fmt: skip
    if not kda_parts:
        problems.append(f"gated DeltaNet other than Kimi's KDA (decay={g.decay!r}, decay_rank={g.decay_rank}, "
                        f"gate_rank={g.gate_rank}, gate_activation={g.gate_activation!r}, n_qk_heads={g.n_qk_heads}, "
                        f"value_head_dim={g.value_head_dim}, norm_eps={g.norm_eps}; its: a decay per channel and a "
                        "sigmoid gate, both through head_dim, every head its own query/key, values as wide as keys, "
                        "the model's norm eps)")  # fmt: skip
    return problems + _kimi_mlp_problems(cfg)


def _kimi_mlp_problems(cfg: ModelConfig) -> list[str]:
    moe = _moe_of(cfg)
    if moe is None:
        return one_swiglu_problems(cfg)
    problems = _one_moe_and_swiglu_problems(cfg)
    if not _deepseek_v3_routing(moe) or not moe.n_shared or moe.shared_gate or not _plain_experts(moe):
        problems.append(f"experts other than Kimi Linear's (score={moe.score!r}, score_bias={moe.score_bias}, "
                        f"n_shared={moe.n_shared}, shared_gate={moe.shared_gate}; its: DeepSeek-V3's routing, "
                        "ungated shared experts, plain SwiGLU experts)")  # fmt: skip
    return problems


def _kimi_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = next(x for x in cfg.layer_mixers if x.kind == "mla")
    g = next(x for x in cfg.layer_mixers if x.kind == "gated_deltanet")
    moe = _moe_of(cfg)
    hf = {
        "model_type": "kimi_linear", "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads,
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.head_dim,
        "qk_rope_head_dim": m.rope_head_dim, "v_head_dim": m.v_head_dim, "attention_bias": False,
        "layer_types": ["full_attention" if x.kind == "mla" else "linear_attention" for x in cfg.layer_mixers],
        "mlp_layer_types": ["sparse" if p.mlp.kind == "moe" else "dense" for p in cfg.plan],
        "linear_num_heads": g.n_heads, "linear_head_dim": g.head_dim, "linear_conv_kernel_dim": g.conv_kernel,
        "intermediate_size": next((p.mlp.hidden for p in cfg.plan if p.mlp.kind != "moe"), cfg.plan[0].mlp.hidden),
    }  # fmt: skip
    if moe is not None:
        hf |= {"num_local_experts": moe.n_experts, "num_experts_per_tok": moe.top_k,
               "moe_intermediate_size": moe.hidden, "n_shared_experts": moe.n_shared, "n_group": moe.n_groups,
               "topk_group": moe.topk_groups, "norm_topk_prob": moe.norm_topk,
               "routed_scaling_factor": moe.routed_scale}  # fmt: skip
    return hf


def _kimi_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from kvlab.archs.hf import kvlab_to_hf_name  # (Llama's and DeepSeek's names: the module imports this one)

    out = {}
    for name, value in state.items():
        layer, mixer, rest = name.partition(".mixer.")
        g = cfg.layer_mixers[int(layer.split(".")[1])] if mixer else None
        if g is None or g.kind != "gated_deltanet":
            out[kvlab_to_hf_name(name)] = value
            continue
        prefix = f"model.{layer}.self_attn."
        if rest == "in_proj.weight":  # q, k, v apart
            widths = [g.n_qk_heads * g.head_dim] * 2 + [g.n_heads * g.value_head_dim]
            out.update({f"{prefix}{x}_proj.weight": v for x, v in zip("qkv", value.split(widths), strict=True)})
            continue
        if rest == "conv_weight":  # nn.Conv1d's [channels, 1, taps]
            value = value.unsqueeze(1)
        elif rest == "A_log":  # [1, 1, heads, 1]
            value = value.view(1, 1, -1, 1)
        out[prefix + _KDA[rest]] = value
    return out


def _kimi_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    check_silu(hf)
    derived = transformers.KimiLinearConfig(**hf)
    if derived.attention_bias:
        raise ValueError("config.json: attention_bias=true is not supported for Kimi Linear's MLA")
    types, mlps = derived.layer_types, derived.mlp_layer_types
    if set(types) - {"linear_attention", "full_attention"} or set(mlps) - {"dense", "sparse"}:
        raise ValueError(f"config.json: layer_types {sorted(set(types))} or mlp_layer_types {sorted(set(mlps))} are "
                         "not supported (linear_attention, full_attention; dense, sparse are)")  # fmt: skip
    mla = {"kind": "mla", "n_heads": derived.num_attention_heads, "head_dim": derived.qk_nope_head_dim,
           "v_head_dim": derived.v_head_dim, "rope_head_dim": derived.qk_rope_head_dim,
           "kv_lora_rank": derived.kv_lora_rank, "q_lora_rank": derived.q_lora_rank, "rope": False,
           "norm_eps": DEEPSEEK_LATENT_EPS}  # fmt: skip
    D = derived.linear_head_dim
    kda = {"kind": "gated_deltanet", "n_heads": derived.linear_num_heads, "head_dim": D, "value_head_dim": D,
           "conv_kernel": derived.linear_conv_kernel_dim, "decay": "channel", "decay_rank": D, "gate_rank": D,
           "gate_activation": "sigmoid", "norm_eps": derived.rms_norm_eps}  # fmt: skip
    moe = {"kind": "moe", "hidden": derived.moe_intermediate_size, "n_experts": derived.num_local_experts,
           "top_k": derived.num_experts_per_tok, "n_shared": derived.n_shared_experts, "score": "sigmoid",
           "score_bias": True, "norm_topk": bool(derived.norm_topk_prob),
           "routed_scale": float(derived.routed_scaling_factor), "n_groups": derived.n_group,
           "topk_groups": derived.topk_group}  # fmt: skip
    pattern, mlp_pattern = ("".join(("A" if t == "full_attention" else "K") for t in types),
                            "".join(("E" if t == "sparse" else "D") for t in mlps))  # fmt: skip
    return {
        "vocab_size": derived.vocab_size, "d_model": derived.hidden_size, "n_layers": derived.num_hidden_layers,
        "max_seq_len": derived.max_position_embeddings, "norm": {"kind": "rmsnorm", "eps": derived.rms_norm_eps},
        "tie_embeddings": bool(derived.tie_word_embeddings), "mixer": None, "pattern": pattern,
        "mixers": {k: v for k, v in {"A": mla, "K": kda}.items() if k in pattern},
        "mlp_pattern": mlp_pattern,
        "mlps": {k: v for k, v in {"D": {"kind": "swiglu", "hidden": derived.intermediate_size}, "E": moe}.items()
                 if k in mlp_pattern},
    }  # fmt: skip


_KIMI_HUB = {"self_attn.f_a_proj.": "self_attn.forget_gate.f_a_proj.", "self_attn.f_b_proj.":
             "self_attn.forget_gate.f_b_proj.", "self_attn.dt_bias": "self_attn.forget_gate.dt_bias",
             "self_attn.A_log": "self_attn.forget_gate.A_log", ".block_sparse_moe.": ".mlp."}  # fmt: skip


def _kimi_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The hub's names as `transformers`' class holds them (as its own conversion reads them): the forget gate's
    parts under forget_gate, the MLPs under mlp (the experts already stacked: ``fuse_legacy_experts``), the q, k and v
    convolutions one."""
    out = {}
    for name, value in theirs.items():
        for old, new in _KIMI_HUB.items():
            name = name.replace(old, new)
        out[name] = value
    for name in [n for n in out if n.endswith(".self_attn.q_conv1d.weight")]:
        prefix = name.removesuffix("q_conv1d.weight")
        out[prefix + "conv1d.weight"] = torch.cat([out.pop(f"{prefix}{x}_conv1d.weight") for x in "qkv"])
    return out


NATIVE_LAYOUTS["kimi_linear"] = NativeLayout(
    model_type="kimi_linear",
    architecture="KimiLinearForCausalLM",
    describes="KDA (gated_deltanet with a decay per channel) beside MLA without RoPE as kimi_linear",
    claims=_kimi_claims,
    problems=_kimi_problems,
    to_hf=_kimi_to_hf,
    export_state=_kimi_state,
    from_hf=_kimi_from_hf,
    prepare=_kimi_weights,
)


# RecurrentGemma (Botev et al. 2024; Griffin's layers, De et al. 2024; `transformers`' RecurrentGemmaForCausalLM):
# Griffin's recurrent blocks (RG-LRU) and local MQA where block_types puts them, Gemma's block (RMSNorms weighing by
# 1 + w, embeddings times sqrt(d_model) rounded to bf16, as its normaliser buffer holds it, logits soft-capped), a
# GeGLU of intermediate_size / 2 with biases, the attention's output projection with a bias, RoPE on half of each
# head (partial_rotary_factor). Its recurrent block's linear_y and linear_x are the halves of our in_proj; its
# recurrent_param is -Lambda (it decays by exp(-c r softplus(recurrent_param))); the gates' blocks as ours.

_RECURRENT_GEMMA_MIXER = {"conv_weight": "conv_1d.weight", "conv_bias": "conv_1d.bias",
                          "input_gate_weight": "rg_lru.input_gate_weight", "input_gate_bias": "rg_lru.input_gate_bias",
                          "recurrence_gate_weight": "rg_lru.recurrent_gate_weight",
                          "recurrence_gate_bias": "rg_lru.recurrent_gate_bias",
                          "decay_logit": "rg_lru.recurrent_param"}  # fmt: skip
_RECURRENT_GEMMA_PARTS = {"mixer_norm": "temporal_pre_norm", "mlp_norm": "channel_pre_norm", "mixer": "temporal_block",
                          "mlp": "mlp_block"}  # fmt: skip


def recurrent_gemma_embed_scale(d_model: int) -> float:
    """sqrt(d_model) as RecurrentGemma's normaliser holds it: in bf16 (2560: 50.5, not 50.596)."""
    return float(torch.tensor(d_model**0.5, dtype=torch.bfloat16))


def _recurrent_gemma_claims(cfg: ModelConfig) -> bool:
    """RG-LRU beside attention: its class's cache needs an attention layer (without one, transformers 5.25 fails at
    the first call with a cache), so Hawk, the recurrent blocks alone, exports as remote code."""
    return _mixer_kinds(cfg) == {"rglru", "attention"}


def _recurrent_gemma_problems(cfg: ModelConfig) -> list[str]:
    problems = pre_norm_problems(cfg) + multiplier_problems(cfg, but=("embed_scale",))
    scale = recurrent_gemma_embed_scale(cfg.d_model)
    if (cfg.norm.kind != "rmsnorm" or not cfg.norm.unit_offset or cfg.post_norms or cfg.parallel_residual
            or cfg.embed_scale != scale or cfg.logit_softcap is None):  # fmt: skip
        problems.append(f"norm {cfg.norm.kind!r} with unit_offset={cfg.norm.unit_offset}, post_norms="
                        f"{cfg.post_norms}, parallel_residual={cfg.parallel_residual}, embed_scale={cfg.embed_scale}, "
                        f"logit_softcap={cfg.logit_softcap} (RecurrentGemma's: an RMSNorm weighing by 1 + w before "
                        f"each sublayer, embeddings times sqrt(d_model) in bf16 = {scale:g}, capped "
                        "logits)")  # fmt: skip
    recurrent = [m for m in cfg.layer_mixers if m.kind == "rglru"]
    attention = [m for m in cfg.layer_mixers if m.kind == "attention"]
    if any(m != recurrent[0] for m in recurrent) or any(m != attention[0] for m in attention):
        problems.append("RG-LRU or attention layers that differ from one another (RecurrentGemma has one of each)")
    r, a = recurrent[0], attention[0]
    heads = a.n_heads
    if r.c != 8.0 or r.n_heads != heads or cfg.d_model % heads:
        problems.append(f"RG-LRU with c={r.c} and n_heads={r.n_heads} (RecurrentGemma's: c 8, a gate block per "
                        f"attention head, {heads}, dividing d_model)")  # fmt: skip
    problems += [p for p in _attention_layer_problems(a) if not p.startswith("partial RoPE")]
    rope_dims = a.rope_dims or a.head_dim
    if (a.window is None or not a.o_bias or a.head_dim != cfg.d_model // heads or a.qk_norm
            or a.rope_scaling is not None or int(a.head_dim * (rope_dims / a.head_dim)) != rope_dims):  # fmt: skip
        problems.append(f"attention with window={a.window}, o_bias={a.o_bias}, head_dim={a.head_dim}, qk_norm="
                        f"{a.qk_norm}, rope_scaling={a.rope_scaling} (RecurrentGemma's: a sliding window, a bias on "
                        "the output projection, heads of d_model / n_heads, no query/key norms, plain "
                        "RoPE)")  # fmt: skip
    if any(p.mlp != cfg.mlp for p in cfg.plan) or cfg.mlp.kind != "geglu" or not cfg.mlp.bias:
        problems.append("MLPs other than one GeGLU with biases in every layer (RecurrentGemma's)")
    return problems


def _recurrent_gemma_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    r = next(m for m in cfg.layer_mixers if m.kind == "rglru")
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    return {
        "model_type": "recurrent_gemma", "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "lru_width": r.width, "attention_window_size": a.window, "conv1d_width": r.conv_kernel,
        "logits_soft_cap": cfg.logit_softcap, "intermediate_size": 2 * cfg.mlp.hidden,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "block_types": ["recurrent" if m.kind == "rglru" else "attention" for m in cfg.layer_mixers],
        "attention_bias": a.qkv_bias,
        "rope_parameters": rope_parameters(a) | {"partial_rotary_factor": (a.rope_dims or a.head_dim) / a.head_dim},
    }  # fmt: skip


def _recurrent_gemma_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[name if name == "lm_head.weight" else "model." + name.replace("norm.", "final_norm.", 1)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        prefix = f"model.layers.{i}.{_RECURRENT_GEMMA_PARTS.get(part, part)}."
        if part != "mixer" or cfg.layer_mixers[int(i)].kind != "rglru":
            out[prefix + rest] = value
            continue
        head, _, tensor = rest.partition(".")
        if head == "in_proj":  # [y, x]
            y, x = value.chunk(2)
            out[f"{prefix}linear_y.{tensor}"], out[f"{prefix}linear_x.{tensor}"] = y, x
        elif head == "out_proj":
            out[f"{prefix}linear_out.{tensor}"] = value
        else:
            value = {"conv_weight": value.unsqueeze(1), "decay_logit": -value}.get(head, value)  # (conv: [W, 1, K])
            out[prefix + _RECURRENT_GEMMA_MIXER[head]] = value
    return out


def _recurrent_gemma_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Theirs in our layouts: recurrent_param back to Lambda; the normaliser buffer old checkpoints hold dropped."""
    return {name: -value if name.endswith(".rg_lru.recurrent_param") else value for name, value in theirs.items()
            if not name.endswith(".normalizer")}  # fmt: skip


def _recurrent_gemma_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    derived = class_config("RecurrentGemmaConfig", hf)
    if derived.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"config.json: hidden_activation={derived.hidden_activation!r} is not supported (GeGLU with "
                         "tanh's GELU, gelu_pytorch_tanh, is)")  # fmt: skip
    rope = read_rope({"model_type": "recurrent_gemma", "rope_parameters": derived.rope_parameters})
    d, heads, head_dim = derived.hidden_size, derived.num_attention_heads, derived.head_dim
    factor = derived.rope_parameters.get("partial_rotary_factor", 0.5)
    attention = {"kind": "attention", "n_heads": heads, "n_kv_heads": derived.num_key_value_heads,
                 "head_dim": head_dim, "rope_theta": rope.theta, "rope_dims": int(head_dim * factor),
                 "window": derived.attention_window_size, "qkv_bias": bool(derived.attention_bias),
                 "o_bias": True}  # fmt: skip
    recurrent = {"kind": "rglru", "width": derived.lru_width, "n_heads": heads, "conv_kernel": derived.conv1d_width}
    pattern = "".join("R" if t == "linear_attention" else "A" for t in derived.layers_block_type)
    return {
        "vocab_size": derived.vocab_size, "d_model": d, "n_layers": derived.num_hidden_layers,
        "max_seq_len": hf.get("max_position_embeddings") or 8192,  # (none in its config: it was trained at 8,192)
        "norm": {"kind": "rmsnorm", "eps": derived.rms_norm_eps, "unit_offset": True},
        "tie_embeddings": bool(derived.tie_word_embeddings), "embed_scale": recurrent_gemma_embed_scale(d),
        "logit_softcap": derived.logits_soft_cap, "mixer": None, "pattern": pattern,
        "mixers": {k: v for k, v in {"A": attention, "R": recurrent}.items() if k in pattern},
        "mlp": {"kind": "geglu", "hidden": derived.intermediate_size // 2, "bias": True},
    }  # fmt: skip


NATIVE_LAYOUTS["recurrent_gemma"] = NativeLayout(
    model_type="recurrent_gemma",
    architecture="RecurrentGemmaForCausalLM",
    describes="rglru (Griffin's recurrent block) beside local attention as recurrent_gemma",
    claims=_recurrent_gemma_claims,
    problems=_recurrent_gemma_problems,
    to_hf=_recurrent_gemma_to_hf,
    export_state=_recurrent_gemma_state,
    from_hf=_recurrent_gemma_from_hf,
    prepare=_recurrent_gemma_weights,
    mlp_bias=True,
)


# LFM2 (Liquid AI 2025; `transformers`' Lfm2ForCausalLM, Liquid's own): gated short convolutions ("conv") and GQA
# with per-head query/key RMSNorms ("full_attention") where layer_types puts them, Llama's block (operator_norm,
# ffn_norm; the final norm named embedding_norm), a SwiGLU (w1 the gate, w3 up, w2 down) whose width its config
# derives (block_auto_adjust_ff_dim: 2/3 of intermediate_size, times block_ffn_dim_multiplier, rounded up to
# block_multiple_of; exported as the width itself, adjustment off). Its conv layer's in_proj, conv and out_proj are
# ours (the convolution as nn.Conv1d's [d, 1, taps]).

_LFM2_PARTS = {"mixer_norm": "operator_norm", "mlp_norm": "ffn_norm", "mlp": "feed_forward"}
_LFM2_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_LFM2_ATTENTION = {"o_proj": "out_proj", "q_norm": "q_layernorm", "k_norm": "k_layernorm"}


def _lfm2_claims(cfg: ModelConfig) -> bool:
    """Gated convolutions beside attention: its class's cache needs an attention layer (without one, transformers
    5.25 fails at the first call), so the convolutions alone export as remote code."""
    return _mixer_kinds(cfg) == {"short_conv", "attention"}


def _lfm2_problems(cfg: ModelConfig) -> list[str]:
    problems = pre_norm_problems(cfg) + multiplier_problems(cfg) + gemma_problems(cfg) + one_swiglu_problems(cfg)
    if cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"norm {cfg.norm.kind!r}, parallel_residual={cfg.parallel_residual} (LFM2's: an RMSNorm "
                        "before each sublayer)")  # fmt: skip
    convs = [m for m in cfg.layer_mixers if m.kind == "short_conv"]
    attention = [m for m in cfg.layer_mixers if m.kind == "attention"]
    if any(m != convs[0] for m in convs) or any(m != attention[0] for m in attention):
        problems.append("convolution or attention layers that differ from one another (LFM2 has one of each)")
    a = attention[0]
    problems += _attention_layer_problems(a)
    if (not a.qk_norm or a.qk_norm_eps != cfg.norm.eps or a.qk_norm_unit_offset or a.window is not None or a.qkv_bias
            or a.o_bias or a.rope_scaling is not None or a.head_dim != cfg.d_model // a.n_heads):  # fmt: skip
        problems.append(f"attention with qk_norm={a.qk_norm}, qk_norm_eps={a.qk_norm_eps}, window={a.window}, "
                        f"qkv_bias={a.qkv_bias}, o_bias={a.o_bias}, rope_scaling={a.rope_scaling}, head_dim="
                        f"{a.head_dim} (LFM2's: query and key norms per head at the model's eps, no window, no "
                        "biases, plain RoPE, heads of d_model / n_heads)")  # fmt: skip
    return problems


def _lfm2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    s = next(m for m in cfg.layer_mixers if m.kind == "short_conv")
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    return {
        "model_type": "lfm2", "norm_eps": cfg.norm.eps, "conv_L_cache": s.conv_kernel, "conv_bias": s.bias,
        "intermediate_size": cfg.mlp.hidden, "block_auto_adjust_ff_dim": False,
        "layer_types": ["conv" if m.kind == "short_conv" else "full_attention" for m in cfg.layer_mixers],
        "num_key_value_heads": a.n_kv_heads, "rope_parameters": rope_parameters(a),
    }  # fmt: skip


def _lfm2_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[name if name == "lm_head.weight" else "model." + name.replace("norm.", "embedding_norm.", 1)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        head, _, tensor = rest.partition(".")
        if part == "mlp":
            rest = f"{_LFM2_MLP[head]}.{tensor}"
        elif part == "mixer" and cfg.layer_mixers[int(i)].kind == "short_conv":
            part, rest = "conv", {"conv_weight": "conv.weight", "conv_bias": "conv.bias"}.get(rest, rest)
            value = value.unsqueeze(1) if head == "conv_weight" else value  # nn.Conv1d's [d, 1, taps]
        elif part == "mixer":
            part, rest = "self_attn", f"{_LFM2_ATTENTION.get(head, head)}.{tensor}"
        out[f"model.layers.{i}.{_LFM2_PARTS.get(part, part)}.{rest}"] = value
    return out


def lfm2_mlp_width(hf: dict[str, Any]) -> int:
    """The SwiGLU's width as LFM2's class derives it from its config (Lfm2MLP)."""
    width = hf.get("intermediate_size", hf.get("block_ff_dim", 12288))
    if hf.get("block_auto_adjust_ff_dim", True):
        width = int(2 * width / 3)
        multiplier = hf.get("block_ffn_dim_multiplier", 1.0)
        if multiplier is not None:
            step = hf.get("block_multiple_of", 256)
            width = step * ((int(multiplier * width) + step - 1) // step)
    return width


def _lfm2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    derived = class_config("Lfm2Config", hf)
    if set(derived.layer_types) - {"conv", "full_attention"}:
        raise ValueError(f"config.json: layer_types {sorted(set(derived.layer_types))} are not supported (conv and "
                         "full_attention are)")  # fmt: skip
    rope = read_rope({"model_type": "lfm2", "rope_parameters": derived.rope_parameters})
    d, heads, eps = derived.hidden_size, derived.num_attention_heads, derived.norm_eps
    attention = {"kind": "attention", "n_heads": heads, "n_kv_heads": derived.num_key_value_heads,
                 "head_dim": d // heads, "rope_theta": rope.theta, "rope_scaling": rope.scaling, "qk_norm": True,
                 "qk_norm_eps": eps}  # fmt: skip
    conv = {"kind": "short_conv", "conv_kernel": derived.conv_L_cache, "bias": bool(derived.conv_bias)}
    pattern = "".join("C" if t == "conv" else "A" for t in derived.layer_types)
    return {
        "vocab_size": derived.vocab_size, "d_model": d, "n_layers": derived.num_hidden_layers,
        "max_seq_len": derived.max_position_embeddings, "norm": {"kind": "rmsnorm", "eps": eps},
        "tie_embeddings": bool(derived.tie_word_embeddings), "mixer": None, "pattern": pattern,
        "mixers": {k: v for k, v in {"A": attention, "C": conv}.items() if k in pattern},
        "mlp": {"kind": "swiglu", "hidden": lfm2_mlp_width(derived.to_dict())},
    }  # fmt: skip


NATIVE_LAYOUTS["lfm2"] = NativeLayout(
    model_type="lfm2",
    architecture="Lfm2ForCausalLM",
    describes="short_conv (LFM2's gated convolution) beside attention as lfm2",
    claims=_lfm2_claims,
    problems=_lfm2_problems,
    to_hf=_lfm2_to_hf,
    export_state=_lfm2_state,
    from_hf=_lfm2_from_hf,
)


# Nemotron-H (NVIDIA 2025, "Nemotron-H: A Family of Accurate and Efficient Hybrid Mamba-Transformer Models";
# `transformers`' NemotronHForCausalLM): each of its layers is one sublayer behind an RMSNorm and a residual, Mamba-2
# ("M": linear_attention), attention without positional encoding ("*": full_attention) or a squared-ReLU MLP ("-":
# mlp), in the order its hybrid_override_pattern gives. A mixer layer and the MLP layer after it are one kvlab block
# (mixer_norm, mixer, mlp_norm, mlp: the same sums), a mixer layer before another mixer a block without MLP (kind
# none); an MLP layer after another, or first, has no block to join and is refused, as are Nemotron 3's experts
# ("E": moe). Names: embeddings, norm_f, each layer's norm and mixer (the MLP's under mixer too).


def _squared_relu(cfg: ModelConfig) -> bool:
    return any(p.mlp.kind == "relu2" for p in cfg.plan)


def _nemotron_h_layers(cfg: ModelConfig) -> list[tuple[int, int | None]]:
    """Per block, its mixer's layer and its MLP's layer (None without one) among Nemotron-H's layers."""
    out, at = [], 0
    for p in cfg.plan:
        has_mlp = p.mlp.kind != "none"
        out.append((at, at + 1 if has_mlp else None))
        at += 2 if has_mlp else 1
    return out


def _nemotron_h_claims(cfg: ModelConfig) -> bool:
    """Mamba-2 beside attention with squared-ReLU MLPs: its class's cache needs an attention layer (without one,
    transformers 5.25 fails at the first call), so Mamba-2 alone with them exports as remote code."""
    return _mixer_kinds(cfg) == {"mamba2", "attention"} and _squared_relu(cfg)


def _nemotron_h_problems(cfg: ModelConfig) -> list[str]:
    problems = (
        pre_norm_problems(cfg)
        + multiplier_problems(cfg)
        + gemma_problems(cfg)
        + _ibm_layer_problems(cfg, "Nemotron-H", width_given=True)
    )
    if cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"norm {cfg.norm.kind!r}, parallel_residual={cfg.parallel_residual} (Nemotron-H's: an RMSNorm "
                        "before each sublayer)")  # fmt: skip
    dense = [p.mlp for p in cfg.plan if p.mlp.kind != "none"]
    if any(m.kind != "relu2" or m != dense[0] for m in dense):
        problems.append("MLPs other than one squared-ReLU MLP (relu2) or none per block (Nemotron-H's)")
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    problems += [p for p in _attention_layer_problems(a) if not p.startswith("partial RoPE")]
    if a.rope_dims != 0 or a.window is not None or a.qkv_bias or a.o_bias or a.qk_norm:
        problems.append(f"attention with rope_dims={a.rope_dims}, window={a.window}, qkv_bias={a.qkv_bias}, "
                        f"o_bias={a.o_bias}, qk_norm={a.qk_norm} (Nemotron-H's: no positional encoding, full, no "
                        "biases or norms)")  # fmt: skip
    return problems


def _nemotron_h_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    s = next(m for m in cfg.layer_mixers if m.kind == "mamba2")
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    mlp = next(p.mlp for p in cfg.plan if p.mlp.kind != "none")
    types = []
    for p in cfg.plan:
        types.append("linear_attention" if p.mixer.kind == "mamba2" else "full_attention")
        types += ["mlp"] if p.mlp.kind != "none" else []
    return {
        "model_type": "nemotron_h", "layers_block_type": types, "num_hidden_layers": len(types),
        "intermediate_size": mlp.hidden, "mlp_hidden_act": "relu2", "mlp_bias": mlp.bias,
        "mamba_num_heads": inner_width(s, cfg.d_model) // s.head_dim, "mamba_head_dim": s.head_dim,
        "ssm_state_size": s.state_dim, "n_groups": s.n_groups, "conv_kernel": s.conv_kernel, "expand": s.expand,
        "chunk_size": s.chunk_size, "use_conv_bias": True, "use_bias": False, "mamba_hidden_act": "silu",
        "layer_norm_epsilon": cfg.norm.eps, "attention_bias": False, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
    }  # fmt: skip


def _nemotron_h_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    layers, out = _nemotron_h_layers(cfg), {}
    for name, value in state.items():
        if not name.startswith("layers."):
            top = {"embed_tokens.weight": "model.embeddings.weight", "norm.weight": "model.norm_f.weight"}
            out[top.get(name, name)] = value
            continue
        _, b, part, rest = name.split(".", 3)
        mixer_layer, mlp_layer = layers[int(b)]
        at = mlp_layer if part in ("mlp", "mlp_norm") else mixer_layer
        if part in ("mixer_norm", "mlp_norm"):
            out[f"model.layers.{at}.norm.{rest}"] = value
            continue
        if part == "mixer" and cfg.layer_mixers[int(b)].kind == "mamba2":
            rest, value = _mamba_weight(rest, value, "mamba2")
        out[f"model.layers.{at}.mixer.{rest}"] = value
    return out


def _nemotron_h_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The hub's names (backbone.*) as `transformers`' class holds them (model.*)."""
    return {("model." + n.removeprefix("backbone.")) if n.startswith("backbone.") else n: v for n, v in theirs.items()}


def _nemotron_h_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    derived = class_config("NemotronHConfig", hf)
    types = list(derived.layers_block_type)
    if "moe" in types or set(types) - {"linear_attention", "full_attention", "mlp"}:
        raise ValueError(f"config.json: layers_block_type {sorted(set(types))} is not supported (linear_attention, "
                         "full_attention and mlp are; Nemotron 3's experts, moe, are not)")  # fmt: skip
    blocks = []  # (mixer type, MLP after it)
    for i, t in enumerate(types):
        if t != "mlp":
            blocks.append([t, False])
        elif not blocks or blocks[-1][1]:
            raise ValueError(f"config.json: layer {i} is an MLP layer after {'another' if blocks else 'nothing'}; "
                             "kvlab joins each MLP layer to the mixer layer before it")  # fmt: skip
        else:
            blocks[-1][1] = True
    if derived.mlp_hidden_act != "relu2":
        raise ValueError(f"config.json: mlp_hidden_act={derived.mlp_hidden_act!r} is not supported (relu2 is)")
    if derived.sliding_window is not None:
        raise ValueError(f"config.json: sliding_window={derived.sliding_window} is not supported (its class's "
                         "attention is full)")  # fmt: skip
    d, heads, head_dim = derived.hidden_size, derived.mamba_num_heads, derived.mamba_head_dim
    # its Mamba-2 as Mamba2ForCausalLM's config.json would say it (the checks and defaults: _mamba_from_hf's)
    as_mamba2 = {"model_type": "mamba2", "hidden_size": d, "vocab_size": derived.vocab_size,
                 "num_hidden_layers": len(blocks), "state_size": derived.ssm_state_size,
                 "expand": derived.expand, "num_heads": heads, "head_dim": head_dim,
                 "n_groups": derived.n_groups, "conv_kernel": derived.conv_kernel, "chunk_size": derived.chunk_size,
                 "time_step_limit": derived.time_step_limit, "hidden_act": derived.mamba_hidden_act,
                 "use_bias": derived.use_bias, "use_conv_bias": derived.use_conv_bias,
                 "layer_norm_epsilon": derived.layer_norm_epsilon}  # fmt: skip
    model = _mamba_from_hf(as_mamba2, width_given=True)
    del model["mlp"]  # (the blocks' MLPs: mlp_pattern below)
    attention = {"kind": "attention", "n_heads": derived.num_attention_heads,
                 "n_kv_heads": derived.num_key_value_heads, "head_dim": derived.head_dim, "rope_dims": 0}  # fmt: skip
    pattern = "".join("M" if t == "linear_attention" else "A" for t, _ in blocks)
    return model | {
        "max_seq_len": derived.max_position_embeddings, "mixer": None,
        "tie_embeddings": bool(derived.tie_word_embeddings), "pattern": pattern,
        "mixers": {k: v for k, v in {"A": attention, "M": model["mixer"]}.items() if k in pattern},
        "mlp_pattern": "".join("D" if mlp else "N" for _, mlp in blocks),
        "mlps": {k: v for k, v in {"D": {"kind": "relu2", "hidden": derived.intermediate_size,
                                         "bias": bool(derived.mlp_bias)}, "N": {"kind": "none"}}.items()
                 if any((k == "D") == mlp for _, mlp in blocks)},
    }  # fmt: skip


NATIVE_LAYOUTS["nemotron_h"] = NativeLayout(
    model_type="nemotron_h",
    architecture="NemotronHForCausalLM",
    describes="mamba2 beside attention without positions, with squared-ReLU MLPs, as nemotron_h",
    claims=_nemotron_h_claims,
    problems=_nemotron_h_problems,
    to_hf=_nemotron_h_to_hf,
    export_state=_nemotron_h_state,
    from_hf=_nemotron_h_from_hf,
    prepare=_nemotron_h_weights,
)


# MiniMax-01 (MiniMax 2025, "Scaling Foundation Models with Lightning Attention"; `transformers`' MiniMaxForCausalLM,
# MiniMax-Text-01 and M1): lightning attention ("linear_attention") and GQA with RoPE on every channel
# ("full_attention") where layer_types puts them, experts in every layer (Mixtral's routing and names), and its
# block: each sublayer's residual its normalised input times an alpha, its output times a beta (our
# normed_residual, residual_alpha and residual_scale; its class has no other block, and the three sublayer kinds'
# alphas and betas must each be one value here). Lightning's heads are the attention's (num_attention_heads,
# head_dim), its qkv_proj our in_proj, its block_size our chunk_size (speed only, in either); its decays follow from
# the layer's depth in either, so its persistent decay tables (slope_rate and those made from it) are dropped on
# import and left out of an export (its class makes them when it loads, and lists them as new).

_MINIMAX_PARTS = {"mixer_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "mixer": "self_attn"}
_MINIMAX_MOE = {"router.weight": "gate.weight", "gate_up_proj": "experts.gate_up_proj",
                "down_proj": "experts.down_proj"}  # fmt: skip
_MINIMAX_SCALES = (("full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor"),
                   ("full_attn_beta_factor", "linear_attn_beta_factor", "mlp_beta_factor"))  # fmt: skip
_MINIMAX_BUFFERS = re.compile(r"\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay)$")
_LIGHTNING_NORM_EPS = 1e-6  # MiniMax's lightning norm takes no eps from its config


def _minimax_claims(cfg: ModelConfig) -> bool:
    return "lightning" in _mixer_kinds(cfg) and _mixer_kinds(cfg) <= {"lightning", "attention"}


def _minimax_problems(cfg: ModelConfig) -> list[str]:
    problems = pre_norm_problems(cfg) + gemma_problems(cfg) + multiplier_problems(cfg, but=("residual_scale",))
    if cfg.norm.kind != "rmsnorm" or cfg.parallel_residual or not cfg.normed_residual:
        problems.append(f"norm {cfg.norm.kind!r}, parallel_residual={cfg.parallel_residual}, normed_residual="
                        f"{cfg.normed_residual} (MiniMax's block: RMSNorms, each sublayer's residual its "
                        "normalised input: normed_residual)")  # fmt: skip
    lightning = [m for m in cfg.layer_mixers if m.kind == "lightning"]
    attention = [m for m in cfg.layer_mixers if m.kind == "attention"]
    s = lightning[0]
    if any(m != s for m in lightning) or any(m != attention[0] for m in attention):
        problems.append("lightning or attention layers that differ from one another (MiniMax has one of each)")
    if s.norm_eps != _LIGHTNING_NORM_EPS:
        problems.append(f"lightning with norm_eps={s.norm_eps} (MiniMax's: {_LIGHTNING_NORM_EPS})")
    if attention:
        a = attention[0]
        problems += _attention_layer_problems(a)
        if a.qkv_bias or a.o_bias or a.qk_norm or (a.n_heads, a.head_dim) != (s.n_heads, s.head_dim):
            problems.append(f"attention with qkv_bias={a.qkv_bias}, o_bias={a.o_bias}, qk_norm={a.qk_norm}, "
                            f"{a.n_heads} heads of {a.head_dim} beside lightning's {s.n_heads} of {s.head_dim} "
                            "(MiniMax's: no biases or norms, the two with the same heads)")  # fmt: skip
    moe = _moe_of(cfg)
    if moe is None or any(p.mlp != moe for p in cfg.plan) or not _softmax_top_k(moe) or not moe.norm_topk:
        problems.append("MLPs other than one MoE in every layer routed as Mixtral's (softmax, the top k renormalised, "
                        "no groups, bias, scale or shared experts, plain SwiGLU experts): MiniMax's")  # fmt: skip
    return problems


def _minimax_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    s = next(m for m in cfg.layer_mixers if m.kind == "lightning")
    a = next((m for m in cfg.layer_mixers if m.kind == "attention"), None)
    moe = _moe_of(cfg)
    alpha = 1.0 if cfg.residual_alpha is None else cfg.residual_alpha
    beta = 1.0 if cfg.residual_scale is None else cfg.residual_scale
    return {
        "model_type": "minimax", "num_attention_heads": s.n_heads, "head_dim": s.head_dim,
        "num_key_value_heads": a.n_kv_heads if a else s.n_heads, "sliding_window": a.window if a else None,
        "rope_parameters": rope_parameters(a) if a else {"rope_type": "default", "rope_theta": 10000.0},
        "layer_types": ["linear_attention" if m.kind == "lightning" else "full_attention" for m in cfg.layer_mixers],
        "block_size": s.chunk_size, "intermediate_size": moe.hidden, "num_local_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k,
        **dict.fromkeys(_MINIMAX_SCALES[0], alpha), **dict.fromkeys(_MINIMAX_SCALES[1], beta),
    }  # fmt: skip


def _minimax_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[_llama_top_name(name)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        if part == "mlp":
            rest = _MINIMAX_MOE[rest]
        elif part == "mixer" and rest == "in_proj.weight":
            rest = "qkv_proj.weight"
        out[f"model.layers.{i}.{_MINIMAX_PARTS.get(part, part)}.{rest}"] = value
    return out


def _minimax_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Without the decay tables its class saves (made again from the layer's depth); the hub's block_sparse_moe
    as its class's mlp (the experts already stacked by ``fuse_legacy_experts``)."""
    return {n.replace(".block_sparse_moe.", ".mlp."): v for n, v in theirs.items() if not _MINIMAX_BUFFERS.search(n)}


def _minimax_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    derived = class_config("MiniMaxConfig", hf)
    if set(derived.layer_types) - {"linear_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types {sorted(set(derived.layer_types))} are not supported "
                         "(linear_attention and full_attention are)")  # fmt: skip
    alpha, beta = ({getattr(derived, f) for f in fields} for fields in _MINIMAX_SCALES)
    if len(alpha) > 1 or len(beta) > 1:
        raise ValueError(f"config.json: {', '.join(_MINIMAX_SCALES[0])} = {sorted(alpha)} or "
                         f"{', '.join(_MINIMAX_SCALES[1])} = {sorted(beta)} differ; kvlab's block holds one alpha "
                         "and one beta for every sublayer (MiniMax-Text-01's and M1's are)")  # fmt: skip
    if derived.router_jitter_noise:
        raise ValueError(f"config.json: router_jitter_noise={derived.router_jitter_noise} is not supported (kvlab's "
                         "router takes no noise in training)")  # fmt: skip
    (alpha,), (beta,) = alpha, beta
    rope = read_rope({"model_type": "minimax", "rope_parameters": derived.rope_parameters})
    d, heads = derived.hidden_size, derived.num_attention_heads
    head_dim = derived.head_dim or d // heads
    # RoPE on the first rotary_dim channels of each head where config.json says so, as MiniMax's released code
    # rotates them (its class ignores the field and rotates every channel)
    attention = {"kind": "attention", "n_heads": heads, "n_kv_heads": derived.num_key_value_heads,
                 "head_dim": head_dim, "rope_dims": hf.get("rotary_dim") or head_dim, "rope_theta": rope.theta,
                 "rope_scaling": rope.scaling, "window": derived.sliding_window}  # fmt: skip
    lightning = {"kind": "lightning", "n_heads": heads, "head_dim": head_dim, "chunk_size": derived.block_size,
                 "norm_eps": _LIGHTNING_NORM_EPS}  # fmt: skip
    pattern = "".join("L" if t == "linear_attention" else "A" for t in derived.layer_types)
    top_k = derived.num_experts_per_tok
    return {
        "vocab_size": derived.vocab_size, "d_model": d, "n_layers": derived.num_hidden_layers,
        "max_seq_len": derived.max_position_embeddings, "norm": {"kind": "rmsnorm", "eps": derived.rms_norm_eps},
        "tie_embeddings": bool(derived.tie_word_embeddings), "mixer": None, "pattern": pattern,
        "mixers": {k: v for k, v in {"A": attention, "L": lightning}.items() if k in pattern},
        "mlp": {"kind": "moe", "hidden": derived.intermediate_size, "n_experts": derived.num_local_experts,
                "top_k": top_k, "norm_topk": True, "aux_loss_coef": derived.router_aux_loss_coef * top_k},
        "normed_residual": True, "residual_alpha": None if alpha == 1 else float(alpha),
        "residual_scale": None if beta == 1 else float(beta),
    }  # fmt: skip


NATIVE_LAYOUTS["minimax"] = NativeLayout(
    model_type="minimax",
    architecture="MiniMaxForCausalLM",
    describes="lightning (MiniMax-01's) beside attention, experts in every layer and normed_residual, as minimax",
    claims=_minimax_claims,
    problems=_minimax_problems,
    to_hf=_minimax_to_hf,
    export_state=_minimax_state,
    from_hf=_minimax_from_hf,
    prepare=_minimax_weights,
    normed_residual=True,
)


# Falcon-H1 (TII 2025, "Falcon-H1: A Family of Hybrid-Head Language Models"; `transformers`' FalconH1ForCausalLM):
# in every layer attention and Mamba-2 side by side on the same normalised input, their outputs added (our parallel
# mixer with combine: sum), then a SwiGLU, Llama's norms around them. Its muP multipliers are linear, so kvlab's
# weights hold them: on import each is folded into the weights it scales (attention_in into q, k and v,
# key_multiplier into k, attention_out into o; ssm_in and the five ssm_multipliers into in_proj's rows of z, x, B, C
# and dt; ssm_out into Mamba-2's out_proj; mlp_multipliers into the gate and down projections), and an export writes
# them as 1; embedding_multiplier and lm_head_multiplier are our embed_scale and logit_scale. Its Mamba-2 is ours
# with the gated RMSNorm after the gate (mamba_rms_norm, not mamba_norm_before_gate) or none (gated_norm false), its
# width mamba_d_ssm.

_FALCON_H1_PARTS = {"mixer_norm": "input_layernorm", "mlp_norm": "pre_ff_layernorm", "mlp": "feed_forward"}
_FALCON_H1_TOP = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.final_layernorm.weight"}


def _falcon_h1_branches(m) -> dict[str, int] | None:
    """A parallel mixer's branch index by kind, when it is Falcon-H1's (attention and Mamba-2 added); else None."""
    if m.kind != "parallel" or m.combine != "sum" or m.shared_output:
        return None
    kinds = {b.kind: i for i, b in enumerate(m.mixers)}
    return kinds if len(m.mixers) == 2 and set(kinds) == {"attention", "mamba2"} else None


def _falcon_h1_claims(cfg: ModelConfig) -> bool:
    return all(_falcon_h1_branches(m) is not None for m in cfg.layer_mixers)


def _falcon_h1_problems(cfg: ModelConfig) -> list[str]:
    problems = pre_norm_problems(cfg) + gemma_problems(cfg) + one_swiglu_problems(cfg)
    problems += multiplier_problems(cfg, but=("embed_scale", "logit_scale"))
    if cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"norm {cfg.norm.kind!r}, parallel_residual={cfg.parallel_residual} (Falcon-H1's: an RMSNorm "
                        "before each sublayer)")  # fmt: skip
    m = cfg.layer_mixers[0]
    if any(x != m for x in cfg.layer_mixers[1:]):
        problems.append("layers that differ from one another (Falcon-H1 has one attention and one Mamba-2)")
    kinds = _falcon_h1_branches(m)
    a, s = m.mixers[kinds["attention"]], m.mixers[kinds["mamba2"]]
    problems += _attention_layer_problems(a)
    if a.qkv_bias or a.o_bias or a.qk_norm or a.window is not None:
        problems.append(f"attention with qkv_bias={a.qkv_bias}, o_bias={a.o_bias}, qk_norm={a.qk_norm}, window="
                        f"{a.window} (Falcon-H1's: full, no biases or norms)")  # fmt: skip
    if s.norm_eps != cfg.norm.eps:
        problems.append(f"Mamba-2 norm_eps={s.norm_eps} apart from norm.eps={cfg.norm.eps} (its one rms_norm_eps)")
    return problems


def _falcon_h1_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = cfg.layer_mixers[0]
    kinds = _falcon_h1_branches(m)
    a, s = m.mixers[kinds["attention"]], m.mixers[kinds["mamba2"]]
    inner = inner_width(s, cfg.d_model)
    return {
        "model_type": "falcon_h1", "intermediate_size": cfg.mlp.hidden, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim, "rope_parameters": rope_parameters(a), "attention_bias": False, "mlp_bias": False,
        "projectors_bias": False, "mamba_d_ssm": inner, "mamba_n_heads": inner // s.head_dim,
        "mamba_d_head": s.head_dim, "mamba_n_groups": s.n_groups, "mamba_d_state": s.state_dim,
        "mamba_d_conv": s.conv_kernel, "mamba_expand": s.expand, "mamba_chunk_size": s.chunk_size,
        "mamba_conv_bias": True, "mamba_proj_bias": False, "mamba_rms_norm": s.gated_norm,
        "mamba_norm_before_gate": False,
        "time_step_limit": [0.0, float("inf")],
        "embedding_multiplier": 1.0 if cfg.embed_scale is None else cfg.embed_scale,
        "lm_head_multiplier": 1.0 if cfg.logit_scale is None else cfg.logit_scale,
        "key_multiplier": 1.0, "attention_in_multiplier": 1.0, "attention_out_multiplier": 1.0,
        "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "ssm_multipliers": [1.0] * 5,
        "mlp_multipliers": [1.0, 1.0],
    }  # fmt: skip


def _falcon_h1_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[_FALCON_H1_TOP.get(name, name)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        if part == "mixer":  # branches.<b>.<name>
            _, b, rest = rest.split(".", 2)
            if cfg.layer_mixers[int(i)].mixers[int(b)].kind == "mamba2":
                rest, value = _mamba_weight(rest, value, "mamba2")
                part = "mamba"
            else:
                part = "self_attn"
        out[f"model.layers.{i}.{_FALCON_H1_PARTS.get(part, part)}.{rest}"] = value
    return out


def _falcon_h1_fold(hf: dict[str, Any], state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Its multipliers into the weights each scales (ours, in place; exact but for one rounding each)."""
    c = class_config("FalconH1Config", hf)
    for i, m in enumerate(cfg.layer_mixers):
        kinds = _falcon_h1_branches(m)
        a, s = f"layers.{i}.mixer.branches.{kinds['attention']}.", f"layers.{i}.mixer.branches.{kinds['mamba2']}."
        scales = {a + "q_proj.weight": c.attention_in_multiplier, a + "v_proj.weight": c.attention_in_multiplier,
                  a + "k_proj.weight": c.attention_in_multiplier * c.key_multiplier,
                  a + "o_proj.weight": c.attention_out_multiplier, s + "out_proj.weight": c.ssm_out_multiplier,
                  f"layers.{i}.mlp.gate_proj.weight": c.mlp_multipliers[0],
                  f"layers.{i}.mlp.down_proj.weight": c.mlp_multipliers[1]}  # fmt: skip
        for name, scale in scales.items():
            state[name] = state[name] * scale
        mixer = m.mixers[kinds["mamba2"]]
        inner = inner_width(mixer, cfg.d_model)
        widths = [inner, inner, mixer.n_groups * mixer.state_dim, mixer.n_groups * mixer.state_dim,
                  inner // mixer.head_dim]  # z, x, B, C, dt  # fmt: skip
        rows = torch.cat([torch.full((w,), float(x)) for w, x in zip(widths, c.ssm_multipliers, strict=True)])
        weight = state[s + "in_proj.weight"]
        state[s + "in_proj.weight"] = weight * (rows.to(torch.float64) * c.ssm_in_multiplier).to(weight.dtype)[:, None]


def _falcon_h1_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    c = class_config("FalconH1Config", hf)
    unsupported = [(name, value) for name, value, supported in (
        ("mamba_norm_before_gate", c.mamba_norm_before_gate and c.mamba_rms_norm, False),
        ("mamba_proj_bias", c.mamba_proj_bias, False), ("mamba_conv_bias", c.mamba_conv_bias, True),
        ("projectors_bias", c.projectors_bias, False), ("attention_bias", c.attention_bias, False),
        ("mlp_bias", c.mlp_bias, False)) if bool(value) != supported]  # fmt: skip
    if unsupported:
        raise ValueError(f"config.json: {', '.join(f'{n}={v}' for n, v in unsupported)} is not supported (kvlab's "
                         "Mamba-2 normalises its gated output, RMSNorm(y * silu(z)), or not at all; its projections "
                         "have no biases, its convolution has one)")  # fmt: skip
    limit = time_step_limit(hf)
    if limit[0] > 0 or limit[1] != float("inf"):
        raise ValueError(f"config.json: time_step_limit={limit} is not supported (kvlab does not clamp dt)")
    d, eps = c.hidden_size, c.rms_norm_eps
    inner = c.mamba_expand * d if c.mamba_d_ssm is None else c.mamba_d_ssm
    rope = read_rope({"model_type": "falcon_h1", "rope_parameters": c.rope_parameters})
    attention = {"kind": "attention", "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
                 "head_dim": hf.get("head_dim") or d // c.num_attention_heads, "rope_theta": rope.theta,
                 "rope_scaling": rope.scaling}  # fmt: skip
    mamba2 = {"kind": "mamba2", "head_dim": c.mamba_d_head, "state_dim": c.mamba_d_state, "expand": c.mamba_expand,
              "inner": None if inner == c.mamba_expand * d else inner, "n_groups": c.mamba_n_groups,
              "conv_kernel": c.mamba_d_conv, "chunk_size": c.mamba_chunk_size, "norm_eps": eps,
              "gated_norm": bool(c.mamba_rms_norm)}  # fmt: skip
    return {
        "vocab_size": c.vocab_size, "d_model": d, "n_layers": c.num_hidden_layers,
        "max_seq_len": c.max_position_embeddings, "norm": {"kind": "rmsnorm", "eps": eps},
        "tie_embeddings": bool(c.tie_word_embeddings),
        "mixer": {"kind": "parallel", "mixers": [attention, mamba2], "combine": "sum"},
        "mlp": {"kind": "swiglu", "hidden": c.intermediate_size},
        "embed_scale": None if c.embedding_multiplier == 1 else float(c.embedding_multiplier),
        "logit_scale": None if c.lm_head_multiplier == 1 else float(c.lm_head_multiplier),
    }  # fmt: skip


NATIVE_LAYOUTS["falcon_h1"] = NativeLayout(
    model_type="falcon_h1",
    architecture="FalconH1ForCausalLM",
    describes="attention and mamba2 side by side, added (parallel, combine: sum), as falcon_h1",
    claims=_falcon_h1_claims,
    problems=_falcon_h1_problems,
    to_hf=_falcon_h1_to_hf,
    export_state=_falcon_h1_state,
    from_hf=_falcon_h1_from_hf,
    fold=_falcon_h1_fold,
)


# OLMo Hybrid (AllenAI 2025, Olmo-Hybrid-7B; `transformers`' OlmoHybridForCausalLM): gated DeltaNet
# ("linear_attention") in Llama's block (an RMSNorm before each sublayer) and OLMo 3's attention ("full_attention")
# in OLMo 2's block (an RMSNorm on each sublayer's output alone), where layer_types puts them (our norm_pattern: P
# and O), a SwiGLU in both. Its gated DeltaNet: q, k and v (one key head per value head) through a causal
# convolution without bias, beta = 2 sigmoid(b) (allow_neg_eigval: our negative_eigenvalues), its gated output norm
# at eps 1e-5; q_proj, k_proj, v_proj and g_proj are the row blocks of our in_proj, b_proj and a_proj of
# beta_decay_proj. Its attention: query and key RMSNorms over the whole projections (qk_norm_over: projection), RoPE
# on every channel (its NoPE form, without rope_theta, is refused).

_OLMO_HYBRID_LINEAR = ("q_proj", "k_proj", "v_proj", "g_proj")
_OLMO_HYBRID_NAMES = {"norm_weight": "o_norm.weight", "out_proj.weight": "o_proj.weight",
                      "conv_weight": "conv1d.weight"}  # fmt: skip
# both blocks' norms under its names (each block has one pair: Llama's before the sublayers, OLMo 2's after them)
_OLMO_HYBRID_BLOCK = {
    "mixer_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    "mixer_post_norm": "post_attention_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}
_OLMO_HYBRID_GDN_EPS = 1e-5  # its gated DeltaNet's output norm takes no eps from its config


def _olmo_hybrid_claims(cfg: ModelConfig) -> bool:
    return _mixer_kinds(cfg) == {"attention", "gated_deltanet"} and cfg.norm_pattern is not None


def _olmo_hybrid_problems(cfg: ModelConfig) -> list[str]:
    problems = multiplier_problems(cfg) + gemma_problems(cfg) + one_swiglu_problems(cfg)
    if cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"norm {cfg.norm.kind!r}, parallel_residual={cfg.parallel_residual} (OLMo Hybrid's: RMSNorms, "
                        "the MLP after the mixer)")  # fmt: skip
    places = [cfg.norm_placement(i) for i in range(cfg.n_layers)]
    if any(place != ((True, False) if m.kind == "gated_deltanet" else (False, True))
           for place, m in zip(places, cfg.layer_mixers, strict=True)):  # fmt: skip
        problems.append(f"norm_pattern={cfg.norm_pattern!r} against its layers (OLMo Hybrid's: P at gated DeltaNet, "
                        "O at attention)")  # fmt: skip
    linear = [m for m in cfg.layer_mixers if m.kind == "gated_deltanet"]
    attention = [m for m in cfg.layer_mixers if m.kind == "attention"]
    if any(m != linear[0] for m in linear) or any(m != attention[0] for m in attention):
        problems.append("gated DeltaNet or attention layers that differ from one another (OLMo Hybrid has one of each)")
    g, a = linear[0], attention[0]
    if (g.decay != "head" or not g.output_gate or g.gate_rank is not None or g.gate_activation != "silu"
            or g.n_qk_heads != g.n_heads or g.norm_eps != _OLMO_HYBRID_GDN_EPS):  # fmt: skip
        problems.append(f"gated DeltaNet with decay={g.decay!r}, output_gate={g.output_gate}, gate_rank={g.gate_rank}, "
                        f"gate_activation={g.gate_activation!r}, {g.n_qk_heads} query/key heads for {g.n_heads}, "
                        f"norm_eps={g.norm_eps} (OLMo Hybrid's: a decay per head, a full silu gate, a key head per "
                        f"value head, eps {_OLMO_HYBRID_GDN_EPS})")  # fmt: skip
    problems += _attention_layer_problems(a)
    if not a.qk_norm or a.qk_norm_over != "projection" or a.qk_norm_eps != cfg.norm.eps or a.window is not None:
        problems.append("attention without query and key norms over the projections at the model's norm eps, or "
                        "windowed (OLMo Hybrid's attention is full)")  # fmt: skip
    if a.qkv_bias or a.o_bias:
        problems.append(f"attention with qkv_bias={a.qkv_bias}, o_bias={a.o_bias} (OLMo Hybrid's has none)")
    return problems


def _olmo_hybrid_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    g = next(m for m in cfg.layer_mixers if m.kind == "gated_deltanet")
    a = next(m for m in cfg.layer_mixers if m.kind == "attention")
    return {
        "model_type": "olmo_hybrid", "intermediate_size": cfg.mlp.hidden, "num_key_value_heads": a.n_kv_heads,
        "rope_parameters": rope_parameters(a), "attention_bias": False,
        "layer_types": ["linear_attention" if m.kind == "gated_deltanet" else "full_attention"
                        for m in cfg.layer_mixers],
        "linear_num_key_heads": g.n_qk_heads, "linear_num_value_heads": g.n_heads, "linear_key_head_dim": g.head_dim,
        "linear_value_head_dim": g.value_head_dim, "linear_conv_kernel_dim": g.conv_kernel,
        "linear_allow_neg_eigval": g.negative_eigenvalues,
    }  # fmt: skip


def _olmo_hybrid_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if not name.startswith("layers."):
            out[_llama_top_name(name)] = value
            continue
        _, i, part, rest = name.split(".", 3)
        prefix, g = f"model.layers.{i}.", cfg.layer_mixers[int(i)]
        if part != "mixer":  # (the norms of OLMo 2's block, or of Llama's; the MLP)
            out[prefix + _OLMO_HYBRID_BLOCK.get(part, part) + "." + rest] = value
        elif g.kind == "attention":
            out[prefix + "self_attn." + rest] = value
        elif rest == "in_proj.weight":
            widths = [g.n_qk_heads * g.head_dim] * 2 + [g.n_heads * g.value_head_dim] * 2
            out.update({f"{prefix}linear_attn.{n}.weight": w
                        for n, w in zip(_OLMO_HYBRID_LINEAR, value.split(widths), strict=True)})  # fmt: skip
        elif rest == "beta_decay_proj.weight":
            out.update({f"{prefix}linear_attn.{n}.weight": w
                        for n, w in zip(("b_proj", "a_proj"), value.chunk(2), strict=True)})  # fmt: skip
        else:
            theirs = _OLMO_HYBRID_NAMES.get(rest, rest)
            out[f"{prefix}linear_attn.{theirs}"] = value[:, None] if rest == "conv_weight" else value
    return out


def _olmo_hybrid_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The hub's names (which its class's save_pretrained writes too) as its class holds them: the gated DeltaNet
    layers' attention_layer_norm and feedforward_layer_norm its input and post-attention norms, their q, k and v
    convolutions one."""
    out = {}
    for name, value in theirs.items():
        name = name.replace(".attention_layer_norm.", ".input_layernorm.")
        out[name.replace(".feedforward_layer_norm.", ".post_attention_layernorm.")] = value
    for name in [n for n in out if n.endswith(".linear_attn.q_conv1d.weight")]:
        prefix = name.removesuffix("q_conv1d.weight")
        out[prefix + "conv1d.weight"] = torch.cat([out.pop(f"{prefix}{x}_conv1d.weight") for x in "qkv"])
    return out


def _olmo_hybrid_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    c = class_config("OlmoHybridConfig", hf)
    if set(c.layer_types) - {"linear_attention", "full_attention"}:
        raise ValueError(f"config.json: layer_types {sorted(set(c.layer_types))} are not supported "
                         "(linear_attention and full_attention are)")  # fmt: skip
    if c.linear_num_key_heads != c.linear_num_value_heads:
        raise ValueError(f"config.json: linear_num_key_heads={c.linear_num_key_heads} apart from "
                         f"linear_num_value_heads={c.linear_num_value_heads} is not supported (its class reads one "
                         "key head per value head)")  # fmt: skip
    if not c.rope_parameters or c.rope_parameters.get("rope_theta") is None:
        raise ValueError("config.json: attention without RoPE (OLMo Hybrid's NoPE form, no rope_theta) is not "
                         "supported")  # fmt: skip
    rope = read_rope({"model_type": "olmo_hybrid", "rope_parameters": c.rope_parameters})
    d, heads, eps = c.hidden_size, c.num_attention_heads, c.rms_norm_eps
    attention = {"kind": "attention", "n_heads": heads, "n_kv_heads": c.num_key_value_heads, "head_dim": d // heads,
                 "rope_theta": rope.theta, "rope_scaling": rope.scaling, "qkv_bias": bool(c.attention_bias),
                 "o_bias": bool(c.attention_bias), "qk_norm": True, "qk_norm_eps": eps,
                 "qk_norm_over": "projection"}  # fmt: skip
    linear = {"kind": "gated_deltanet", "n_heads": c.linear_num_value_heads, "n_qk_heads": c.linear_num_key_heads,
              "head_dim": c.linear_key_head_dim, "value_head_dim": c.linear_value_head_dim,
              "conv_kernel": c.linear_conv_kernel_dim, "negative_eigenvalues": bool(c.linear_allow_neg_eigval),
              "norm_eps": _OLMO_HYBRID_GDN_EPS}  # fmt: skip
    pattern = "".join("D" if t == "linear_attention" else "A" for t in c.layer_types)
    return {
        "vocab_size": c.vocab_size, "d_model": d, "n_layers": c.num_hidden_layers,
        "max_seq_len": c.max_position_embeddings, "norm": {"kind": "rmsnorm", "eps": eps},
        "tie_embeddings": bool(c.tie_word_embeddings), "mixer": None, "pattern": pattern,
        "mixers": {k: v for k, v in {"A": attention, "D": linear}.items() if k in pattern},
        "norm_pattern": pattern.replace("D", "P").replace("A", "O"),
        "mlp": {"kind": "swiglu", "hidden": c.intermediate_size},
    }  # fmt: skip


NATIVE_LAYOUTS["olmo_hybrid"] = NativeLayout(
    model_type="olmo_hybrid",
    architecture="OlmoHybridForCausalLM",
    describes="gated_deltanet in Llama's block beside attention in OLMo 2's (norm_pattern) as olmo_hybrid",
    claims=_olmo_hybrid_claims,
    problems=_olmo_hybrid_problems,
    to_hf=_olmo_hybrid_to_hf,
    export_state=_olmo_hybrid_state,
    from_hf=_olmo_hybrid_from_hf,
    prepare=_olmo_hybrid_weights,
    norm_pattern=True,
)


# EXAONE 4.0 (LG AI Research 2025, "EXAONE 4.0: Unified Large Language Models Integrating Non-reasoning and
# Reasoning Modes"; `transformers`' Exaone4ForCausalLM): OLMo 2's block (an RMSNorm on each sublayer's output alone,
# its "QK-Reorder-LN"), RMSNorms of each query and key head, sliding-window attention with RoPE where layer_types
# puts it (3 of every 4 layers in the 32B) and full attention without positions (NoPE) in the others; without a
# sliding_window every layer is full, with RoPE. Names as OLMo's (_gemma_state).


def _exaone4_claims(cfg: ModelConfig) -> bool:
    return (_mixer_kinds(cfg) == {"attention"} and not cfg.pre_norms and cfg.post_norms
            and all(m.qk_norm and m.qk_norm_over == "head" for m in cfg.layer_mixers))  # fmt: skip


def _exaone4_problems(cfg: ModelConfig) -> list[str]:
    problems = multiplier_problems(cfg) + one_swiglu_problems(cfg)
    if cfg.logit_softcap is not None or cfg.norm.unit_offset or cfg.norm.kind != "rmsnorm" or cfg.parallel_residual:
        problems.append(f"logit_softcap={cfg.logit_softcap}, norm {cfg.norm.kind!r} with unit_offset="
                        f"{cfg.norm.unit_offset}, parallel_residual={cfg.parallel_residual} (EXAONE 4.0's: plain "
                        "RMSNorms on the sublayers' outputs)")  # fmt: skip
    mixers = cfg.layer_mixers
    windowed = [m for m in mixers if m.window is not None]
    full = [m for m in mixers if m.window is None]
    if any(m != windowed[0] for m in windowed) or any(m != full[0] for m in full):
        problems.append("windowed or full layers that differ from one another (EXAONE 4.0 has one of each)")
    m = (windowed or full)[0]
    if windowed and full and not same_but(full[0], m, ("window", "rope_dims")):
        problems.append("windowed and full layers that differ by more than the window and RoPE")
    if windowed and full and full[0].rope_dims != 0:
        problems.append(f"full layers with RoPE (rope_dims={full[0].rope_dims}) beside windowed ones (EXAONE 4.0's "
                        "full layers have no positions then)")  # fmt: skip
    problems += _attention_layer_problems(m)
    if m.qk_norm_eps != cfg.norm.eps or m.qk_norm_unit_offset or m.qkv_bias or m.o_bias:
        problems.append(f"attention with qk_norm_eps={m.qk_norm_eps}, qk_norm_unit_offset={m.qk_norm_unit_offset}, "
                        f"qkv_bias={m.qkv_bias}, o_bias={m.o_bias} (EXAONE 4.0's: per-head norms at the model's eps, "
                        "no biases)")  # fmt: skip
    return problems


def _exaone4_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    mixers = cfg.layer_mixers
    windowed = next((m for m in mixers if m.window is not None), None)
    m = windowed or mixers[0]
    return {
        "model_type": "exaone4", "intermediate_size": cfg.mlp.hidden, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim, "rope_parameters": rope_parameters(m),
        "sliding_window": windowed.window if windowed else None,
        "layer_types": ["sliding_attention" if x.window is not None else "full_attention" for x in mixers],
    }  # fmt: skip


def _exaone4_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    c = class_config("Exaone4Config", hf)
    if set(c.layer_types) - set(LAYER_TYPES):
        raise ValueError(f"config.json: layer_types {sorted(set(c.layer_types))} are not supported (sliding_attention "
                         "and full_attention are)")  # fmt: skip
    rope = read_rope({"model_type": "exaone4", "rope_parameters": c.rope_parameters})
    d, heads, eps = c.hidden_size, c.num_attention_heads, c.rms_norm_eps
    head_dim = hf.get("head_dim") or d // heads
    attention = {"kind": "attention", "n_heads": heads, "n_kv_heads": c.num_key_value_heads, "head_dim": head_dim,
                 "rope_theta": rope.theta, "rope_scaling": rope.scaling, "qk_norm": True,
                 "qk_norm_eps": eps}  # fmt: skip
    windowed = c.sliding_window is not None
    mixers = {
        "L": {**attention, "window": c.sliding_window},
        "G": {**attention, "rope_dims": 0 if windowed else head_dim},
    }  # (its global NoPE beside windows)
    pattern = "".join("L" if windowed and t == "sliding_attention" else "G" for t in c.layer_types)
    return {
        "vocab_size": c.vocab_size, "d_model": d, "n_layers": c.num_hidden_layers,
        "max_seq_len": c.max_position_embeddings, "norm": {"kind": "rmsnorm", "eps": eps},
        "tie_embeddings": bool(c.tie_word_embeddings), "pre_norms": False, "post_norms": True, "mixer": None,
        "pattern": pattern, "mixers": {k: v for k, v in mixers.items() if k in pattern},
        "mlp": {"kind": "swiglu", "hidden": c.intermediate_size},
    }  # fmt: skip


NATIVE_LAYOUTS["exaone4"] = NativeLayout(
    model_type="exaone4",
    architecture="Exaone4ForCausalLM",
    describes="attention with post norms alone and per-head query/key norms (windows with RoPE, full layers without) "
    "as exaone4",
    claims=_exaone4_claims,
    problems=_exaone4_problems,
    to_hf=_exaone4_to_hf,
    export_state=_gemma_state,
    from_hf=_exaone4_from_hf,
)


# MiniMax-M1 and MiniMax-Text-01 as their hub repositories hold them (remote code: model_type "minimax_m1",
# "MiniMaxText01"): MiniMax's layers under its class's names, its config in its own fields (attn_type_list, 0
# lightning and 1 softmax; layernorm_*_alpha and _beta; postnorm; rope_theta and rotary_dim), read into
# MiniMaxForCausalLM's and imported as that (exports go to that class). postnorm false with alphas and betas of 1 is
# Llama's residual; its shared experts (shared_intermediate_size) are refused.

_MINIMAX_REMOTE_SCALES = {"full_attn_alpha_factor": "layernorm_full_attention_alpha",
                          "full_attn_beta_factor": "layernorm_full_attention_beta",
                          "linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
                          "linear_attn_beta_factor": "layernorm_linear_attention_beta",
                          "mlp_alpha_factor": "layernorm_mlp_alpha",
                          "mlp_beta_factor": "layernorm_mlp_beta"}  # fmt: skip


def _minimax_remote_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("shared_intermediate_size"):
        raise ValueError(f"config.json: shared_intermediate_size={hf['shared_intermediate_size']} is not supported "
                         "(MiniMax's shared experts; its released models have none)")  # fmt: skip
    kinds = hf.get("attn_type_list")
    if not isinstance(kinds, list) or set(kinds) - {0, 1}:
        raise ValueError(f"config.json: attn_type_list={kinds!r} must list 0 (lightning) or 1 (softmax) per layer")
    scales = {ours: hf.get(theirs, 1) for ours, theirs in _MINIMAX_REMOTE_SCALES.items()}
    postnorm = bool(hf.get("postnorm", False))
    if not postnorm and set(scales.values()) != {1}:
        raise ValueError("config.json: postnorm=false with layernorm alphas or betas other than 1 is not supported "
                         "(kvlab scales the residual only after the norm: postnorm true)")  # fmt: skip
    dropped = {"model_type", "attn_type_list", "postnorm", "rope_theta", "auto_map", *_MINIMAX_REMOTE_SCALES.values()}
    model = _minimax_from_hf({k: v for k, v in hf.items() if k not in dropped} | scales | {
        "layer_types": ["linear_attention" if k == 0 else "full_attention" for k in kinds],
        "rope_parameters": {"rope_type": "default", "rope_theta": hf.get("rope_theta", 1e6)}})  # fmt: skip
    return model if postnorm else model | {"normed_residual": False}


for _remote in ("minimax_m1", "MiniMaxText01"):
    NATIVE_LAYOUTS[_remote] = NativeLayout(
        model_type=_remote,
        architecture="MiniMaxForCausalLM",
        describes="",  # (read only: MiniMax's models export as MiniMaxForCausalLM)
        claims=lambda cfg: False,
        problems=_minimax_problems,
        to_hf=_minimax_to_hf,
        export_state=_minimax_state,
        from_hf=_minimax_remote_from_hf,
        prepare=_minimax_weights,
        normed_residual=True,
    )
