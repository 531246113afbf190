"""Import of Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM).

A local directory with ``config.json`` and safetensors weights (one file or
shards with ``model.safetensors.index.json``) becomes a kvlab ``CausalLM``.
The weight layout is the same as ours up to names (our attention keeps
`transformers`' projection layout and RoPE convention), so the adapter is a
renaming plus a config translation; export (a later issue) uses the same
adapter in reverse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvlab.archs.config import ModelConfig
from kvlab.archs.model import CausalLM

# model_type -> what differs inside the Llama family
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": None, "o_bias": None, "window": False},  # None: from config.attention_bias
    "mistral": {"qkv_bias": False, "o_bias": False, "window": True},
    "qwen2": {"qkv_bias": True, "o_bias": False, "window": True},
}

_RENAMES = [  # (transformers, kvlab) name fragments
    ("model.embed_tokens.", "embed_tokens."),
    ("model.norm.", "norm."),
    ("model.layers.", "layers."),
    (".self_attn.", ".mixer."),
    (".input_layernorm.", ".mixer_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
]


def hf_to_kvlab_name(name: str) -> str:
    for theirs, ours in _RENAMES:
        name = name.replace(theirs, ours)
    return name


def kvlab_to_hf_name(name: str) -> str:
    if name.startswith(("embed_tokens.", "norm.", "layers.")):
        name = "model." + name
    for theirs, ours in _RENAMES[3:]:
        name = name.replace(ours, theirs)
    return name


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Llama-family ``config.json`` into a ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json: model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"config.json: rope scaling {rope_type!r} is not supported yet (only plain RoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    n_heads = hf["num_attention_heads"]
    window = None
    if family["window"] and (model_type == "mistral" or hf.get("use_sliding_window")):
        window = hf.get("sliding_window")
        if model_type == "qwen2" and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]:
            raise ValueError("config.json: Qwen2 with sliding windows on only some layers is not supported yet")
    bias = {
        k: bool(hf.get("attention_bias", False)) if family[k] is None else family[k] for k in ("qkv_bias", "o_bias")
    }
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm={"kind": "rmsnorm", "eps": hf.get("rms_norm_eps", 1e-6)},
        mlp={"kind": "swiglu", "hidden": hf["intermediate_size"]},
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mixer={
            "kind": "attention",
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // n_heads,
            "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            "window": window,
            **bias,
        },
    )


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, sharded or not."""
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json (found: {found})")


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A kvlab model with the weights of the Hugging Face directory ``path``."""
    directory = Path(path).expanduser()
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (is this a Hugging Face model directory?)")
    cfg = model_config_from_hf(json.loads(config_file.read_text()))
    state = {hf_to_kvlab_name(k): v for k, v in read_safetensors(directory).items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights()  # RoPE tables and tying; every parameter is overwritten next
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model.to(dtype)
