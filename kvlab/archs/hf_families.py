"""Native `transformers` classes per mixer family: what each family maps to, both ways.

``kvlab.archs.hf`` knows no family: it asks ``NATIVE_FAMILIES[kind]`` (the
mixer kind of every layer) why a model has no native class, for the
family's ``config.json`` fields, and, on import, which family a
``model_type`` belongs to. A family with a native counterpart registers one
``NativeFamily`` here; the others export as remote code.

- ``attention`` <-> Llama, Mistral, Qwen2 (our attention keeps their
  projection layout and RoPE convention: the weights are a renaming);
- ``mla`` <-> dense DeepSeek-V3 (its RoPE channel pairs reordered on import).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvlab.archs.config import ModelConfig
from kvlab.layers import MixerConfig


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
    from_hf: Callable[[dict[str, Any], Rope], dict[str, Any]]  # the mixer spec of a config.json
    # after import: change the weights (kvlab names) from the checkpoint's layout to ours, in place
    fix_weights: Callable[[dict[str, Any], dict[str, torch.Tensor], ModelConfig], None] | None = None


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
    "llama": {"qkv_bias": None, "o_bias": None, "window": False},  # None: from config.attention_bias
    "mistral": {"qkv_bias": False, "o_bias": False, "window": True},
    "qwen2": {"qkv_bias": True, "o_bias": False, "window": True},
}


def _attention_problems(cfg: ModelConfig, m) -> list[str]:
    if m.rope_dims != m.head_dim:
        return [f"partial RoPE (rope_dims={m.rope_dims} of head_dim={m.head_dim})"]
    if m.kv_groups is not None:
        return ["uneven K/V groups (kv_groups)"]
    if m.n_q_heads is not None:
        return [f"GQKVA query heads (n_q_heads={m.n_q_heads})"]
    if m.value_residual is not None:
        return [f"value residual ({m.value_residual})"]
    if m.query_allocation is not None:
        return [f"query heads allocated by key norms ({m.query_allocation})"]
    if m.kv_ranks is not None:
        return ["MatryoshkaKV projections of keys and values (kv_ranks)"]
    if m.n_v_heads is not None or m.v_groups is not None:
        return ["value heads grouped apart from the key heads (n_v_heads, v_groups)"]
    return []


def _attention_to_hf(cfg: ModelConfig, m) -> dict[str, Any] | str:
    if m.window is not None and m.qkv_bias and not m.o_bias:
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
    if m.rope_scaling is not None:  # transformers' names for the same settings
        s = m.rope_scaling
        hf["rope_parameters"] = {"rope_type": s["kind"], "rope_theta": m.rope_theta, "factor": s["factor"]}
        if s["kind"] == "llama3":
            hf["rope_parameters"].update(low_freq_factor=s["low_freq_factor"], high_freq_factor=s["high_freq_factor"],
                                         original_max_position_embeddings=s["original_max_seq_len"])  # fmt: skip
    if model_type == "llama":
        hf["attention_bias"] = m.qkv_bias
    elif model_type == "mistral":
        hf["sliding_window"] = m.window
    else:
        hf.update(use_sliding_window=m.window is not None, sliding_window=m.window,
                  max_window_layers=cfg.n_layers)  # fmt: skip
    return hf


def _attention_from_hf(hf: dict[str, Any], rope: Rope) -> dict[str, Any]:
    model_type = hf["model_type"]
    kind = LLAMA_TYPES[model_type]
    window = None
    if kind["window"] and (model_type == "mistral" or hf.get("use_sliding_window")):
        window = hf.get("sliding_window")
        if model_type == "qwen2" and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]:
            raise ValueError("config.json: Qwen2 with sliding windows on only some layers is not supported yet")
    bias = {k: bool(hf.get("attention_bias")) if kind[k] is None else kind[k] for k in ("qkv_bias", "o_bias")}
    n_heads = hf["num_attention_heads"]
    return {
        "kind": "attention",
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_heads,
        "rope_theta": rope.theta,
        "rope_scaling": rope.scaling,
        "window": window,
        **bias,
    }


register_native(
    NativeFamily(
        kind="attention",
        model_types={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"},
        problems=_attention_problems,
        to_hf=_attention_to_hf,
        from_hf=_attention_from_hf,
    )
)


# -- MLA: dense DeepSeek-V3 ------------------------------------------------------------------------


def _mla_problems(cfg: ModelConfig, m) -> list[str]:
    problems = []
    if m.norm_eps != cfg.norm.eps:
        problems.append(f"MLA norm_eps={m.norm_eps} differs from norm.eps={cfg.norm.eps} (DeepSeek-V3 has one eps)")
    if m.rope_kv_heads != 1 or m.rope_spectrum is not None or not m.latent_norm:
        problems.append("MLA with per-head RoPE keys, picked RoPE frequencies or no latent norm (MHA2MLA's form)")
    if m.latent_bits is not None:
        problems.append(f"MLA latents quantized to {m.latent_bits} bits (CLLA-quant)")
    return problems


def _mla_to_hf(cfg: ModelConfig, m) -> dict[str, Any]:
    return {  # every layer dense (no experts), RoPE pairs as ours
        "model_type": "deepseek_v3",
        "num_key_value_heads": m.n_heads,
        "first_k_dense_replace": cfg.n_layers,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.head_dim,
        "qk_rope_head_dim": m.rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "rope_interleave": False,
        "attention_bias": False,
    }


def _mla_from_hf(hf: dict[str, Any], rope: Rope) -> dict[str, Any]:
    if rope.scaling is not None:
        raise ValueError(f"config.json: {rope.described}: RoPE scaling is not supported for MLA")
    if hf.get("first_k_dense_replace", 0) < hf["num_hidden_layers"]:
        raise ValueError(
            f"config.json: DeepSeek-V3 with mixture-of-experts layers (first_k_dense_replace="
            f"{hf.get('first_k_dense_replace')} < num_hidden_layers={hf['num_hidden_layers']}) is not supported; "
            "only dense-MLP models are"
        )
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
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
    }


def _deinterleave_rope(hf: dict[str, Any], state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """DeepSeek checkpoints rotate neighbouring channel pairs (``rope_interleave``); we rotate
    (i, i + d/2) pairs. Reordering the RoPE output rows of the query and key projections to
    [even channels, odd channels] turns one into the other exactly (q.k is unchanged)."""
    if not hf.get("rope_interleave", True):
        return
    for i, m in enumerate(cfg.layer_mixers):
        D, R, r = m.head_dim, m.rope_head_dim, m.kv_lora_rank
        perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
        q_name = f"layers.{i}.mixer.{'q_proj' if m.q_lora_rank is None else 'q_b_proj'}.weight"
        q = state[q_name].view(m.n_heads, D + R, -1)
        state[q_name] = torch.cat([q[:, :D], q[:, D:][:, perm]], dim=1).reshape(m.n_heads * (D + R), -1)
        kv_name = f"layers.{i}.mixer.kv_a_proj_with_mqa.weight"
        state[kv_name] = torch.cat([state[kv_name][:r], state[kv_name][r:][perm]])


register_native(
    NativeFamily(
        kind="mla",
        model_types={"deepseek_v3": "DeepseekV3ForCausalLM"},
        problems=_mla_problems,
        to_hf=_mla_to_hf,
        from_hf=_mla_from_hf,
        fix_weights=_deinterleave_rope,
    )
)
