"""Conversions between architectures, for uptraining from existing checkpoints.

``convert_model(model, spec)`` takes the mapping a recipe gives under
``init.convert`` and returns a new model of the target architecture whose
weights are derived from ``model``'s:

- ``{to: gqa, n_kv_heads: G, method: mean}`` (Ainslie et al. 2023, sec. 2.1):
  the K and V projection heads are mean-pooled within each group of
  consecutive heads, so query head h keeps reading the pooled version of the
  K/V head it read before. ``method: first`` keeps the first head of each
  group instead (the paper's comparison). ``to: mqa`` is ``n_kv_heads: 1``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch

from kvlab._config import check_choice, check_int, check_keys
from kvlab.archs.config import ModelConfig
from kvlab.archs.model import CausalLM
from kvlab.layers.attention import AttentionConfig

log = logging.getLogger(__name__)

CONVERSIONS = ("gqa", "mqa")
GQA_METHODS = ("mean", "first")


def convert_model(model: CausalLM, spec: Mapping[str, Any]) -> CausalLM:
    """A new model converted as ``spec`` says; ``model`` is left unchanged."""
    if not isinstance(spec, Mapping) or "to" not in spec:
        raise ValueError(f"convert: expected a mapping with a 'to' key ({', '.join(CONVERSIONS)}), got {spec!r}")
    check_choice(spec["to"], "convert.to", CONVERSIONS)
    check_keys(spec, ["to", "n_kv_heads", "method"], "convert")
    n_kv_heads = 1 if spec["to"] == "mqa" else spec.get("n_kv_heads")
    method = spec.get("method", "mean")
    check_int(n_kv_heads, "convert.n_kv_heads", minimum=1)
    check_choice(method, "convert.method", GQA_METHODS)
    converted = _to_gqa(model, n_kv_heads, method)
    before = model.kv_footprint(torch.bfloat16).bytes_per_token
    after = converted.kv_footprint(torch.bfloat16).bytes_per_token
    log.info("convert to %s (%s): KV cache %d -> %d bytes/token (bf16)", spec["to"], method, before, after)
    return converted


def _to_gqa(model: CausalLM, n_kv_heads: int, method: str) -> CausalLM:
    cfg = model.config
    new_cfg_dict = copy.deepcopy(cfg.to_dict())
    mixer_dicts = [new_cfg_dict["mixer"]] if new_cfg_dict["mixer"] else list((new_cfg_dict["mixers"] or {}).values())
    attention = [m for m in mixer_dicts if m["kind"] == AttentionConfig.kind]
    if not attention:
        raise ValueError("convert.to=gqa: the model has no attention mixer to regroup")
    for m in attention:
        if m["n_kv_heads"] % n_kv_heads:
            raise ValueError(
                f"convert.n_kv_heads={n_kv_heads} must divide the model's n_kv_heads={m['n_kv_heads']}, "
                "so that each new K/V head pools whole old ones"
            )
        m["n_kv_heads"] = n_kv_heads
    new_cfg = ModelConfig.from_dict(new_cfg_dict)
    with torch.device("meta"):
        new = CausalLM(new_cfg)
    state = model.state_dict()
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        if not isinstance(mixer.cfg, AttentionConfig) or not mixer.owns_kv:
            continue
        for proj in ("k_proj", "v_proj"):
            for tensor in ("weight", "bias"):
                key = f"layers.{i}.mixer.{proj}.{tensor}"
                if key in state:
                    state[key] = _pool_heads(state[key], mixer.n_kv_heads, n_kv_heads, method)
    new.to_empty(device=model.embed_tokens.weight.device)
    new.init_weights()  # buffers (RoPE tables); every parameter is overwritten next
    new.load_state_dict(state, strict=True)
    return new.to(model.embed_tokens.weight.dtype)


def _pool_heads(w: torch.Tensor, old_heads: int, new_heads: int, method: str) -> torch.Tensor:
    """[old_heads * D, ...] -> [new_heads * D, ...], pooling consecutive heads in groups."""
    grouped = w.reshape(new_heads, old_heads // new_heads, w.shape[0] // old_heads, *w.shape[1:])
    pooled = grouped.mean(dim=1) if method == "mean" else grouped[:, 0]
    return pooled.reshape(new_heads * grouped.shape[2], *w.shape[1:]).clone()
