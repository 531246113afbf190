"""Hugging Face checkpoints: import and export (Llama, Mistral, Ministral, Qwen2/3, SmolLM3, Granite, Phi-3,
Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, Jamba, GPT-NeoX, Gemma 1/2/3, OLMo 2/3, OLMoE, gpt-oss, Mamba, Mamba-2, Bamba,
Granite 4.0-H, and our own remote-code exports).

``load_hf``: a local directory with ``config.json`` and safetensors weights
(one file or shards with ``model.safetensors.index.json``) becomes a kvlab
``CausalLM``. ``save_hf``: a kvlab model becomes a directory that
``AutoModelForCausalLM.from_pretrained`` loads. Where `transformers` has a
class for the architecture the export is native: each mixer family with a
native counterpart registers how it maps, both ways, in
``kvlab.archs.hf_families`` (attention as the Llama family's classes, MLA
as DeepSeek-V3, dense or with MoE; whole-model classes with names and
layouts of their own, Jamba, GPT-NeoX, Gemma, OLMo, gpt-oss and Mamba, in
``NATIVE_LAYOUTS``), and this module asks those registries, knowing no
family itself.
The weight layout is ours up to names, so one adapter, a renaming plus a
config translation, serves both directions.
Every other architecture is exported as remote code: kvlab's own modules,
flattened into the directory (``remote_code_files``), behind the
``model_type: kvlab`` classes of ``kvlab.archs.hf_modeling``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shutil
import types
from pathlib import Path
from typing import Any

import torch

from kvlab._config import dotted_items
from kvlab._io import atomic_path, remove_orphans, temp_path
from kvlab.archs.config import ModelConfig
from kvlab.archs.hf_families import (
    NATIVE_FAMILIES,
    NATIVE_LAYOUTS,
    check_silu,
    family_of_model_type,
    layout_for,
    read_rope,
    same_but,
)
from kvlab.archs.model import CausalLM, build_model
from kvlab.layers.attention import AttentionConfig

_RENAMES = [  # (transformers, kvlab) name fragments
    ("model.embed_tokens.", "embed_tokens."),
    ("model.norm.", "norm."),
    ("model.layers.", "layers."),
    (".self_attn.", ".mixer."),
    (".input_layernorm.", ".mixer_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
    # MoE (DeepSeek-V3's names): the router, its score bias, shared experts, the stacked experts; Qwen2-MoE's
    # gate of its shared expert, and its shared expert (read; written by _TYPE_RENAMES)
    (".mlp.gate.e_score_correction_bias", ".mlp.score_bias"),
    (".mlp.gate.", ".mlp.router."),
    (".mlp.shared_experts.", ".mlp.shared."),
    (".mlp.shared_expert_gate.", ".mlp.shared_gate."),
    (".mlp.shared_expert.", ".mlp.shared."),
    (".mlp.experts.", ".mlp."),
]
# What a class names apart from the others, after kvlab_to_hf_name: Qwen2-MoE's shared expert (one, not DeepSeek's)
_TYPE_RENAMES = {"qwen2_moe": (".mlp.shared_experts.", ".mlp.shared_expert.")}
_STACKED_EXPERTS = re.compile(r"\.mlp\.(gate_up_proj|down_proj)$")  # ours; a dense MLP's end in .weight


def hf_to_kvlab_name(name: str) -> str:
    for theirs, ours in _RENAMES:
        name = name.replace(theirs, ours)
    return name


def kvlab_to_hf_name(name: str) -> str:
    if name.startswith(("embed_tokens.", "norm.", "layers.")):
        name = "model." + name
    if _STACKED_EXPERTS.search(name):
        return _STACKED_EXPERTS.sub(r".mlp.experts.\1", name)
    for theirs, ours in _RENAMES[3:-1]:  # not the experts' (".mlp." is in every MLP's names)
        name = name.replace(ours, theirs)
    return name


_LEGACY_EXPERT = re.compile(
    r"^(.*\.(?:mlp|feed_forward|block_sparse_moe))\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)  # DeepSeek's, Jamba's, Qwen3-MoE's; Mixtral's (block_sparse_moe, w1 the gate, w3 up, w2 down)
_MIXTRAL_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def fuse_legacy_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints that keep one tensor per expert (``...mlp.experts.<e>.gate_proj.weight``, as the hub's
    DeepSeek-V3, Jamba and Qwen3-MoE checkpoints do; Mixtral's ``block_sparse_moe.experts.<e>.w1.weight``) in
    `transformers`' stacked layout: ``experts.gate_up_proj`` [E, 2H, D] (gate rows, then up rows) and
    ``experts.down_proj`` [E, D, H]; Mixtral's router (``block_sparse_moe.gate``) under transformers' name."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, value in state.items():
        match = _LEGACY_EXPERT.match(name)
        if match is None:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = value
        else:
            prefix = match[1].replace(".block_sparse_moe", ".mlp")
            part = _MIXTRAL_PARTS.get(match[3], match[3]).removesuffix("_proj")
            experts.setdefault(prefix, {}).setdefault(int(match[2]), {})[part] = value
    for prefix, by_index in experts.items():
        order = [by_index[e] for e in range(len(by_index))]
        if sorted(by_index) != list(range(len(by_index))) or any(len(e) != 3 for e in order):
            raise ValueError(f"{prefix}.experts: the experts' weights are incomplete (each needs gate, up and down)")
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in order])
        out[f"{prefix}.experts.down_proj"] = torch.stack([e["down"] for e in order])
    return out


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate the ``config.json`` of a native family (``kvlab.archs.hf_families``) into a ModelConfig."""
    model_type = hf.get("model_type")
    family = family_of_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        types = [t for f in NATIVE_FAMILIES.values() for t in f.model_types] + list(NATIVE_LAYOUTS)
        raise ValueError(
            f"config.json: model_type={model_type!r} is not supported; supported: {', '.join(types)} "
            "and kvlab (our remote-code exports)"
        )
    rope = read_rope(hf)
    check_silu(hf)
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported (kvlab's SwiGLU has no biases)")
    mixer = family.from_hf(hf, rope)
    if isinstance(mixer, list):  # one per layer: the distinct ones named A, B, ... in a pattern
        distinct = [m for i, m in enumerate(mixer) if m not in mixer[:i]]
        names = {chr(ord("A") + i): m for i, m in enumerate(distinct)}
        pattern = "".join(next(k for k, v in names.items() if v == m) for m in mixer)
        layers = {"pattern": pattern, "mixers": names}
    else:
        layers = {"mixer": mixer}
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm={"kind": "rmsnorm", "eps": hf.get("rms_norm_eps", 1e-6)},
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **layers,
        **family.mlps_from_hf(hf),
        **family.model_fields_from_hf(hf),
    )


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` fields of a kvlab model with a native `transformers` class.

    Raises ValueError naming what has no native counterpart.
    """
    layout = layout_for(cfg)
    if layout is not None:
        allowed = {"mlp_bias": layout.mlp_bias, "normed_residual": layout.normed_residual,
                   "norm_pattern": layout.norm_pattern}  # fmt: skip
        _refuse(_model_problems(cfg, **allowed) + layout.problems(cfg))
        a = next((m for m in cfg.layer_mixers if m.kind == "attention"), None)  # (None: Mamba's)
        return {"architectures": [layout.architecture], **_common_fields(cfg, a), **layout.to_hf(cfg)}
    mixers = cfg.layer_mixers
    m = mixers[0]
    problems = []
    family = NATIVE_FAMILIES.get(m.kind)
    may_differ = family.per_layer_fields if family is not None else ()
    if any(not same_but(x, m, may_differ) for x in mixers[1:]):
        problems.append("layers with different mixers" + (f" (beyond {', '.join(may_differ)})" if may_differ else ""))
    if family is None:
        problems.append(f"mixer kind {m.kind!r}")
    else:
        problems += family.problems(cfg, m)
    problems += _model_problems(cfg)
    fields = family.to_hf(cfg, m) if not problems else None
    if isinstance(fields, str):
        problems.append(fields)
    _refuse(problems)
    hf: dict[str, Any] = {
        "architectures": [family.model_types[fields["model_type"]]],
        **_common_fields(cfg, m),
        "intermediate_size": cfg.mlp.hidden,
        "rope_theta": m.rope_theta,
    }
    return hf | fields


def _common_fields(cfg: ModelConfig, attention) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        **({"num_attention_heads": attention.n_heads} if attention is not None else {}),
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        **({"rms_norm_eps": cfg.norm.eps, "hidden_act": "silu"} if cfg.norm.kind == "rmsnorm" else {}),  # Llama's
    }


def _refuse(problems: list[str]) -> None:
    if problems:
        native = "; ".join(f"{f.kind} as {'/'.join(f.model_types)}" for f in NATIVE_FAMILIES.values())
        layouts = "; ".join(layout.describes for layout in NATIVE_LAYOUTS.values() if layout.describes)
        raise ValueError(
            "save_hf: no native transformers class for this model (" + "; ".join(problems) + "); "
            f"native export covers every layer the same mixer without cross-layer sharing: {native}; and "
            f"whole models: {layouts}"
        )


def _model_problems(
    cfg: ModelConfig, mlp_bias: bool = False, normed_residual: bool = False, norm_pattern: bool = False
) -> list[str]:
    """What no native class has, whatever the mixers (``mlp_bias``: but biases on gated MLPs, ``normed_residual``:
    but MiniMax's block, ``norm_pattern``: but norms placed per layer, which it has)."""
    problems = []
    if not normed_residual and cfg.normed_residual:
        problems.append("residuals taken after the norms (normed_residual: MiniMax-01's block)")
    if not norm_pattern and cfg.norm_pattern is not None:
        problems.append(f"norms placed per layer (norm_pattern={cfg.norm_pattern!r}: OLMo Hybrid's)")
    if not mlp_bias and any(p.mlp.kind in ("swiglu", "geglu") and p.mlp.bias for p in cfg.plan):
        problems.append("biases on the gated MLPs (mlp bias: RecurrentGemma's)")
    if cfg.blocks is not None:
        problems.append("a Block Transformer (blocks)")
    if cfg.context is not None:
        problems.append("a context encoder with cross-attention (context)")
    if cfg.meta_tokens:
        problems.append(f"meta tokens before every sequence (meta_tokens={cfg.meta_tokens})")
    shared = sorted({r.what for p in cfg.plan for r in p.reads if r.what in ("kv", "attention")})
    if shared:
        problems.append("cross-layer sharing of " + " and ".join({"kv": "K/V", "attention": "attention weights"}[w]
                                                                for w in shared))  # fmt: skip
    return problems  # the norms, blocks and MLPs each family checks: its own layouts


def save_hf(
    model: CausalLM,
    out_dir: str | Path,
    tokenizer=None,
    *,
    remote_code: bool | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    metrics: dict | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    ``remote_code``: None exports natively where `transformers` has a class
    for the architecture and as ``model_type: kvlab`` remote code otherwise;
    True always writes remote code; False raises ValueError (naming what
    has no native counterpart) instead of writing remote code.
    ``tokenizer``: a ``tokenizers.Tokenizer``, or a path to a tokenizer.json or
    a directory holding one; written with ``tokenizer_config.json`` so
    ``AutoTokenizer.from_pretrained(out_dir)`` works. Weights above
    ``max_shard_bytes`` are split into shards with an index. WGQA merge
    weights are folded first. The directory is written beside its final
    place and renamed, so a failed export never leaves half of one.
    ``out_dir`` must be new, empty, or an earlier kvlab export (its
    ``.kvlab-export.json`` lists the files kvlab wrote); a directory holding
    anything else is refused unless ``overwrite=True`` replaces it whole.
    A model card (``README.md``) describes the architecture, its KV-cache
    footprint and, given ``metrics`` (a run's ``metrics.json``), its numbers.
    """
    from kvlab.archs.convert import fold_kv_merge

    if any(isinstance(m, AttentionConfig) and m.kv_merge > 1 for m in model.config.layer_mixers):
        model = fold_kv_merge(model)
    hf = None
    if remote_code is not True:
        try:
            hf = hf_config_from_model(model.config)
        except ValueError:
            if remote_code is False:
                raise
    out = Path(out_dir).expanduser()
    _check_export_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent)  # temporaries of exports that were killed
    with atomic_path(out, install=_swap_in) as tmp:
        tmp.mkdir()
        _write_export(model, tmp, tokenizer, hf, max_shard_bytes, dtype)
        (tmp / "README.md").write_text(model_card(model, hf, dtype, metrics))
        for file in tmp.iterdir():  # safetensors writes its files private (0600): the modes of any other file
            file.chmod(0o666 & ~_umask())
        written = {str(p.relative_to(tmp)): _stamp(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"written_by": "kvlab", "files": sorted(written), "stamps": written}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


EXPORT_MANIFEST = ".kvlab-export.json"  # the files an export wrote: what a later export may replace


def _stamp(path: Path) -> list[int]:
    """A file's size and modification time: what an edit after the export changes."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _export_files(out: Path) -> set[str] | None:
    """The files a previous kvlab export wrote into ``out`` and that are as it wrote them (one edited since, a
    model card you completed, is no longer kvlab's to replace); None: ``out`` is no kvlab export."""
    try:
        manifest = json.loads((out / EXPORT_MANIFEST).read_text())
        files, stamps = set(manifest["files"]), manifest.get("stamps", {})  # (exports before stamps: names only)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    unchanged = {f for f in files if f not in stamps or not (out / f).is_file() or _stamp(out / f) == stamps[f]}
    return unchanged | {EXPORT_MANIFEST}


def _check_export_target(out: Path, overwrite: bool) -> None:
    """Refuse to export over anything kvlab did not write, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_hf: {out} is a file; an export is a directory")
    if not out.exists() or overwrite:
        return
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink()}
    foreign = sorted(present - (_export_files(out) or set()))
    if foreign:
        raise ValueError(
            f"save_hf: {out} holds files kvlab did not write, or changed since ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); export into a new or empty directory, or pass overwrite=True"
        )


def _swap_in(new: Path, out: Path) -> None:
    """Put the finished export ``new`` at ``out``: a rename, with what was there set aside first and
    deleted only once the new export is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    old = temp_path(out.parent / f"{out.name}.previous")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def _write_export(model: CausalLM, tmp: Path, tokenizer, hf: dict | None, max_shard_bytes: int, dtype) -> None:
    """The export's files, into the directory ``tmp``."""
    import transformers

    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}
    family = family_of_model_type(hf["model_type"]) if hf is not None else None
    if family is not None and family.export_weights is not None:  # (DeepSeek-V2's neighbouring RoPE pairs)
        family.export_weights(hf, cast, model.config)
    if hf is not None and hf["model_type"] in NATIVE_LAYOUTS:  # a whole-model class's names and layouts
        cast = NATIVE_LAYOUTS[hf["model_type"]].export_state(cast, model.config)
    else:
        rename = kvlab_to_hf_name if hf is not None else (lambda name: REMOTE_PREFIX + name)
        cast = {rename(k): v for k, v in cast.items()}
        if hf is not None and hf["model_type"] in _TYPE_RENAMES:
            cast = {k.replace(*_TYPE_RENAMES[hf["model_type"]]): v for k, v in cast.items()}
    _save_weights({k: v.detach().contiguous() for k, v in cast.items()}, tmp, max_shard_bytes)

    weights_dtype = str(dtype or model.embed_tokens.weight.dtype).removeprefix("torch.")
    eos = None
    if tokenizer is not None:
        eos = _save_tokenizer(tokenizer, tmp, model.config.max_seq_len)
    # EOS begins documents too (_save_tokenizer). The model's pad id is none: classes make it their embeddings'
    # padding_idx, whose row then trains no more (EOS's, here), and some have a default of their own (SmolLM3's
    # 128004, past a smaller vocabulary); generation pads with EOS.
    special = {"eos_token_id": eos, "bos_token_id": eos, "pad_token_id": None}
    if hf is not None:
        config = transformers.AutoConfig.for_model(**hf, dtype=weights_dtype, **special)
    else:
        from kvlab.archs.hf_modeling import KvlabConfig

        for name, source in remote_code_files(leave_out=unused_modules(model.config)).items():
            (tmp / name).write_text(source)
        config = KvlabConfig(
            kvlab=model.config.to_dict(),
            architectures=["KvlabForCausalLM"],
            auto_map={
                "AutoConfig": "modeling_kvlab.KvlabConfig",
                "AutoModelForCausalLM": "modeling_kvlab.KvlabForCausalLM",
            },
            dtype=weights_dtype,
            **special,
        )
    config.save_pretrained(tmp)
    transformers.GenerationConfig(**special | {"pad_token_id": eos}).save_pretrained(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # reading it means setting it: set back at once
    os.umask(mask)
    return mask


def model_card(model: CausalLM, hf: dict | None, dtype: torch.dtype | None, metrics: dict | None = None) -> str:
    """The export's README.md: Hub metadata (through ``huggingface_hub``), the architecture and its plan, the
    KV-cache footprint per layer and at a few contexts, the run's metrics, and how to load it."""
    from huggingface_hub import ModelCardData

    from kvlab.archs.footprint import human

    cfg = model.config
    kinds = cfg.mixer_kinds
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["kvlab", "kv-cache", *kinds])  # fmt: skip
    native = hf is not None
    loading = (f"a native `{hf['model_type']}` model" if native
               else "remote code (`model_type: kvlab`, loaded with `trust_remote_code=True`)")  # fmt: skip
    weights = str(dtype or model.embed_tokens.weight.dtype).removeprefix("torch.")
    lines = [
        f"---\n{data.to_yaml()}\n---\n",
        "# A kvlab model\n",
        f"Trained with kvlab and exported as {loading}: {cfg.n_layers} layers, d_model "
        f"{cfg.d_model}, vocabulary {cfg.vocab_size}, context {cfg.max_seq_len} tokens, "
        f"{model.num_parameters():,} parameters ({weights} weights).\n",
        "## Architecture\n",
        "Each layer's token mixer and what it reads of other layers (kvlab's plan):\n",
        f"```\n{cfg.describe_plan()}\n```\n",
    ]
    fp = model.kv_footprint(torch.bfloat16)
    lines += [
        "## KV cache (bf16, one sequence)\n",
        "| layer | mixer | bytes per token | fixed bytes | window | reads K/V of layer |",
        "|---:|---|---:|---:|---:|---:|",
        *(
            f"| {r.layer} | {r.kind} | {r.bytes_per_token:,} | {r.fixed_bytes:,} | "
            f"{'-' if r.max_tokens is None else r.max_tokens} | {r.kv_source} |"
            for r in fp.per_layer
        ),  # fmt: skip
        "",
        f"In all: {fp.bytes_per_token:,} bytes per token and {fp.fixed_bytes:,} fixed bytes; "
        + ", ".join(
            f"{human(fp.total_bytes(n))} at {n:,} tokens" for n in sorted({min(2048, cfg.max_seq_len), cfg.max_seq_len})
        )
        + " (kvlab's `footprint`, checked against the cache it allocates).\n",
    ]
    numbers = [(k, v) for k, v in dotted_items({k: v for k, v in (metrics or {}).items() if k != "model"})
               if isinstance(v, (int, float)) and not isinstance(v, bool)]  # fmt: skip
    if numbers:
        rows = [f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v:,} |" for k, v in numbers]
        lines += ["## Metrics\n", "| metric | value |", "|---|---:|", *rows, ""]
    trust = "" if native else ", trust_remote_code=True"
    lines += [
        "## Use\n",
        "```python\nimport transformers\n\n"
        f'model = transformers.AutoModelForCausalLM.from_pretrained("<this directory>"{trust})\n'
        'tokenizer = transformers.AutoTokenizer.from_pretrained("<this directory>")\n```\n',
    ]
    if not native:
        lines.append(
            "With kvlab installed, `import kvlab` registers the classes, and `trust_remote_code` is not needed.\n"
        )
    return "\n".join(lines)


def _save_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` with an index, split as
    ``transformers`` splits its own (``huggingface_hub``'s splitter: the same file names and index)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
    for file, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, directory / file, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# -- remote code ---------------------------------------------------------------

REMOTE_PREFIX = "model."  # KvlabForCausalLM keeps the CausalLM under .model
REMOTE_ENTRY = "kvlab.archs.hf_modeling"


def _remote_file_name(module: str) -> str:
    if module == REMOTE_ENTRY:
        return "modeling_kvlab.py"
    return "kvlab_" + module.removeprefix("kvlab.").replace(".", "_") + ".py"


def unused_modules(config: ModelConfig) -> set[str]:
    """The kvlab modules a model of ``config`` never runs: the mixer families it has no layer of (each family's
    module registers its kinds) and, unless it has blocks, the Block Transformer. A family the config names
    without using it (a ``mixers`` entry the pattern leaves out) is shipped: loading validates the config."""
    from kvlab.layers import MIXERS

    def named(spec) -> set[str]:
        kinds = set()
        if isinstance(spec, dict):
            kinds = {spec["kind"]} if isinstance(spec.get("kind"), str) else set()
            spec = list(spec.values())
        for value in spec if isinstance(spec, list) else ():
            kinds |= named(value)
        return kinds

    used = set(config.mixer_kinds) | named(config.to_dict())
    by_module: dict[str, set[str]] = {}
    for kind, cls in MIXERS.items():
        by_module.setdefault(cls.__module__, set()).add(kind)
    unused = {module for module, kinds in by_module.items() if not kinds & used and kinds != {"attention"}}
    return unused | ({"kvlab.archs.block_transformer"} if config.blocks is None else set())


def remote_code_files(entry: str = REMOTE_ENTRY, leave_out: set[str] = frozenset()) -> dict[str, str]:
    """File name -> source of the remote code an export carries.

    ``entry`` (``kvlab.archs.hf_modeling``) and every kvlab module it imports, directly
    or not (so every registered mixer family), but those in ``leave_out``
    (``unused_modules``: an export ships the families its model uses): an
    import of one at a module's top is dropped (the registry's imports), one
    inside a function (``build_model``'s of the Block Transformer) raises
    ImportError if ever reached. Each module becomes one flat file whose
    ``from kvlab.x import y`` lines become ``from .kvlab_x import y``:
    `transformers` copies a remote module's relative imports along with it,
    and nothing needs kvlab installed. Modules must import kvlab names from
    modules (``from kvlab.layers.attention import Attention``), not modules
    from packages; anything else is refused here rather than shipped broken.
    """
    files: dict[str, str] = {}
    todo, done = [entry], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        source = inspect.getsource(importlib.import_module(name))
        lines = source.splitlines(keepends=True)
        edits = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "kvlab" for a in node.names):
                raise ValueError(f"{name}, line {node.lineno}: 'import kvlab...' cannot be made relative; use 'from'")
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "kvlab"):
                continue
            target = importlib.import_module(node.module)
            for alias in node.names:
                if isinstance(getattr(target, alias.name, None), types.ModuleType):
                    raise ValueError(
                        f"{name}, line {node.lineno}: 'from {node.module} import {alias.name}' imports a module; "
                        f"import names from {node.module}.{alias.name} instead"
                    )
            indent = " " * node.col_offset
            if node.module in leave_out:  # not shipped: nothing at the top, an error should it ever be reached
                why = f'{indent}raise ImportError("this export does not hold {node.module}: its model never uses it")\n'
                edits.append((node.lineno, node.end_lineno, why if node.col_offset else ""))
                continue
            names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
            relative = f"{indent}from .{_remote_file_name(node.module)[:-3]} import {names}\n"
            edits.append((node.lineno, node.end_lineno, relative))
            todo.append(node.module)
        for first, last, text in sorted(edits, reverse=True):
            lines[first - 1 : last] = [text]
        text = "".join(lines)
        # transformers finds imports with regexes over the whole text: a stray
        # kvlab import (in a docstring too) would make loading ask for kvlab.
        stray = re.search(r"^\s*(from|import)\s+kvlab\b.*$", text, flags=re.MULTILINE)
        if stray:
            raise ValueError(f"{name}: {stray.group(0).strip()!r} would make the export import kvlab")
        files[_remote_file_name(name)] = f"# Written by kvlab from {name}; the export's own copy.\n" + text
    return files


def _save_tokenizer(tokenizer, directory: Path, max_len: int) -> int:
    """tokenizer.json + tokenizer_config.json (+ special tokens) via transformers; returns the EOS id.

    kvlab's data joins documents with EOS, so EOS is what a model saw before a document: it is the BOS token
    too, and pads a batch (clients such as lm-eval ask for one), on the left (kvlab's models take left-padded
    rows, and a decoder generates after the last token); ``model_max_length`` is the model's context."""
    import transformers
    from tokenizers import Tokenizer

    from kvlab.tokenizer import eos_id, load_tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(str(tokenizer))
    eos = eos_id(tok)
    token = tok.id_to_token(eos)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=token, bos_token=token,
                                                pad_token=token, model_max_length=max_len,
                                                padding_side="left")  # fmt: skip
    fast.save_pretrained(directory)
    return eos


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, sharded or not: safetensors, else PyTorch's pickled files
    (``pytorch_model.bin``, as older checkpoints have them alone; read with ``weights_only``, which unpickles
    tensors and nothing else). A file that does not load is named."""
    from safetensors.torch import load_file

    def load(file: Path) -> dict[str, torch.Tensor]:
        try:
            if file.suffix == ".bin":
                return torch.load(file, map_location="cpu", weights_only=True)
            return load_file(file)
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: missing (the index lists it)") from None
        except Exception as e:  # safetensors and torch raise their own error types for truncated or foreign files
            raise ValueError(f"{file}: not a readable {'PyTorch' if file.suffix == '.bin' else 'safetensors'} "
                             f"weights file ({e})") from None  # fmt: skip

    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return load(directory / single)
        index = directory / f"{single}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index}: not a weights index ({type(e).__name__}: {e})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load(directory / shard))
            return state
    found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    raise FileNotFoundError(
        f"{directory}: no model.safetensors, pytorch_model.bin or an index of their shards (found: {found})"
    )


def hf_model_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(the ModelConfig ``load_hf`` builds, the ``config.json`` it reads) of a Hugging Face directory, or of a
    ``config.json`` itself; no weights are read."""
    config_file = Path(path).expanduser()
    if config_file.is_dir() or not config_file.name.endswith(".json"):
        config_file = config_file / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file.parent}: no config.json (is this a Hugging Face model directory?)")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: expected a JSON object of settings, got {type(hf).__name__}")
    try:
        if hf.get("model_type") == "kvlab":  # a remote-code export of ours
            cfg = ModelConfig.from_dict(hf["kvlab"])
        elif hf.get("model_type") in NATIVE_LAYOUTS:
            cfg = ModelConfig.from_dict(NATIVE_LAYOUTS[hf["model_type"]].from_hf(hf))
        else:
            cfg = model_config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{config_file}: the field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {str(e).removeprefix('config.json: ')}") from None
    return cfg, hf


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A kvlab model with the weights of the Hugging Face directory ``path``."""
    directory = Path(path).expanduser()
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (is this a Hugging Face model directory?)")
    cfg, hf = hf_model_config(directory)
    layout = NATIVE_LAYOUTS.get(hf.get("model_type"))
    if hf.get("model_type") == "kvlab":
        state = {k.removeprefix(REMOTE_PREFIX): v for k, v in read_weights(directory).items()}
    elif layout is not None:  # renamed below, once our model's names are known
        state = fuse_legacy_experts(read_weights(directory))
    else:
        state = {hf_to_kvlab_name(k): v for k, v in fuse_legacy_experts(read_weights(directory)).items()}
    _split_fused_projections(state, cfg, config_file)
    if cfg.tie_embeddings and "lm_head.weight" in state:
        # transformers would tie the head to the embeddings and drop this one: refuse rather than
        # silently load a model other than the one the weights describe
        head, embed = state.pop("lm_head.weight"), state.get("embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not torch.equal(head, embed):
            raise ValueError(
                f"{config_file}: tie_word_embeddings=true, but the weights hold an lm_head.weight that differs "
                "from the embeddings; set tie_word_embeddings to false to load the head as it is"
            )
    with torch.device("meta"):  # built in its dtype: a float64 checkpoint keeps its digits, a bf16 one
        model = build_model(cfg).to(dtype)  # never passes through float32's twice the memory
    model.to_empty(device="cpu")
    model.init_weights()  # RoPE tables and tying; every parameter is overwritten next
    if layout is not None:
        prepare = layout.prepare or (lambda weights, cfg: weights)
        theirs = prepare(state, cfg)
        state = layout.import_state(theirs, model.state_dict(), cfg)
        if cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        unused = set(theirs) - set(prepare(layout.export_state(state, cfg), cfg))
        if unused:
            raise ValueError(f"{directory}: weights do not match the config: unexpected {sorted(unused)[:5]}")
    wanted = {k: v.shape for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = wanted.keys() - state.keys(), state.keys() - wanted.keys()
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name, shape in wanted.items():
        if state[name].shape != shape:
            raise ValueError(
                f"{config_file}: {name} has shape {list(state[name].shape)} in the weights, but config.json "
                f"makes it {list(shape)}; check {_fields_shaping(name)}"
            )
    family = family_of_model_type(hf["model_type"])
    if family is not None and family.fix_weights is not None:
        family.fix_weights(hf, state, cfg)
    if layout is not None and layout.fold is not None:
        layout.fold(hf, state, cfg)
    model.load_state_dict(state, strict=False)
    return model


def _split_fused_projections(state: dict[str, torch.Tensor], cfg: ModelConfig, config_file: Path) -> None:
    """Phi-3's fused projections split into ours, as transformers splits them: ``qkv_proj``'s rows are the
    queries', then the keys', then the values'; ``gate_up_proj``'s the gate's, then the up projection's."""
    for i, m in enumerate(cfg.layer_mixers):
        qkv = state.pop(f"layers.{i}.mixer.qkv_proj.weight", None)
        if qkv is not None:
            q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
            if qkv.shape[0] != q + 2 * kv:
                raise ValueError(
                    f"{config_file}: layer {i}'s qkv_proj has {qkv.shape[0]} rows, but config.json makes it "
                    f"{q + 2 * kv}; check num_attention_heads, num_key_value_heads, head_dim"
                )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.split([q, kv, kv]), strict=True):
                state[f"layers.{i}.mixer.{name}.weight"] = part
        gate_up = state.pop(f"layers.{i}.mlp.gate_up_proj.weight", None)
        if gate_up is not None:
            state[f"layers.{i}.mlp.gate_proj.weight"], state[f"layers.{i}.mlp.up_proj.weight"] = gate_up.chunk(2)


def _fields_shaping(name: str) -> str:
    """The config.json fields that decide the shape of the weight ``name`` (kvlab's naming)."""
    for fragment, fields in (
        ("embed_tokens", "vocab_size, hidden_size"),
        ("lm_head", "vocab_size, hidden_size"),
        ("q_proj", "num_attention_heads, head_dim, hidden_size"),
        ("k_proj", "num_key_value_heads, head_dim, hidden_size"),
        ("v_proj", "num_key_value_heads, head_dim, hidden_size"),
        ("o_proj", "num_attention_heads, head_dim, hidden_size"),
        ("mlp", "intermediate_size, hidden_size"),
        ("q_norm", "head_dim"),  # Qwen3's, over each head
        ("k_norm", "head_dim"),
        ("norm", "hidden_size"),
    ):
        if fragment in name:
            return fields
    return "the head counts, head dims and latent ranks (kv_lora_rank, q_lora_rank, qk_rope_head_dim)"
