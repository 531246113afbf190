"""ModelConfig: the whole model as data, validated when built.

A model is a per-layer list of mixer specs plus the MLP and norm choice.
Three ways to give the mixers:

- ``mixer: {kind: attention, ...}``: every layer the same;
- ``pattern: "RRA"`` with ``mixers: {R: {...}, A: {...}}``: the pattern is
  tiled (and cut) to ``n_layers``;
- cross-layer KV sharing on top of either, as a per-layer source index
  ``kv_source: [0, 0, 2, 2]`` (layer i attends to the K/V of layer
  ``kv_source[i]``), or a preset that expands into one:
  ``kv_sharing: {kind: cla, every: 2}``.

Every error names the field, the value and what would be valid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlab._config import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_keys,
    check_types,
    field_names,
    from_dict,
    load_yaml,
    to_dict,
)
from kvlab.kernels.registry import parse_mode
from kvlab.layers import MixerConfig, MLPConfig, NormConfig, mixer_config

KV_SHARING_KINDS = ("cla", "yoco", "lckv")


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
      ``warmup`` layers and the top layer keep their own K/V; every layer
      between attends to the top layer's K/V of the tokens before its own
      (never its own token's, which does not exist yet when it runs).
      Decoding is sequential and exact; a forward without a cache (training,
      evaluation) runs ``iterations`` parallel passes, each reading the top
      layer's K/V of the pass before (zeros at first), with gradients
      through the last ``grad_iterations`` (the paper's m and b; all of
      them when there are fewer passes). A pass
      settles one more token, so ``iterations`` >= the sequence length is
      exact.
    """

    kind: str = "cla"
    every: int = 2
    warmup: int = 2
    iterations: int = 7
    grad_iterations: int = 2

    def validate(self, path: str) -> None:
        check_choice(self.kind, f"{path}.kind", KV_SHARING_KINDS)
        check_int(self.every, f"{path}.every", minimum=1)
        check_int(self.warmup, f"{path}.warmup", minimum=0)
        check_int(self.iterations, f"{path}.iterations", minimum=1)
        check_int(self.grad_iterations, f"{path}.grad_iterations", minimum=1)

    def kv_source(self, n_layers: int) -> list[int]:
        if self.kind == "lckv":
            return [i if i < self.warmup or i == n_layers - 1 else n_layers - 1 for i in range(n_layers)]
        if self.kind == "yoco":
            half = n_layers // 2
            return [min(i, half) for i in range(n_layers)]
        return [i - i % self.every for i in range(n_layers)]


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    max_seq_len: int = 2048
    norm: NormConfig = field(default_factory=NormConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    tie_embeddings: bool = False
    mixer: MixerConfig | None = None
    pattern: str | None = None
    mixers: dict[str, MixerConfig] | None = None
    kv_source: list[int] | None = None
    kv_sharing: KVSharingConfig | None = None
    init_std: float = 0.02
    # Kernel backends: auto | reference | torch | triton | external, or "mode,op=backend,..." (kvlab.kernels.registry)
    kernels: str = "auto"

    # Derived, one entry per layer: the mixer config and the layer whose K/V it reads.
    layer_mixers: list[MixerConfig] = field(init=False, repr=False)
    layer_kv_source: list[int] = field(init=False, repr=False)

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

        if self.mlp.kind == "none":
            raise ValueError(f"iso_params={target}: mlp.kind=none has no width to change")
        d = self.to_dict()

        def params(hidden: int) -> int:
            with torch.device("meta"):
                return build_model(d | {"mlp": d["mlp"] | {"hidden": hidden}}).num_parameters()

        per_unit = params(16) - params(8)  # parameters per 8 hidden units, over all layers
        hidden = max(8, 8 + 8 * round((target - params(8)) / per_unit))
        return ModelConfig.from_dict(d | {"mlp": d["mlp"] | {"hidden": hidden}})

    def __post_init__(self) -> None:
        given = {name: getattr(self, name) for name in field_names(type(self))}
        check_types(type(self), given)
        check_finite(given)
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            check_int(getattr(self, name), name, minimum=1)
        check_bool(self.tie_embeddings, "tie_embeddings")
        check_float(self.init_std, "init_std", positive=True)
        if not isinstance(self.kernels, str):
            raise ValueError(f"kernels={self.kernels!r}: expected a string such as 'auto' or 'triton,attention=torch'")
        parse_mode(self.kernels, source="kernels")
        self.norm = from_dict(NormConfig, self.norm, "norm")
        self.norm.validate("norm")
        self.mlp = from_dict(MLPConfig, self.mlp, "mlp")
        self.mlp.validate(self.d_model, "mlp")
        self.layer_mixers = self._resolve_mixers()
        self.layer_kv_source = self._resolve_kv_source()
        for i, m in enumerate(self.layer_mixers):
            window = getattr(m, "window", None)
            if window is not None and window > self.max_seq_len:
                raise ValueError(
                    f"layer {i}: window={window} exceeds max_seq_len={self.max_seq_len}; "
                    f"a window of max_seq_len or more is full attention (window: null)"
                )
        for i, m in enumerate(self.layer_mixers[1:], start=1):
            problem = m.first_layer_problem(self.layer_mixers[0])
            if problem is not None:
                raise ValueError(f"layer {i}: {problem}")

    def _resolve_mixers(self) -> list[MixerConfig]:
        if self.pattern is None and self.mixers is None:
            if self.mixer is None:
                self.mixer = {"kind": "attention"}
            self.mixer = mixer_config(self.mixer, "mixer")
            self.mixer.validate(self.d_model, "mixer")
            return [self.mixer] * self.n_layers
        if self.mixer is not None:
            raise ValueError("mixer and pattern/mixers are both set; give either mixer or pattern with mixers")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern={self.pattern!r} must be a non-empty string of names from mixers")
        if not isinstance(self.mixers, Mapping) or not self.mixers:
            raise ValueError(f"mixers={self.mixers!r} must map each name in pattern={self.pattern!r} to a mixer spec")
        self.mixers = {name: mixer_config(spec, f"mixers.{name}") for name, spec in self.mixers.items()}
        for name, cfg in self.mixers.items():
            cfg.validate(self.d_model, f"mixers.{name}")
        for ch in self.pattern:
            if ch not in self.mixers:
                raise ValueError(
                    f"pattern={self.pattern!r} uses {ch!r}, which is not in mixers ({', '.join(self.mixers)})"
                )
        return [self.mixers[self.pattern[i % len(self.pattern)]] for i in range(self.n_layers)]

    def _resolve_kv_source(self) -> list[int]:
        if self.kv_sharing is not None:
            if self.kv_source is not None:
                raise ValueError("kv_source and kv_sharing are both set; give one of them")
            self.kv_sharing = from_dict(KVSharingConfig, self.kv_sharing, "kv_sharing")
            self.kv_sharing.validate("kv_sharing")
            sources, name = self.kv_sharing.kv_source(self.n_layers), "kv_sharing"
        elif self.kv_source is not None:
            sources, name = list(self.kv_source), "kv_source"
            if len(sources) != self.n_layers:
                raise ValueError(
                    f"kv_source has {len(sources)} entries; it needs one per layer (n_layers={self.n_layers})"
                )
            self.kv_source = sources
        else:
            return list(range(self.n_layers))
        reads_later = name == "kv_sharing" and self.kv_sharing.kind == "lckv"
        for i, j in enumerate(sources):
            check_int(j, f"{name}[{i}]", minimum=0)
            if j > i and reads_later:
                if getattr(self.layer_mixers[i], "window", None) is not None:
                    raise ValueError(f"kv_sharing: lckv: layer {i} reads the top layer's K/V and cannot have a window")
            elif j > i:
                raise ValueError(f"{name}[{i}]={j}: a layer can read the K/V of itself or an earlier layer (0..{i})")
            if sources[j] != j:
                raise ValueError(
                    f"{name}[{i}]={j}: layer {j} reads layer {sources[j]} itself; point at a layer that owns its K/V"
                )
            if j != i:
                reason = self.layer_mixers[i].kv_compatible(self.layer_mixers[j])
                if reason is not None:
                    raise ValueError(f"{name}[{i}]={j}: layer {i} cannot read layer {j}'s K/V: {reason}")
        return sources
