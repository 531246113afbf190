"""ModelConfig: the whole model as data, validated when built.

A model is a per-layer list of mixer specs plus the MLP and norm choice.
Three ways to give the mixers:

- ``mixer: {kind: attention, ...}``: every layer the same;
- ``pattern: "RRA"`` with ``mixers: {R: {...}, A: {...}}``: the pattern is
  tiled (and cut) to ``n_layers``;
- cross-layer KV sharing on top of either, as a per-layer source index
  ``kv_source: [0, 0, 2, 2]`` (layer i attends to the K/V of layer
  ``kv_source[i]``, earlier or later), or a preset that expands into one:
  ``kv_sharing: {kind: cla, every: 2}``;
- attention-weight sharing on top of any of them (Shared Attention): a
  per-layer ``attention_source: [0, 1, 2, 2, 2, 5]`` (layer i applies the
  softmax probabilities of layer ``attention_source[i]``, an earlier one, to
  its own values);
- or the plan written out: ``layers: [{mixer: {...}, kv_from: j, attention_from: j, repeat: n}]``.

``context: {...}`` gives the decoder a context encoder that some layers cross-attend to (CEPE, XC-Cache;
``ContextConfig``): those layers' plans read ``Read("encoder", ...)``.

``blocks: {length, prefix, token_layers}`` makes the model a Block
Transformer (``kvlab.archs.block_transformer``): the plan is then its block
decoder, and ``mixer`` also builds its token decoder.

All of them expand, here and only here, into ``plan``: one frozen
``LayerPlan`` per layer (``kvlab.archs.plan``) that the decoder runs.

Every error names the field, the value and what would be valid.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlab._config import (
    RENAMED_PRESETS,
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_keys,
    check_types,
    config_dir,
    field_names,
    from_dict,
    load_yaml,
    to_dict,
)
from kvlab.archs.plan import LayerPlan, PassesConfig, PlanError, Read, check_plan
from kvlab.kernels.registry import parse_mode
from kvlab.layers import MixerConfig, MLPConfig, NormConfig, mixer_config

KV_SHARING_KINDS = ("cla", "yoco", "lckv", "grid")
GRID_PARTITIONS = ("pizza", "sandwich", "lasagna")
GRID_TARGETS = ("bottom", "middle", "top")
LAYER_SPEC_KEYS = ("mixer", "mlp", "kv_from", "attention_from", "repeat")


@dataclass
class KVSharingConfig:
    """A preset for ``kv_source``.

    - ``cla``: each group of ``every`` consecutive layers reads the K/V of
      its first layer (Brandon et al. 2024; CLA-2 is every=2).
    - ``yoco`` (Sun et al. 2024, "You Only Cache Once"): the lower half of
      the layers (the self-decoder; give them constant-cache mixers, such as
      sliding windows or gated retention) keep their own state; layer n_layers/2 computes one
      global K/V from the self-decoder's output and every layer above (the
      cross-decoder) attends to it with its own queries. ``every`` is unused.
    - ``lckv`` (Wu & Tu 2024, "Layer-Condensed KV Cache"): the bottom
      ``warmup`` layers and the top ``top_warmup`` layers keep their own
      K/V; the highest layer below those top ones is the target, and every
      layer between attends to its K/V of the tokens before its own (never
      its own token's, which does not exist yet when it runs). The
      published code's layout is ``warmup: 1, top_warmup: 1``. The model's
      ``passes`` (m and b) run the training and the prefill.
    - ``grid`` (Wu et al. 2024, "A Systematic Study of Cross-Layer KV
      Sharing"): ``n_kv_layers`` layers keep K/V. ``partition`` places them:
      ``pizza`` keeps n_kv_layers - 1 at the bottom and the remaining layers
      form one group; ``sandwich`` splits those n_kv_layers - 1 between the
      bottom (the larger half) and the top, with one group between;
      ``lasagna`` cuts all layers into n_kv_layers consecutive groups (the
      lower ones one layer larger when they do not divide). In each group
      one layer, the ``target`` (its ``bottom``, ``middle``: the group's
      layer size // 2, or ``top``), keeps K/V and the others attend to it;
      layers below their target read a later layer (diagonal masked, LCKV's
      parallel passes). pizza-bottom is YOCO's layout, lasagna-bottom CLA's,
      sandwich-top LCKV's.

    ``iterations`` and ``grad_iterations`` are the earlier names of the
    passes of ``lckv`` (all passes; the last with gradients): still read,
    as ``passes: {no_grad: iterations - grad_iterations, grad: grad_iterations}``.
    """

    kind: str = "cla"
    every: int = 2
    warmup: int = 2
    top_warmup: int = 0
    partition: str | None = None
    target: str | None = None
    n_kv_layers: int | None = None
    iterations: int | None = None
    grad_iterations: int | None = None

    def validate(self, path: str) -> None:
        check_choice(self.kind, f"{path}.kind", KV_SHARING_KINDS)
        check_int(self.every, f"{path}.every", minimum=1)
        check_int(self.warmup, f"{path}.warmup", minimum=0)
        check_int(self.top_warmup, f"{path}.top_warmup", minimum=0)
        check_int(self.iterations, f"{path}.iterations", minimum=1, optional=True)
        check_int(self.grad_iterations, f"{path}.grad_iterations", minimum=1, optional=True)
        if self.kind == "grid":
            for name, value, valid in (("partition", self.partition, GRID_PARTITIONS),
                                       ("target", self.target, GRID_TARGETS)):  # fmt: skip
                if value is None:
                    raise ValueError(f"{path}.{name} is missing: kind=grid needs one of {', '.join(valid)}")
                check_choice(value, f"{path}.{name}", valid)
            check_int(self.n_kv_layers, f"{path}.n_kv_layers", minimum=1)
        else:
            for name in ("partition", "target", "n_kv_layers"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{path}.{name} is set but only kind=grid uses it (kind={self.kind})")

    def legacy_passes(self) -> PassesConfig | None:
        """The passes the earlier ``iterations``/``grad_iterations`` describe, or None when neither is set."""
        if self.iterations is None and self.grad_iterations is None:
            return None
        total = 7 if self.iterations is None else self.iterations
        grad = min(2 if self.grad_iterations is None else self.grad_iterations, total)
        return PassesConfig(no_grad=total - grad, grad=grad)

    def kv_source(self, n_layers: int, path: str = "kv_sharing") -> list[int]:
        if self.kind == "lckv":
            target = n_layers - 1 - self.top_warmup  # below warmup: too few layers to share, each keeps its own
            return [i if i < self.warmup or i > target else target for i in range(n_layers)]
        if self.kind == "yoco":
            half = n_layers // 2
            return [min(i, half) for i in range(n_layers)]
        if self.kind == "grid":
            return self._grid(n_layers, path)
        return [i - i % self.every for i in range(n_layers)]

    def _grid(self, n_layers: int, path: str) -> list[int]:
        n_kv = self.n_kv_layers
        if n_kv > n_layers:
            raise ValueError(f"{path}.n_kv_layers={n_kv} exceeds n_layers={n_layers}")
        if self.partition == "lasagna":
            size, extra = divmod(n_layers, n_kv)
            sizes = [size + (g < extra) for g in range(n_kv)]
            bottom, top = 0, 0
        else:
            rest = n_kv - 1  # KV layers outside the one group
            if self.partition == "sandwich" and rest < 2:
                raise ValueError(
                    f"{path}.n_kv_layers={n_kv}: a sandwich keeps K/V at the bottom, the top and one target: at least 3"
                )
            top = rest // 2 if self.partition == "sandwich" else 0
            bottom = rest - top
            sizes = [n_layers - rest]
        sources = list(range(n_layers))
        first = bottom
        for size in sizes:
            offset = {"bottom": 0, "middle": size // 2, "top": size - 1}[self.target]
            for i in range(first, first + size):
                sources[i] = first + offset
            first += size
        return sources


@dataclass
class BlocksConfig:
    """The Block Transformer's shape (Ho et al. 2024; ``kvlab.archs.block_transformer``): ``length`` tokens per
    block (the paper's L_B), ``prefix`` positions of the token decoder's input made from the block decoder's
    output (the prefix strategy's expansion ratio), ``token_layers`` layers of the token decoder."""

    length: int = 4
    prefix: int = 2
    token_layers: int = 3

    def validate(self, d_model: int, path: str) -> None:
        check_int(self.length, f"{path}.length", minimum=1)
        check_int(self.prefix, f"{path}.prefix", minimum=1)
        check_int(self.token_layers, f"{path}.token_layers", minimum=1)
        if d_model % self.length:
            raise ValueError(
                f"{path}.length={self.length} must divide d_model={d_model}: the embedder concatenates the "
                f"block's {self.length} token embeddings of d_model / length channels each"
            )


CONTEXT_ENCODERS = ("separate", "decoder")
CROSS_FORMS = ("sublayer", "block")


@dataclass
class ContextConfig:
    """A context encoder and the cross-attention that reads it (``kvlab.layers.cross_attention``, built by
    ``CausalLM``).

    A context (token ids given beside the input) is encoded once, in independent ``chunk``-token chunks
    (None: whole), and the layers in ``cross_layers`` (None: every layer) cross-attend to the encoder's output,
    which is all a cache keeps of the context.

    - ``encoder: separate``: a small bidirectional encoder of its own (``encoder_layers`` x ``encoder_d_model``
      with ``encoder_heads`` heads and a SwiGLU of ``encoder_hidden``): CEPE, and XC-Cache's XC-LlamaEnc;
    - ``encoder: decoder``: the decoder itself, frozen (no gradient reaches it through the context): its final
      normalised hidden states over the context, XC-Cache's XC-Llama.
    - ``cross: sublayer`` (CEPE): in each cross layer, a norm and a cross-attention between the mixer and the
      MLP, with a residual; ``cross: block`` (XC-Llama): before each cross layer, a block of its own: a norm
      and a cross-attention, then a norm and a SwiGLU of 4 x d_model, each with a residual.
    - ``cross_rope``: queries turn at their decoder positions and keys at the context's (XC-Llama); CEPE's
      cross-attention has no positions. ``shared_cross``: one cross block for every cross layer (XC-Llama's
      default). ``cross_heads`` heads of d_model / cross_heads (as many K/V heads).
    - ``max_len``: the longest context a forward takes, and what a cache holds unless ``new_cache`` is told
      otherwise.
    """

    encoder: str = "separate"
    encoder_layers: int | None = None  # separate: 2
    encoder_d_model: int | None = None  # separate: the decoder's d_model
    encoder_heads: int | None = None  # separate: 4
    encoder_hidden: int | None = None  # separate: 8/3 encoder_d_model rounded up to 64
    chunk: int | None = None
    cross_layers: list[int] | None = None
    cross: str = "sublayer"
    cross_rope: bool = False
    shared_cross: bool = False
    cross_heads: int = 8
    max_len: int = 1024

    def validate(self, d_model: int, n_layers: int, max_seq_len: int, path: str) -> None:
        check_choice(self.encoder, f"{path}.encoder", CONTEXT_ENCODERS)
        check_choice(self.cross, f"{path}.cross", CROSS_FORMS)
        check_bool(self.cross_rope, f"{path}.cross_rope")
        check_bool(self.shared_cross, f"{path}.shared_cross")
        check_int(self.chunk, f"{path}.chunk", minimum=1, optional=True)
        check_int(self.max_len, f"{path}.max_len", minimum=1)
        check_int(self.cross_heads, f"{path}.cross_heads", minimum=1)
        if d_model % self.cross_heads:
            raise ValueError(f"{path}.cross_heads={self.cross_heads} must divide d_model={d_model}")
        if self.encoder == "decoder" and self.chunk is not None and self.chunk > max_seq_len:
            raise ValueError(f"{path}.chunk={self.chunk}: the decoder encodes that many tokens at once, more than "
                             f"its max_seq_len={max_seq_len}")  # fmt: skip
        if self.shared_cross and self.cross != "block":
            raise ValueError(f"{path}.shared_cross=true shares a cross block; it needs {path}.cross=block")
        encoder_fields = ("encoder_layers", "encoder_d_model", "encoder_heads", "encoder_hidden")
        if self.encoder == "decoder":
            for name in encoder_fields:
                if getattr(self, name) is not None:
                    raise ValueError(f"{path}.{name} is set but {path}.encoder=decoder encodes with the decoder")
        else:
            for name in encoder_fields:
                check_int(getattr(self, name), f"{path}.{name}", minimum=1, optional=True)
            self.encoder_layers = 2 if self.encoder_layers is None else self.encoder_layers
            self.encoder_d_model = d_model if self.encoder_d_model is None else self.encoder_d_model
            self.encoder_heads = 4 if self.encoder_heads is None else self.encoder_heads
            if self.encoder_d_model % self.encoder_heads or (self.encoder_d_model // self.encoder_heads) % 2:
                raise ValueError(
                    f"{path}.encoder_heads={self.encoder_heads} must divide encoder_d_model={self.encoder_d_model} "
                    f"into heads of an even width (RoPE turns pairs of channels)"
                )
            if self.encoder_hidden is None:
                self.encoder_hidden = -(-(8 * self.encoder_d_model // 3) // 64) * 64
        if self.cross_rope and (d_model // self.cross_heads) % 2:
            raise ValueError(f"{path}.cross_rope needs an even head width; d_model / cross_heads is odd")
        if self.cross_layers is None:
            self.cross_layers = list(range(n_layers))
        if not isinstance(self.cross_layers, (list, tuple)) or not self.cross_layers:
            raise ValueError(f"{path}.cross_layers={self.cross_layers!r} must list decoder layers (or be null: all)")
        for i, layer in enumerate(self.cross_layers):
            check_int(layer, f"{path}.cross_layers[{i}]", minimum=0)
            if layer >= n_layers:
                raise ValueError(f"{path}.cross_layers[{i}]={layer}: there is no layer {layer} (0..{n_layers - 1})")
        if len(set(self.cross_layers)) != len(self.cross_layers):
            raise ValueError(f"{path}.cross_layers={list(self.cross_layers)} names a layer twice")
        self.cross_layers = sorted(self.cross_layers)


# The field of each mixer kind that sets the width of what it caches (per token, or its state), its step, and the
# fields that follow it (equal to it: stay equal; else scaled alike): ModelConfig.with_cache scales them
# (iso_cache).
CACHE_WIDTHS = {
    "attention": ("head_dim", 2, ("rope_dims", "v_head_dim")),
    "retention": ("head_dim", 2, ("v_head_dim",)),
    "mla": ("kv_lora_rank", 1, ()),
    "mamba2": ("state_dim", 1, ()),
    "mamba": ("state_dim", 1, ()),  # Mamba-1: every channel's state (Samba, Jamba, Hymba, RecurFormer)
    "conba": ("state_dim", 1, ()),  # MixCon's Conba: Mamba-1's state
}


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    max_seq_len: int = 2048
    norm: NormConfig = field(default_factory=NormConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    # Per-layer MLPs, as pattern/mixers do for mixers (Jamba's MoE every other layer): each layer's MLP is
    # mlps[mlp_pattern[i % len]]; None: every layer's is mlp. In layers:, a spec's mlp does the same.
    mlp_pattern: str | None = None
    mlps: dict[str, MLPConfig] | None = None
    tie_embeddings: bool = False
    # GPT-NeoX's (and GPT-J's) block: x + mixer(mixer_norm(x)) + mlp(mlp_norm(x)), the MLP beside the mixer
    # rather than after it (false: x' = x + mixer(mixer_norm(x)), then x' + mlp(mlp_norm(x')))
    parallel_residual: bool = False
    # Gemma's: an RMSNorm on the mixer's and on the MLP's output before each residual add (with the norms before
    # them: "sandwich" norms), and the embeddings scaled by embed_scale (Gemma: sqrt(d_model); None: 1)
    post_norms: bool = False
    embed_scale: float | None = None
    pre_norms: bool = True  # false: no norm before the mixer or the MLP, only post_norms after them (OLMo 2)
    # Where each layer's norms go, as a pattern tiled to n_layers: P before each sublayer (Llama's), O on each
    # sublayer's output alone (OLMo 2's); None: pre_norms and post_norms in every layer. OLMo Hybrid's: its gated
    # DeltaNet layers P, its attention layers O.
    norm_pattern: str | None = None
    # Granite's multipliers: each sublayer's output times residual_scale before its residual add, the logits
    # times logit_scale (Granite: 1 / logits_scaling); None: 1
    residual_scale: float | None = None
    logit_scale: float | None = None
    # MiniMax-01's block: each sublayer's residual is its normalised input, times residual_alpha (None: 1):
    # x' = alpha * norm(x) + residual_scale * f(norm(x)) (its "postnorm"; alpha = (2 n_layers)^(1/4), DeepNet's)
    normed_residual: bool = False
    residual_alpha: float | None = None
    # the logits z become logit_softcap * tanh(z / logit_softcap) (Gemma 2's final_logit_softcapping); None: as they are
    logit_softcap: float | None = None
    mixer: MixerConfig | None = None
    pattern: str | None = None
    mixers: dict[str, MixerConfig] | None = None
    kv_source: list[int] | None = None
    kv_sharing: KVSharingConfig | None = None
    # Shared Attention: per layer, the layer whose attention probabilities it applies to its own values
    attention_source: list[int] | None = None
    # The plan written out: [{mixer, kv_from, attention_from, repeat}, ...], instead of mixer/pattern/kv_source
    layers: list[dict[str, Any]] | None = None
    passes: PassesConfig | None = None  # layers that read later layers: m, b, prefill (None: the defaults)
    blocks: BlocksConfig | None = None  # a Block Transformer: the plan is its block decoder (None: a plain decoder)
    context: ContextConfig | None = None  # a context encoder that cross layers read (CEPE, XC-Cache)
    # Hymba's meta tokens: this many learned vectors before every sequence's first token, through every layer
    # (their K/V and states cached once per sequence, before the prompt); 0: none
    meta_tokens: int = 0
    init_std: float = 0.02
    # Kernel backends: auto | reference | torch | triton | external, or "mode,op=backend,..." (kvlab.kernels.registry)
    kernels: str = "auto"

    # Derived: one frozen LayerPlan per layer (kvlab.archs.plan), and the passes in force.
    plan: tuple[LayerPlan, ...] = field(init=False, repr=False, compare=False)
    layer_passes: PassesConfig = field(init=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Read the YAML/Hydra shape of ``configs/model/*.yaml``; unknown keys are errors."""
        if isinstance(d, ModelConfig):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"model config: expected a mapping, got {d!r}")
        check_keys(d, field_names(cls), "")
        return cls(**dict(d))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset that ships with kvlab (``configs/model/NAME.yaml``: ``"gqa"``, ``"mla"``,
        ``"reference/llama3_8b"``, as ``model=NAME`` names it), wherever kvlab is installed, its top-level settings
        replaced by ``overrides`` (``n_layers=12``, ``mixer={...}``, ``vocab_size=32000``)."""
        presets = config_dir() / "model"
        path = presets / f"{name}.yaml"
        if isinstance(name, str) and name in RENAMED_PRESETS:
            new, why = RENAMED_PRESETS[name]
            raise ValueError(f"preset {name!r} was renamed {new!r} {why}")
        if not isinstance(name, str) or not path.is_file():
            known = sorted(str(p.relative_to(presets).with_suffix("")) for p in presets.rglob("*.yaml"))
            raise ValueError(f"preset {name!r} is not one of kvlab's model presets: {', '.join(known)}")
        try:
            return cls.from_dict({**load_yaml(path), **overrides})
        except ValueError as e:
            raise ValueError(f"preset {name!r}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ModelConfig:
        """Read a model YAML such as ``configs/model/gqa.yaml``; errors name the file (and line)."""
        d = load_yaml(path)
        if d is None:
            raise ValueError(f"{path}: expected a mapping of model settings, got nothing (the file is empty)")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def with_params(self, target: int) -> ModelConfig:
        """This config with the MLP's hidden width set so the model has about ``target`` parameters
        (the nearest multiple of 8; ablations at equal parameter counts)."""
        from kvlab.archs.model import build_model  # the count comes from the built (meta) model

        def params(config: ModelConfig) -> int:
            with torch.device("meta"):
                return build_model(config).num_parameters()

        return self.with_mlp_hidden_for(target, params, f"iso_params={target}")

    def with_cache(self, target: float, context: int, dtype: torch.dtype = torch.bfloat16) -> ModelConfig:
        """This config with every mixer's cache width (``CACHE_WIDTHS``: attention's and retention's head_dim,
        MLA's kv_lora_rank, Mamba-2's and Mamba's state_dim) scaled by one common factor so that one sequence's
        cache after ``context`` tokens holds about ``target`` bytes per token (ablations at equal cache: the cache of
        a layer that reads another layer's is none, so cross-layer sharing keeps its saving). Each width keeps
        its step (head_dim even, for RoPE's pairs) and is at least one step."""
        from kvlab.archs.model import build_model  # the footprint comes from the built (meta) model
        from kvlab.layers.base import MIXERS

        setting = f"iso_cache={target}"
        if not target > 0 or context < 1:
            raise ValueError(f"{setting} at iso_cache_context={context}: both must be > 0")
        base = self.to_dict()
        widths = []  # (mapping, field, width, step, {follower: width}) of every mixer spec, parallel branches too

        def find(node, path: str) -> None:
            if isinstance(node, dict):
                kind = node.get("kind")
                if kind == "parallel" and node.get("shared_output") and node.get("combine", "mean") == "mean":
                    raise ValueError(f"{setting}: {path} is a parallel layer whose branches are averaged before one "
                                     "shared output projection (Hymba's), which ties their widths; kvlab does not "
                                     "scale it")  # fmt: skip
                if isinstance(kind, str) and kind in MIXERS and kind != "parallel":
                    if kind not in CACHE_WIDTHS:
                        raise ValueError(f"{setting}: {path} is a {kind} mixer, whose cache kvlab does not scale "
                                         f"(it scales {', '.join(sorted(CACHE_WIDTHS))})")  # fmt: skip
                    name, step, tied = CACHE_WIDTHS[kind]
                    resolved = mixer_config(node, path)
                    resolved.validate(self.d_model, path)  # fills the defaults (head_dim: d_model / n_heads)
                    followers = {f: getattr(resolved, f) for f in tied if getattr(resolved, f, None) is not None}
                    widths.append((node, name, getattr(resolved, name), step, followers))
                    return
                for key, value in node.items():
                    find(value, f"{path}.{key}" if path else key)
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    find(value, f"{path}[{i}]")

        find(base, "")

        def scaled(factor: float) -> ModelConfig:
            for node, name, width, step, followers in widths:
                node[name] = max(step, step * round(width * factor / step))
                for f, value in followers.items():  # equal: stays equal; narrower (partial RoPE): never wider
                    alike = max(step, step * round(value * factor / step))
                    node[f] = node[name] if value == width else min(node[name], alike) if value < width else alike
            return ModelConfig.from_dict(copy.deepcopy(base))

        def per_token(config: ModelConfig) -> float:
            with torch.device("meta"):
                return build_model(config).kv_footprint(dtype).total_bytes(context) / context

        now = per_token(scaled(1.0))
        if not widths or now == per_token(scaled(4.0)):
            raise ValueError(f"{setting}: no mixer of this model has a cache width to scale")
        low, high = 1 / 1024, 1024.0  # bisect the factor in log space: the bytes never fall as it grows
        best = (abs(now - target), 1.0)
        for _ in range(40):
            mid = math.sqrt(low * high)
            held = per_token(scaled(mid))
            best = min(best, (abs(held - target), mid))
            low, high = (mid, high) if held < target else (low, mid)
        return scaled(best[1])

    def with_mlp_hidden_for(self, target: float, measure, setting: str) -> ModelConfig:
        """This config with the MLP's hidden width set (a multiple of 8) so that ``measure(config)``, a quantity
        linear in that width (parameters, FLOPs per token), is about ``target``; ``setting`` names the request
        in errors."""
        if self.mlp.kind == "none":
            raise ValueError(f"{setting}: mlp.kind=none has no width to change")
        if self.mlp_pattern is not None or any(p.mlp is not self.mlp for p in self.plan):
            raise ValueError(f"{setting}: the layers' MLPs differ (mlp_pattern or layers[].mlp); only "
                             f"one shared mlp has a width to change")  # fmt: skip
        d = self.to_dict()

        def at(hidden: int) -> float:
            return measure(ModelConfig.from_dict(d | {"mlp": d["mlp"] | {"hidden": hidden}}))

        base = at(8)
        per_unit = at(16) - base  # per 8 hidden units, over all layers
        hidden = max(8, 8 + 8 * round((target - base) / per_unit))
        return ModelConfig.from_dict(d | {"mlp": d["mlp"] | {"hidden": hidden}})

    @property
    def context_width(self) -> int:
        """The width of the context encoder's states, which is what a cache keeps per context token."""
        return self.context.encoder_d_model or self.d_model

    @property
    def positions(self) -> int:
        """Positions a sequence can take: ``max_seq_len`` tokens after the meta tokens."""
        return self.max_seq_len + self.meta_tokens

    @property
    def layer_mixers(self) -> list[MixerConfig]:
        """Each layer's resolved mixer config."""
        return [p.mixer for p in self.plan]

    @property
    def layer_mixers_and_branches(self) -> list[MixerConfig]:
        """Each layer's resolved mixer config, a parallel layer's followed by its branches'."""
        return [c for m in self.layer_mixers for c in (m, *(m.mixers if m.kind == "parallel" else ()))]

    @property
    def mixer_kinds(self) -> list[str]:
        """Every mixer kind the layers run, sorted: a parallel layer's and its branches'."""
        return sorted({m.kind for m in self.layer_mixers_and_branches})

    @property
    def layer_kv_source(self) -> list[int]:
        """Each layer's keys/values source: the layer itself unless it reads another's."""
        return [p.kv_source for p in self.plan]

    def norm_placement(self, layer: int) -> tuple[bool, bool]:
        """Layer ``layer``'s (norms before its sublayers, norms on their outputs): ``norm_pattern``'s letter there, or
        ``pre_norms`` and ``post_norms``."""
        if self.norm_pattern is None:
            return self.pre_norms, self.post_norms
        letter = self.norm_pattern[layer % len(self.norm_pattern)]
        return letter == "P", letter == "O"

    def describe_plan(self) -> str:
        """The plan, one line per layer: ``3: attention <- kv of 5``."""
        return "\n".join(p.describe() for p in self.plan)

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in field_names(type(self))}
        check_types(type(self), given)
        check_finite(given)
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            check_int(getattr(self, name), name, minimum=1)
        check_bool(self.tie_embeddings, "tie_embeddings")
        check_bool(self.parallel_residual, "parallel_residual")
        check_bool(self.post_norms, "post_norms")
        check_bool(self.pre_norms, "pre_norms")
        for name in ("embed_scale", "residual_scale", "logit_scale", "logit_softcap", "residual_alpha"):
            if getattr(self, name) is not None:
                check_float(getattr(self, name), name, positive=True)
        if self.norm_pattern is not None:
            if not isinstance(self.norm_pattern, str) or not self.norm_pattern or set(self.norm_pattern) - set("PO"):
                raise ValueError(f"norm_pattern={self.norm_pattern!r} must be a non-empty string of P (norms before "
                                 "each sublayer) and O (norms on each sublayer's output alone)")  # fmt: skip
            if not self.pre_norms or self.post_norms:
                raise ValueError(f"norm_pattern={self.norm_pattern!r} places every layer's norms: leave pre_norms "
                                 f"true and post_norms false (got {self.pre_norms}, {self.post_norms})")  # fmt: skip
        check_bool(self.normed_residual, "normed_residual")
        if self.residual_alpha is not None and not self.normed_residual:
            raise ValueError(f"residual_alpha={self.residual_alpha} scales the normalised residual: it needs "
                             "normed_residual: true (MiniMax-01's block)")  # fmt: skip
        if self.normed_residual and (self.parallel_residual or not self.pre_norms or "O" in (self.norm_pattern or "")):
            raise ValueError(f"normed_residual=true takes the residual after the norm before each sublayer: it needs "
                             f"pre_norms: true, no O in norm_pattern and parallel_residual: false (got pre_norms="
                             f"{self.pre_norms}, norm_pattern={self.norm_pattern}, parallel_residual="
                             f"{self.parallel_residual})")  # fmt: skip
        check_int(self.meta_tokens, "meta_tokens", minimum=0)
        for name in ("blocks", "context"):
            if self.meta_tokens and getattr(self, name) is not None:
                raise ValueError(f"meta_tokens={self.meta_tokens} cannot be combined with {name} (meta tokens go "
                                 "before a plain decoder's tokens)")  # fmt: skip
        check_float(self.init_std, "init_std", positive=True)
        if not isinstance(self.kernels, str):
            raise ValueError(f"kernels={self.kernels!r}: expected a string such as 'auto' or 'triton,attention=torch'")
        parse_mode(self.kernels, source="kernels")
        self.norm = from_dict(NormConfig, self.norm, "norm")
        self.norm.validate("norm")
        self.mlp = from_dict(MLPConfig, self.mlp, "mlp")
        self.mlp.validate(self.d_model, "mlp")
        if self.passes is not None:
            self.passes = from_dict(PassesConfig, self.passes, "passes")
            self.passes.validate("passes")
        if self.context is not None:
            self.context = from_dict(ContextConfig, self.context, "context")
            self.context.validate(self.d_model, self.n_layers, self.max_seq_len, "context")
        mlps = self._resolve_mlps()
        if self.layers is not None:
            mixers, sources, attention, mlps = self._layer_specs(mlps)
        else:
            mixers, sources = self._resolve_mixers(), self._resolve_kv_source()
            attention = self._resolve_attention_source()
        encoder = self._encoder_reads()
        self.plan = tuple(
            LayerPlan(i, m, mlps[i], self.norm, self._reads(i, m, sources[i], attention[i]) + encoder.get(i, ()))
            for i, m in enumerate(mixers)
        )
        try:
            check_plan(self.plan, self.max_seq_len)
        except PlanError as e:  # name the field the user wrote, where one layer's K/V or weights read came from
            if e.read is None or e.read.what not in ("kv", "attention"):
                raise
            if self.layers is not None:
                field = f"layers (layer {e.layer})"
            elif e.read.what == "attention":
                field = f"attention_source[{e.layer}]={e.read.layer}"
            else:
                field = f"kv_source[{e.layer}]={e.read.layer}" if self.kv_source is not None else "kv_sharing"
            raise ValueError(f"{field}: {e}") from None
        self.layer_passes = self._resolve_passes()
        if self.parallel_residual:
            bare = [p.index for p in self.plan if p.mlp.kind == "none"]
            if bare:
                raise ValueError(f"parallel_residual=true, but layers {bare} have no MLP (mlp kind none) to run "
                                 "beside their mixer")  # fmt: skip
            if self.context is not None and self.context.cross == "sublayer":
                raise ValueError(
                    "parallel_residual=true with context.cross=sublayer: CEPE's cross-attention sublayer "
                    "goes between the mixer and the MLP, which a parallel block runs side by side"
                )
        if self.normed_residual and self.context is not None and self.context.cross == "sublayer":
            raise ValueError("normed_residual=true with context.cross=sublayer: CEPE's cross-attention sublayer "
                             "keeps a plain residual; MiniMax-01's block has none to give it")  # fmt: skip
        if self.blocks is not None:
            if self.context is not None:
                raise ValueError("context and blocks are both set: a Block Transformer has no cross-attention")
            self.blocks = from_dict(BlocksConfig, self.blocks, "blocks")
            self.blocks.validate(self.d_model, "blocks")
            if not isinstance(self.mixer, MixerConfig):
                raise ValueError("blocks: a Block Transformer's token decoder is built from mixer; give mixer "
                                 "(not pattern/mixers or layers)")  # fmt: skip
            self.token_decoder_config()  # checked now, not when the model is built

    def token_decoder_config(self) -> ModelConfig:
        """A Block Transformer's token decoder: ``blocks.token_layers`` layers of ``mixer`` (no window: its
        context is one block), over the ``prefix + length - 1`` positions of a block's input."""
        b = self.blocks
        mixer = {**to_dict(self.mixer), "kind": self.mixer.kind}
        if "window" in mixer:
            mixer["window"] = None
        try:
            return ModelConfig(
                vocab_size=self.vocab_size, d_model=self.d_model, n_layers=b.token_layers,
                max_seq_len=b.prefix + b.length - 1, norm=to_dict(self.norm), mlp=to_dict(self.mlp), mixer=mixer,
                kernels=self.kernels, init_std=self.init_std, parallel_residual=self.parallel_residual,
                post_norms=self.post_norms, embed_scale=self.embed_scale, pre_norms=self.pre_norms,
                residual_scale=self.residual_scale, logit_scale=self.logit_scale, logit_softcap=self.logit_softcap,
                normed_residual=self.normed_residual, residual_alpha=self.residual_alpha,
                norm_pattern=self.norm_pattern,
            )  # fmt: skip
        except ValueError as e:
            raise ValueError(f"blocks: the token decoder: {e}") from None

    @staticmethod
    def _reads(i: int, mixer: MixerConfig, kv_source: int, attention_source: int) -> tuple[Read, ...]:
        kv = (Read("kv", kv_source),) if kv_source != i else ()
        weights = (Read("attention", attention_source),) if attention_source != i else ()
        return kv + weights + tuple(Read(what, j) for what, j in mixer.own_reads(i))

    def _encoder_reads(self) -> dict[int, tuple[Read, ...]]:
        """The cross layers' reads of the context encoder's output (``Read("encoder", e)``, e: the encoder's
        last layer)."""
        c = self.context
        if c is None:
            return {}
        last = (c.encoder_layers if c.encoder == "separate" else self.n_layers) - 1
        return {i: (Read("encoder", last),) for i in c.cross_layers}

    def _resolve_passes(self) -> PassesConfig:
        legacy = self.kv_sharing.legacy_passes() if self.kv_sharing is not None else None
        if legacy is not None and self.passes is not None:
            raise ValueError("kv_sharing.iterations/grad_iterations and passes are both set; give passes only")
        return legacy or self.passes or PassesConfig()

    def _resolve_mixers(self) -> list[MixerConfig]:
        if self.pattern is None and self.mixers is None:
            if self.mixer is None:
                self.mixer = {"kind": "attention"}
            self.mixer = mixer_config(self.mixer, "mixer").resolved(self.d_model, "mixer")
            return [self.mixer] * self.n_layers
        if self.mixer is not None:
            raise ValueError("mixer and pattern/mixers are both set; give either mixer or pattern with mixers")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern={self.pattern!r} must be a non-empty string of names from mixers")
        if not isinstance(self.mixers, Mapping) or not self.mixers:
            raise ValueError(f"mixers={self.mixers!r} must map each name in pattern={self.pattern!r} to a mixer spec")
        self.mixers = {
            name: mixer_config(spec, f"mixers.{name}").resolved(self.d_model, f"mixers.{name}")
            for name, spec in self.mixers.items()
        }
        for ch in self.pattern:
            if ch not in self.mixers:
                raise ValueError(
                    f"pattern={self.pattern!r} uses {ch!r}, which is not in mixers ({', '.join(self.mixers)})"
                )
        return [self.mixers[self.pattern[i % len(self.pattern)]] for i in range(self.n_layers)]

    def _resolve_mlps(self) -> list[MLPConfig]:
        """Each layer's MLP: ``mlp``, or ``mlps`` by ``mlp_pattern``."""
        if self.mlp_pattern is None and self.mlps is None:
            return [self.mlp] * self.n_layers
        if not isinstance(self.mlp_pattern, str) or not self.mlp_pattern:
            raise ValueError(f"mlp_pattern={self.mlp_pattern!r} must be a non-empty string of names from mlps")
        if not isinstance(self.mlps, Mapping) or not self.mlps:
            raise ValueError(f"mlps={self.mlps!r} must map each name in mlp_pattern={self.mlp_pattern!r} to an MLP")
        mlps = {}
        for name, spec in self.mlps.items():
            mlps[name] = from_dict(MLPConfig, spec, f"mlps.{name}")
            mlps[name].validate(self.d_model, f"mlps.{name}")
        self.mlps = mlps
        for ch in self.mlp_pattern:
            if ch not in mlps:
                raise ValueError(
                    f"mlp_pattern={self.mlp_pattern!r} uses {ch!r}, which is not in mlps ({', '.join(mlps)})"
                )
        return [mlps[self.mlp_pattern[i % len(self.mlp_pattern)]] for i in range(self.n_layers)]

    def _layer_specs(self, default_mlps: list[MLPConfig]) -> tuple[list[MixerConfig], list[int], list[int], list]:
        """``layers: [{mixer, mlp, kv_from, attention_from, repeat}, ...]``: the plan written out, repeats
        expanded in order (a spec without an mlp keeps the layer's from mlp / mlp_pattern)."""
        for name in ("mixer", "pattern", "mixers", "kv_source", "kv_sharing", "attention_source"):
            if getattr(self, name) is not None:
                raise ValueError(f"layers and {name} are both set; layers describes every layer, give it alone")
        if not isinstance(self.layers, (list, tuple)) or not self.layers:
            raise ValueError(f"layers={self.layers!r} must list layer specs such as {{mixer: {{kind: attention}}}}")
        mixers, sources, attention, specs, mlps = [], [], [], [], []
        for n, spec in enumerate(self.layers):
            path = f"layers[{n}]"
            if not isinstance(spec, Mapping) or "mixer" not in spec:
                raise ValueError(f"{path}={spec!r} must be a mapping with a mixer (and optionally kv_from, repeat)")
            check_keys(spec, LAYER_SPEC_KEYS, path)
            repeat = spec.get("repeat", 1)
            check_int(repeat, f"{path}.repeat", minimum=1)
            kv_from, attention_from = spec.get("kv_from"), spec.get("attention_from")
            check_int(kv_from, f"{path}.kv_from", minimum=0, optional=True)
            check_int(attention_from, f"{path}.attention_from", minimum=0, optional=True)
            mixer = mixer_config(spec["mixer"], f"{path}.mixer").resolved(self.d_model, f"{path}.mixer")
            mlp = None
            if spec.get("mlp") is not None:
                mlp = from_dict(MLPConfig, spec["mlp"], f"{path}.mlp")
                mlp.validate(self.d_model, f"{path}.mlp")
            for _ in range(repeat):
                sources.append(len(mixers) if kv_from is None else kv_from)
                attention.append(len(mixers) if attention_from is None else attention_from)
                mlps.append(mlp or default_mlps[len(mixers) % len(default_mlps)])
                mixers.append(mixer)
            resolved = {"mixer": to_dict(mixer), "mlp": to_dict(mlp) if mlp is not None else None}
            specs.append({k: resolved.get(k, v) for k, v in spec.items()})
        if len(mixers) != self.n_layers:
            raise ValueError(f"layers describe {len(mixers)} layers (repeats counted) but n_layers={self.n_layers}")
        self.layers = specs
        return mixers, sources, attention, mlps

    def _resolve_attention_source(self) -> list[int]:
        if self.attention_source is None:
            return list(range(self.n_layers))
        sources = list(self.attention_source)
        if len(sources) != self.n_layers:
            raise ValueError(
                f"attention_source has {len(sources)} entries; it needs one per layer (n_layers={self.n_layers})"
            )
        for i, j in enumerate(sources):
            check_int(j, f"attention_source[{i}]", minimum=0)
        self.attention_source = sources
        return sources

    def _resolve_kv_source(self) -> list[int]:
        if self.kv_sharing is not None:
            if self.kv_source is not None:
                raise ValueError("kv_source and kv_sharing are both set; give one of them")
            self.kv_sharing = from_dict(KVSharingConfig, self.kv_sharing, "kv_sharing")
            self.kv_sharing.validate("kv_sharing")
            return self.kv_sharing.kv_source(self.n_layers)
        if self.kv_source is None:
            return list(range(self.n_layers))
        sources = list(self.kv_source)
        if len(sources) != self.n_layers:
            raise ValueError(f"kv_source has {len(sources)} entries; it needs one per layer (n_layers={self.n_layers})")
        for i, j in enumerate(sources):
            check_int(j, f"kv_source[{i}]", minimum=0)
        self.kv_source = sources
        return sources
