"""Conversions between architectures, for uptraining from existing checkpoints.

These are the attention family's conversions: every one starts from
attention layers (MHA/GQA/MQA, ``kvlab.layers.attention``) and refuses
other mixers by their config type, never by probing attributes.

``convert_model(model, spec)`` takes the mapping a recipe gives under
``init.convert`` and returns a new model of the target architecture whose
weights are derived from ``model``'s:

- ``{to: gqa, n_kv_heads: G, method: mean}`` (Ainslie et al. 2023, sec. 2.1):
  the K and V projection heads are mean-pooled within each group of
  consecutive heads, so query head h keeps reading the pooled version of the
  K/V head it read before. ``method: first`` keeps the first head of each
  group instead (the paper's comparison). ``to: mqa`` is ``n_kv_heads: 1``.
- ``method: similarity`` (after AsymGQA, Chen et al. 2024): heads are grouped
  by how alike their keys and values are on calibration tokens rather than by
  position, then mean-pooled. Groups stay equal in size (the attention mixer
  has one group size), so the query heads of each group are permuted to be
  contiguous, and the output projection's columns with them: before pooling
  the model computes exactly what it did. With ``uneven: true`` the groups
  may differ in size (average-linkage clustering of the heads into
  ``n_kv_heads`` clusters), as AsymGQA proposes: the attention mixer's
  ``kv_groups`` then maps each query head to its cluster, per layer.
- ``method: weighted`` (WGQA, Chinnakonduru & Mohapatra 2024): the K/V
  projections are kept whole and each new K/V head is a learned weighted sum
  of its group (the attention mixer's ``kv_merge``), starting as the mean;
  the weights train during uptraining and ``fold_kv_merge`` folds them into
  plain GQA projections afterwards (``kvlab.archs.hf`` export does it).
- ``method: qcqa`` (Joshi et al. 2024): groupings found by QCQA's two-stage
  NSGA-II search on the weight-sharing error (``kvlab.archs.grouping``),
  within the cache of ``n_kv_heads`` K/V heads per layer on average; groups
  of any size and number per layer (``uneven: true``, QCQA-AC) or equal ones
  (QCQA-EC). No calibration tokens: the WSE is computed on the weights. The
  search's Pareto front (WSE vs cache) goes to ``report["qcqa_front"]``.
- ``method: asymgqa`` (Chen et al. 2024): AsymGQA's activation-informed
  search (swaps, and with ``uneven: true`` moves, of the most alike heads,
  kept when the loss on the calibration tokens improves), ``n_kv_heads``
  groups per layer; ``report["asymgqa_losses"]`` holds the search's losses.
- ``{to: matryoshka, ranks: [...], rank: [r_k, r_v]}`` (MatryoshkaKV, Lin et
  al. 2024): every attention layer gets orthogonal K/V projections
  initialised by PCA of its keys (after RoPE) and values on calibration
  tokens, with their means, so at full rank the model computes what the
  parent did; ``ranks`` is the Matryoshka schedule (default the official
  ``d/4, d/2, 3d/4, d``), ``rank`` the ranks used outside training, or
  ``budget`` (a fraction of the full K/V width) to choose them per layer
  (``per_head: true``: per K/V head) by the paper's greedy search
  (``report["matryoshka_ranks"]``).
- ``{to: dha, n_k_heads: K, n_v_heads: V, method: fusion, adaptive: true}``
  (DHA, Chen et al. 2024; ``kvlab.archs.fusion``): key heads and value heads
  clustered apart, each by average linkage on the similarity of their keys
  (values) on calibration tokens, as many clusters per layer as asked or,
  ``adaptive``, as a search spreads ``K`` (``V``) per layer on average;
  then each cluster's heads are fused by trained linear fusion operators
  and merged (``method: similarity`` mean-pools them instead).
  ``report["dha"]`` holds the counts per layer and the fusion's losses.
- ``query_allocation: kdgqa | dgqa`` with ``method: mean`` (Khan et al. 2024,
  who uptrain mean-pooled checkpoints this way): the pooled model allocates
  its query heads to K/V heads by key norms (``kvlab.layers.attention``).
- ``{to: cla, every: s}`` (or ``{to: cla, kv_source: [...]}`` for any
  layout): cross-layer sharing. Each K/V-owning layer's projections become
  the mean of those of the layers that will read it, itself included (the
  initialisation of LCKV, Wu & Tu 2024, and MLKV, Zuhri et al. 2024); the
  readers' projections are dropped.
- ``{to: mla, kv_lora_rank: r, rope_dims: d_r, method: mha2mla}`` (MHA2MLA,
  Ji et al. 2025) to MLA in its per-K/V-head-RoPE form (``kvlab.layers.mla``):
  1. partial RoPE: each K/V head keeps the ``d_r / 2`` rotary frequency
     pairs that matter most to it, scored by the mean 2-norm of the pair in
     its keys times that in its query heads' queries (on calibration tokens;
     without them, the same product on the projection weights); the other
     pairs stop rotating and join the no-RoPE channels;
  2. low rank: the no-RoPE key rows and the value rows of all K/V heads,
     stacked, are factored by one truncated SVD, W = U S V^T: V_r^T is the
     down-projection to the ``r``-wide latent, U_r S_r the up-projections.
  With ``d_r == head_dim`` and ``r`` at the stacked matrix's rank, the
  converted model computes what the parent did.
- ``{to: sa, n_shared: k}`` (Shared Attention, Liao & Vargas 2024): ``k``
  consecutive layers stop computing attention and apply the probabilities of
  the layer just below them, keeping their own values and output projections
  (their query and key projections are dropped). The span is where the
  paper looks for it: the layers whose attention distributions are most
  alike, measured on calibration tokens (the mean cosine similarity of each
  query's probability rows, head by head, between the span's first layer
  and each of the others); ``spans: [[first, last], ...]`` sets them
  instead (``first`` gives its weights to ``first + 1 .. last``).
  ``report["sa"]`` holds the layer-by-layer similarity and the spans.
- ``{to: recurformer, fraction: f, window: w}`` (RecurFormer, Yan et al.
  2024): the K/V heads whose attention sits nearest their queries
  (``recurformer_recency``: the mean probability mass on the last ``w``
  positions, itself included, on calibration tokens) are replaced by Mamba,
  the others kept with every weight. ``fraction`` of all K/V heads, the most
  recency-aware first, or every head at ``threshold`` or above, or
  ``heads: [[...] per layer]`` by hand. In a layer with heads of both kinds
  the Mamba (``mamba``: its settings) is as wide as the replaced query heads
  and takes their place before the layer's output projection (a parallel
  layer, ``combine: concat``); a layer with every head replaced becomes a
  Mamba layer with the attention's output projection. ``init: values``
  starts the Mamba's SSM input projection from the replaced heads' value
  rows, ``fresh`` draws it. ``report["recurformer"]`` holds the recency of
  every head and which were replaced.
"""

from __future__ import annotations

import copy
import logging
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvlab._config import check_bool, check_choice, check_float, check_int, check_keys, to_dict
from kvlab.archs import grouping
from kvlab.archs.config import ModelConfig
from kvlab.archs.fusion import HeadFusion, fuse_heads, fusion_cost
from kvlab.archs.model import CausalLM, build_model
from kvlab.kernels.ops import apply_rope
from kvlab.kernels.precision import compute_dtype, upcast
from kvlab.layers.attention import AttentionConfig, inverse_cayley

log = logging.getLogger(__name__)

CONVERSIONS = ("gqa", "mqa", "cla", "mla", "matryoshka", "dha", "sa", "recurformer", "context")
RECURFORMER_INITS = ("values", "fresh")  # a replacing Mamba's SSM input: the replaced heads' value rows, or new
GQA_METHODS = ("mean", "first", "similarity", "weighted", "qcqa", "asymgqa")
SEARCH_KEYS = {"qcqa": ("population", "generations", "seed"), "asymgqa": ("iterations", "seed")}
SEARCH_DEFAULTS = {"population": 32, "generations": 60, "iterations": 100, "seed": 0}


# DHA's fusion stage: steps, Adam's lr for the fusion operators, the multipliers' ascent rate, rows per step
DHA_FUSION = {"fusion_steps": 50, "fusion_lr": 0.03, "lambda_lr": 10.0, "fusion_batch": 4}

CALIBRATED_TARGETS = ("mla", "matryoshka", "dha")  # conversions that measure heads on tokens
CALIBRATED_METHODS = ("similarity", "asymgqa")


def _is_chain(spec: Any) -> bool:
    """Whether a conversion spec is a chain: a list of specs, each converting the one before's result."""
    return isinstance(spec, Sequence) and not isinstance(spec, str)


def uses_calibration(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``convert_model`` measures the model on calibration tokens for ``spec`` (to=mla uses them where
    given; the others need them); for a chain, whether any of its conversions does."""
    if _is_chain(spec):
        return any(uses_calibration(step) for step in spec)
    if spec.get("to") == "sa":  # SA measures attention to find its span, unless the spans are given
        return "spans" not in spec
    if spec.get("to") == "recurformer":  # RecurFormer measures each head's recency, unless the heads are given
        return "heads" not in spec
    return spec.get("to") in CALIBRATED_TARGETS or spec.get("method") in CALIBRATED_METHODS


def calibration_rows(spec: Mapping[str, Any]) -> int:
    """How many training rows ``spec`` wants as calibration tokens: its ``calibration_rows``, else 8, or 32
    for DHA's fusion, which trains on them; 0 when the conversion uses none."""
    if _is_chain(spec):  # as many as its most wanting step
        return max((calibration_rows(step) for step in spec), default=0)
    if not isinstance(spec, Mapping) or not uses_calibration(spec):
        return 0
    default = 32 if spec.get("to") == "dha" and spec.get("method") == "fusion" else 8
    return spec.get("calibration_rows", default)


def _without_calibration_rows(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """``spec`` less ``calibration_rows``, which the caller read to draw the calibration tokens."""
    if "calibration_rows" not in spec:
        return spec
    check_int(spec["calibration_rows"], "convert.calibration_rows", minimum=1)
    if not uses_calibration(spec):
        raise ValueError(f"convert.calibration_rows: the conversion {dict(spec)} uses no calibration tokens")
    return {k: v for k, v in spec.items() if k != "calibration_rows"}


def convert_model(
    model: CausalLM,
    spec: Mapping[str, Any],
    calibration: torch.Tensor | None = None,
    report: dict[str, Any] | None = None,
) -> CausalLM:
    """A new model converted as ``spec`` says; ``model`` is left unchanged.

    ``calibration``: token ids ``[B, T]`` that ``method: similarity`` (and ``asymgqa``, ``to: mla``)
    measure the heads on. ``report``: a dict that searches fill with what they found (QCQA's Pareto front).

    A list of specs is a chain, each conversion applied to the one before's result (MLKV from MHA: ``[{to:
    mqa}, {to: cla, every: 3}]``, the heads pooled within each layer, then across layers); an error names the
    step.
    """
    if _is_chain(spec):
        if not spec:
            raise ValueError("convert: an empty list of conversions; give one, or a chain of them")
        for i, step in enumerate(spec):
            try:
                model = convert_model(model, step, calibration, report)
            except ValueError as e:
                to = step.get("to") if isinstance(step, Mapping) else step
                raise ValueError(f"step {i + 1} of {len(spec)} (to: {to}): {e}") from None
        return model
    if not isinstance(spec, Mapping) or "to" not in spec:
        raise ValueError(f"convert: expected a mapping with a 'to' key ({', '.join(CONVERSIONS)}), got {spec!r}")
    check_choice(spec["to"], "convert.to", CONVERSIONS)
    for i, m in enumerate(model.config.layer_mixers):
        if isinstance(m, AttentionConfig) and m.n_q_heads is not None:
            raise ValueError(
                f"convert: layer {i} is GQKVA (n_q_heads={m.n_q_heads}), whose heads pair every query with every "
                "K/V head; conversions start from MHA/GQA/MQA layers"
            )
        if isinstance(m, AttentionConfig) and (m.n_v_heads is not None or m.v_groups is not None):
            raise ValueError(f"convert: layer {i} already has decoupled value heads (n_v_heads, v_groups)")
        if model.config.plan[i].attention_source != i:
            raise ValueError(f"convert: layer {i} applies layer {model.config.plan[i].attention_source}'s attention "
                             "weights (SA); conversions start from models that do not share them")  # fmt: skip
        if isinstance(m, AttentionConfig) and m.qk_norm and m.qk_norm_over == "projection":
            pooled = spec["to"] in ("gqa", "mqa") and spec.get("method", "mean") in ("mean", "first")
            if not (spec["to"] == "cla" or pooled and not spec.get("uneven") and not spec.get("query_allocation")):
                raise ValueError(f"convert: layer {i} normalises its whole key projection (qk_norm_over: projection, "
                                 "OLMo 2's), which to: gqa or mqa with method mean or first (even groups), and to: "
                                 f"cla carry; not to: {spec['to']} with these settings")  # fmt: skip
    spec = _without_calibration_rows(spec)
    if spec["to"] == "dha":
        method = _checked_method(spec, ["to", "n_k_heads", "n_v_heads", "method", "adaptive", *DHA_FUSION],
                                 ("similarity", "fusion"))  # fmt: skip
        check_int(spec.get("n_k_heads"), "convert.n_k_heads", minimum=1)
        check_int(spec.get("n_v_heads"), "convert.n_v_heads", minimum=1)
        check_bool(spec.get("adaptive", False), "convert.adaptive")
        if method != "fusion" and any(name in spec for name in DHA_FUSION):
            given = [name for name in DHA_FUSION if name in spec]
            raise ValueError(f"convert.{given[0]} is a setting of method=fusion, not of method={method}")
        settings = {"method": method, "adaptive": spec.get("adaptive", False)}
        settings.update({name: spec.get(name, default) for name, default in DHA_FUSION.items()})
        check_int(settings["fusion_steps"], "convert.fusion_steps", minimum=0)
        check_int(settings["fusion_batch"], "convert.fusion_batch", minimum=1)
        check_float(settings["fusion_lr"], "convert.fusion_lr", positive=True)
        check_float(settings["lambda_lr"], "convert.lambda_lr")
        if settings["lambda_lr"] < 0:
            raise ValueError(f"convert.lambda_lr={settings['lambda_lr']} must be >= 0 (the multipliers only rise)")
        if calibration is None:
            raise ValueError("convert.to=dha needs calibration tokens to compare the key and value heads on")
        converted = _to_decoupled_heads(model, {**spec, **settings}, calibration, report)
    elif spec["to"] == "matryoshka":
        method = _checked_method(spec, ["to", "ranks", "rank", "budget", "per_head", "method"], ("pca",))
        check_bool(spec.get("per_head", False), "convert.per_head")
        if calibration is None:
            raise ValueError("convert.to=matryoshka needs calibration tokens for the PCA of keys and values")
        budget = spec.get("budget")
        if budget is not None:
            check_float(budget, "convert.budget", positive=True)
            if budget > 1 or spec.get("rank") is not None:
                raise ValueError(f"convert.budget={budget} must be in (0, 1] (a fraction of the full K/V width), "
                                 "and is instead of convert.rank")  # fmt: skip
        elif spec.get("per_head"):
            raise ValueError("convert.per_head=true chooses ranks by the greedy search: it needs convert.budget")
        converted = _to_matryoshka(model, spec.get("ranks"), spec.get("rank"), budget, calibration, report,
                                   spec.get("per_head", False))  # fmt: skip
    elif spec["to"] == "cla":
        method = _checked_method(spec, ["to", "every", "kv_source", "method"], ("mean",))
        converted = _to_cla(model, spec)
    elif spec["to"] == "sa":
        method = _checked_method(spec, ["to", "n_shared", "spans", "method"], ("similarity",))
        converted = _to_shared_attention(model, spec, calibration, report)
    elif spec["to"] == "recurformer":
        method = _checked_method(spec, ["to", "fraction", "threshold", "heads", "window", "mamba", "init", "method"],
                                 ("recency",))  # fmt: skip
        converted = _to_recurformer(model, spec, calibration, report)
    elif spec["to"] == "context":
        method = _checked_method(spec, ["to", "context", "method"], ("add",))
        converted = _with_context_encoder(model, spec.get("context"))
    elif spec["to"] == "mla":
        method = _checked_method(spec, ["to", "kv_lora_rank", "rope_dims", "method"], ("mha2mla",))
        check_int(spec.get("kv_lora_rank"), "convert.kv_lora_rank", minimum=1)
        check_int(spec.get("rope_dims"), "convert.rope_dims", minimum=2)
        converted = _to_mla(model, spec["kv_lora_rank"], spec["rope_dims"], calibration)
    else:
        keys = ["to", "n_kv_heads", "method", "uneven", "query_allocation"]
        check_keys(spec, keys + sorted(SEARCH_DEFAULTS), "convert")
        n_kv_heads = 1 if spec["to"] == "mqa" else spec.get("n_kv_heads")
        method, uneven = spec.get("method", "mean"), spec.get("uneven", False)
        check_int(n_kv_heads, "convert.n_kv_heads", minimum=1)
        check_choice(method, "convert.method", GQA_METHODS)
        check_bool(uneven, "convert.uneven")
        if uneven and method not in ("similarity", "qcqa", "asymgqa"):
            raise ValueError(f"convert.uneven=true needs method=similarity, qcqa or asymgqa (got method={method})")
        search = {}
        for name in sorted(SEARCH_DEFAULTS):
            if name in spec and name not in SEARCH_KEYS.get(method, ()):
                owners = "/".join(m for m, names in SEARCH_KEYS.items() if name in names)
                raise ValueError(f"convert.{name} is a setting of method={owners}, not of method={method}")
            if name in SEARCH_KEYS.get(method, ()):
                search[name] = spec.get(name, SEARCH_DEFAULTS[name])
                check_int(search[name], f"convert.{name}", minimum=0 if name in ("seed", "iterations") else 1)
        allocation = spec.get("query_allocation")
        if allocation is not None and method != "mean":
            raise ValueError(f"convert.query_allocation={allocation} pools K/V heads by method=mean (got {method})")
        groups = None
        residual = [i for i, m in enumerate(model.config.layer_mixers) if getattr(m, "value_residual", None) and i]
        if residual and method in ("similarity", "qcqa", "asymgqa"):
            raise ValueError(f"convert.method={method} regroups each layer's heads its own way, but layer "
                             f"{residual[0]} reads layer 0's values (value_residual) in layer 0's head order; use "
                             "method=mean")  # fmt: skip
        if method in ("similarity", "asymgqa") and calibration is None:
            raise ValueError(f"convert.method={method} needs calibration tokens to compare the heads on")
        if method == "similarity":
            groups = similarity_groups(model, calibration, n_kv_heads, equal=not uneven)
        elif method == "qcqa":
            groups, front = qcqa_groups(model, n_kv_heads, equal=not uneven, **search)
            if report is not None:
                report["qcqa_front"] = front
        elif method == "asymgqa":
            groups, losses = asymgqa_groups(model, calibration, n_kv_heads, uneven, **search)
            if report is not None:
                report["asymgqa_losses"] = losses
        if uneven or method in ("qcqa", "asymgqa"):  # per-layer groups, neither contiguous nor alike in size
            converted = _to_uneven_gqa(model, groups)
        else:
            converted = _to_gqa(model, n_kv_heads, method, groups, allocation)
    before = model.kv_footprint(torch.bfloat16).bytes_per_token
    after = converted.kv_footprint(torch.bfloat16).bytes_per_token
    log.info("convert to %s (%s): KV cache %d -> %d bytes/token (bf16)", spec["to"], method, before, after)
    return converted


def _checked_method(spec: Mapping[str, Any], keys: list[str], methods: tuple[str, ...]) -> str:
    """The conversion's method (default the first of ``methods``), once ``spec`` holds only ``keys``."""
    check_keys(spec, keys, "convert")
    method = spec.get("method", methods[0])
    check_choice(method, "convert.method", methods)
    return method


def _to_gqa(
    model: CausalLM, n_kv_heads: int, method: str, groups: dict[int, list[list[int]]] | None, allocation=None
) -> CausalLM:
    cfg = model.config
    new_cfg_dict = copy.deepcopy(cfg.to_dict())
    attention = _attention_dicts(new_cfg_dict)
    if not attention:
        raise ValueError("convert.to=gqa: the model has no attention mixer to regroup")
    for m in attention:
        if m.get("kv_merge", 1) > 1:
            raise ValueError("convert: the model has WGQA merge weights (kv_merge > 1); fold_kv_merge it first")
        if m["n_kv_heads"] % n_kv_heads:
            raise ValueError(
                f"convert.n_kv_heads={n_kv_heads} must divide the model's n_kv_heads={m['n_kv_heads']}, "
                "so that each new K/V head pools whole old ones"
            )
        if method == "weighted":
            m["kv_merge"] = m["n_kv_heads"] // n_kv_heads
        m["n_kv_heads"] = n_kv_heads
        if allocation is not None:
            m["query_allocation"] = allocation
    state = dict(model.state_dict())
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        if not isinstance(mixer.cfg, AttentionConfig):
            continue
        owner = cfg.layer_kv_source[i]
        if groups is not None:  # K/V heads in group order, and every reader's query heads to match
            order = [h for group in groups[owner] for h in group]
            per_kv = mixer.n_heads // mixer.n_kv_heads
            q_order = [q for h in order for q in range(h * per_kv, (h + 1) * per_kv)]
            _permute_heads(state, f"layers.{i}.mixer.q_proj", q_order, mixer.head_dim, dim=0)
            _permute_heads(state, f"layers.{i}.mixer.o_proj", q_order, mixer.v_head_dim, dim=1)
            if mixer.gate_proj is not None:  # each query head's output gate goes with it
                _permute_heads(state, f"layers.{i}.mixer.gate_proj", q_order, mixer.v_head_dim, dim=0)
        if not mixer.owns_kv:
            continue
        # (a key norm over the whole projection, OLMo 2's, weighs each head's channels: pooled as the heads)
        for proj in ("k_proj", "v_proj") + (("k_norm",) if mixer.norm_projections else ()):
            if groups is not None:
                width = mixer.v_head_dim if proj == "v_proj" else mixer.head_dim
                _permute_heads(state, f"layers.{i}.mixer.{proj}", order, width, dim=0)
            if method == "weighted":  # projections kept whole; merge weights start as the mean
                merge = mixer.n_kv_heads // n_kv_heads
                state[f"layers.{i}.mixer.{proj[0]}_merge"] = torch.full((mixer.n_kv_heads,), 1.0 / merge)
                continue
            for tensor in ("weight", "bias"):
                key = f"layers.{i}.mixer.{proj}.{tensor}"
                if key in state:
                    state[key] = _pool_heads(state[key], mixer.n_kv_heads, n_kv_heads, method)
    return _build(new_cfg_dict, state, like=model)


def _to_uneven_gqa(model: CausalLM, groups: dict[int, list[list[int]]]) -> CausalLM:
    """K/V heads pooled within each layer's clusters; query heads keep reading their own head's pool."""
    cfg = model.config
    cfg_dict = copy.deepcopy(cfg.to_dict())
    layer_dicts = [to_dict(m) for m in cfg.layer_mixers]
    pooled = {}  # (layer, projection) -> the clusters its heads are mean-pooled in
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        if not isinstance(mixer.cfg, AttentionConfig):
            continue
        if mixer.cfg.kv_merge > 1 or mixer.cfg.kv_groups is not None:
            raise ValueError("convert.uneven: the model already has WGQA merge weights or uneven groups")
        clusters = groups[cfg.layer_kv_source[i]]
        layer_dicts[i].update(n_kv_heads=len(clusters), kv_groups=_cluster_of_query(mixer, clusters))
        if mixer.owns_kv:
            pooled.update({(i, p): clusters for p in ("k_proj", "v_proj") if hasattr(mixer, p)})  # SVFormer: no V
    state = {**model.state_dict(), **HeadFusion(model, pooled).merged()}  # identity operators: mean-pooling
    return _build(_one_mixer_per_layer(cfg_dict, layer_dicts), state, like=model)


def _cluster_of_query(mixer, clusters: list[list[int]]) -> list[int]:
    """Per query head, the cluster of the parent K/V head it read."""
    cluster_of = {h: c for c, members in enumerate(clusters) for h in members}
    per_kv = mixer.n_heads // mixer.n_kv_heads
    return [cluster_of[q // per_kv] for q in range(mixer.n_heads)]


LAYER_NAMES = string.ascii_letters + string.digits  # one mixer name per layer when layers differ


def _one_mixer_per_layer(cfg_dict: dict, layer_dicts: list[dict]) -> dict:
    """``cfg_dict`` with layer i's mixer ``layer_dicts[i]`` (a pattern of one name per layer)."""
    if len(layer_dicts) > len(LAYER_NAMES):
        raise ValueError(f"convert: at most {len(LAYER_NAMES)} layers can differ (one mixer name each)")
    names = LAYER_NAMES[: len(layer_dicts)]
    return {**cfg_dict, "mixer": None, "pattern": names, "mixers": dict(zip(names, layer_dicts, strict=True))}


def _to_decoupled_heads(
    model: CausalLM, spec: Mapping[str, Any], calibration: torch.Tensor, report: dict | None
) -> CausalLM:
    """DHA (``kvlab.archs.fusion``): per layer, the key heads clustered by their keys and the value heads by
    their values on ``calibration`` (average linkage), as many clusters per layer as asked or, ``adaptive``,
    as the budget search spreads them; each cluster's heads mean-pooled or, ``method: fusion``, fused by the
    trained fusion operators. Every query head reads the key head and the value head of the parent's heads
    it read."""
    cfg = model.config
    for i, (m, src) in enumerate(zip(cfg.layer_mixers, cfg.layer_kv_source, strict=True)):
        if not isinstance(m, AttentionConfig) or src != i or m.kv_merge > 1 or m.kv_groups is not None:
            raise ValueError(f"convert.to=dha: layer {i} is not plain unshared attention (MHA/GQA/MQA)")
        if m.value_residual is not None:
            raise ValueError(f"convert.to=dha: layer {i} has value_residual={m.value_residual}; DHA's value heads are "
                             "its own")  # fmt: skip
    layers = range(len(model.layers))
    clusters: dict[tuple[int, str], list[list[int]]] = {}
    heads = [model.layers[i].mixer.n_kv_heads for i in layers]
    if max(spec["n_k_heads"], spec["n_v_heads"]) > min(heads):
        i, n = heads.index(min(heads)), max(spec["n_k_heads"], spec["n_v_heads"])
        raise ValueError(f"convert.to=dha: layer {i} has {heads[i]} K/V heads, fewer than the {n} asked")
    outputs = _projection_outputs(model, calibration, list(layers), ("k_proj", "v_proj"))
    for proj, n in (("k_proj", spec["n_k_heads"]), ("v_proj", spec["n_v_heads"])):
        features = {i: _per_head(outputs[i, proj], heads[i]) for i in layers}
        levels = {i: grouping.linkage_hierarchy(_cosine(features[i])) for i in layers}
        per_layer = [n] * len(heads)
        if spec["adaptive"]:  # the spread each count leaves in the heads' outputs, at the start of fusion
            costs = [[fusion_cost(features[i], levels[i][c]) for c in range(1, heads[i] + 1)] for i in layers]
            per_layer = grouping.allocate_heads(costs, n * len(heads))
        for i, count in zip(layers, per_layer, strict=True):
            clusters[i, proj] = levels[i][count]
    if spec["method"] == "fusion":
        fusion, history = fuse_heads(model, clusters, calibration, spec["fusion_steps"], spec["fusion_lr"],
                                     spec["lambda_lr"], spec["fusion_batch"])  # fmt: skip
    else:
        fusion, history = HeadFusion(model, clusters), []  # the identity operators: mean-pooling
    layer_dicts = [to_dict(m) for m in cfg.layer_mixers]
    for i in layers:
        mixer, k, v = model.layers[i].mixer, clusters[i, "k_proj"], clusters[i, "v_proj"]
        layer_dicts[i].update(n_kv_heads=len(k), kv_groups=_cluster_of_query(mixer, k), n_v_heads=len(v),
                              v_groups=_cluster_of_query(mixer, v))  # fmt: skip
    converted = _build(_one_mixer_per_layer(copy.deepcopy(cfg.to_dict()), layer_dicts),
                       {**model.state_dict(), **fusion.merged()}, like=model)  # fmt: skip
    if report is not None:
        report["dha"] = {
            "k_heads_per_layer": [len(clusters[i, "k_proj"]) for i in layers],
            "v_heads_per_layer": [len(clusters[i, "v_proj"]) for i in layers],
            "fusion": history,
            "fusion_tokens": len(history[:-1]) * spec["fusion_batch"] * (calibration.shape[1] - 1),  # trained on
        }
    return converted


def _to_matryoshka(
    model: CausalLM,
    ranks: list[int] | None,
    rank: list[int] | None,
    budget: float | None,
    calibration: torch.Tensor,
    report: dict | None,
    per_head: bool = False,
) -> CausalLM:
    """MatryoshkaKV: PCA bases and means of every K/V head's keys (after RoPE) and values on ``calibration``,
    as the layers' trainable orthogonal projections (through the inverse Cayley map); ``budget``: per-layer
    (``per_head``: per-head) ranks by the greedy search (``matryoshka_greedy_ranks``)."""
    cfg = model.config
    for i, (m, src) in enumerate(zip(cfg.layer_mixers, cfg.layer_kv_source, strict=True)):
        if not isinstance(m, AttentionConfig):
            raise ValueError(f"convert.to=matryoshka: layer {i} is {m.kind!r}; MatryoshkaKV projects attention K/V")
        if src != i:
            raise ValueError(f"convert.to=matryoshka: layer {i} reads layer {src}'s K/V; convert an unshared model")
        if m.kv_merge > 1 or m.value_residual is not None or m.query_allocation is not None:
            raise ValueError(f"convert.to=matryoshka: layer {i} has WGQA merge weights, a value residual or "
                             "key-driven allocation; MatryoshkaKV projects plain K/V heads")  # fmt: skip
        if m.v_head_dim not in (None, m.head_dim):
            raise ValueError(f"convert.to=matryoshka: layer {i}'s value heads are {m.v_head_dim} wide, its key heads "
                             f"{m.head_dim}; MatryoshkaKV's bases are of heads as wide as the keys")  # fmt: skip
    layer_dicts = [to_dict(m) for m in cfg.layer_mixers]
    state = dict(model.state_dict())
    for i, basis in _pca_bases(model, calibration).items():
        d = model.layers[i].mixer.head_dim
        schedule = ranks if ranks is not None else [d // 4, d // 2, 3 * d // 4, d]  # the official schedule
        layer_dicts[i].update(kv_ranks=sorted({r for r in schedule if r > 0}), kv_rank=rank)
        for name, tensor in basis.items():
            state[f"layers.{i}.mixer.{name}"] = tensor.to(state[f"layers.{i}.mixer.k_proj.weight"].dtype)
    converted = _build(_one_mixer_per_layer(copy.deepcopy(cfg.to_dict()), layer_dicts), state, like=model)
    if budget is None:
        return converted
    chosen, losses = matryoshka_greedy_ranks(converted, calibration, budget, per_head)
    for i, r in chosen.items():
        layer_dicts[i]["kv_rank"] = list(r)
    if report is not None:
        report["matryoshka_ranks"] = {str(i): list(r) for i, r in chosen.items()}
        report["matryoshka_losses"] = losses
    return _build(_one_mixer_per_layer(copy.deepcopy(cfg.to_dict()), layer_dicts), state, like=model)


def with_kv_rank(model: CausalLM, rank: list[int]) -> CausalLM:
    """The same MatryoshkaKV model (same weights) using ``rank`` ([key rank, value rank]) outside training in
    every attention layer: one trained model, several cache budgets."""
    cfg_dict = copy.deepcopy(model.config.to_dict())
    mixers = _attention_dicts(cfg_dict)
    if not mixers or any(m.get("kv_ranks") is None for m in mixers):
        raise ValueError("with_kv_rank: the model has attention layers without MatryoshkaKV projections (kv_ranks)")
    for m in mixers:
        m["kv_rank"] = list(rank)
    return _build(cfg_dict, dict(model.state_dict()), like=model)


@torch.no_grad()
def _pca_bases(model: CausalLM, calibration: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per attention layer: each K/V head's mean and principal directions (columns, by falling variance) of
    its keys after RoPE and of its values on ``calibration``, as MatryoshkaKV's parameters (Cayley form)."""
    owners = _kv_owners(model)
    outputs = _projection_outputs(model, calibration, owners, ("k_proj", "v_proj"))
    B = calibration.shape[0]
    T = calibration.shape[1] + model.config.meta_tokens  # the meta tokens go first, at positions 0, 1, ...
    bases = {}
    for i in owners:
        mixer = model.layers[i].mixer
        G, d = mixer.n_kv_heads, mixer.head_dim
        keys = outputs[i, "k_proj"].view(B, T, G, d).transpose(1, 2)
        if mixer.cfg.qk_norm:  # the keys as the layer caches them: normalised, then turned
            keys = mixer.k_norm(keys)
        cos, sin = mixer.rotary(0, T)
        keys = apply_rope(keys, cos, sin)
        values = outputs[i, "v_proj"].view(B, T, G, d).transpose(1, 2)
        for which, x in (("k", keys), ("v", values)):
            samples = x.transpose(0, 1).reshape(G, -1, d).double()  # [G, tokens, d]
            mean = samples.mean(1)
            centered = samples - mean[:, None]
            _, vectors = torch.linalg.eigh(centered.transpose(1, 2) @ centered)  # ascending eigenvalues
            basis = vectors.flip(-1)
            basis = basis * torch.where(basis.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0)[:, None]  # near I: a
            basis[..., -1] *= torch.linalg.det(basis).sign()[:, None]  # Cayley parameter stays small; det +1
            work = compute_dtype(x.dtype)  # (float64 for a float64 model, whose weights take them exactly)
            bases.setdefault(i, {})[f"{which}_rotation"] = inverse_cayley(basis).to(work)
            bases[i][f"{which}_mean"] = mean.to(work)
    return bases


@torch.no_grad()
def matryoshka_greedy_ranks(
    model: CausalLM, calibration: torch.Tensor, budget: float, per_head: bool = False
) -> tuple[dict[int, tuple], list[float]]:
    """MatryoshkaKV's adaptive search for heterogeneous ranks: from every K/V head at its schedule's largest
    key and value ranks, repeatedly lower the one unit whose next smaller rank raises the loss on
    ``calibration`` least, until the cache is at most ``budget`` of full-width K/V. A unit is a layer's keys
    or values (all its heads together) or, ``per_head``, one head's keys or values, as the paper searches.
    Per head, re-measuring every head at every step would cost a forward per head and step, so each head's
    loss rise is measured once per lower rank with the others at full rank, and the steps are taken on
    those measures. Returns the ranks per layer (per-head lists with ``per_head``) and the loss after each
    step (``per_head``: at the start and the end)."""
    mixers = {i: model.layers[i].mixer for i in _kv_owners(model)}
    ids = calibration.to(model.embed_tokens.weight.device)
    was_training = model.training
    model.eval()

    def loss() -> float:
        return model(ids[:, :-1], labels=ids[:, 1:]).item()

    def use(i: int, r: list[list[int]]) -> None:  # per-head lists, or one rank per layer's keys / values
        mixers[i].kv_rank = tuple(list(x) if per_head else x[0] for x in r)

    full = sum(2 * m.n_kv_heads * m.head_dim for m in mixers.values())

    def top(i: int) -> list[list[int]]:  # layer i's keys and values at the schedule's largest rank
        return [[max(mixers[i].cfg.kv_ranks)] * mixers[i].n_kv_heads for _ in range(2)]

    ranks = {i: top(i) for i in mixers}
    units = []  # (layer, keys 0 / values 1, the heads lowered together), hashable
    for i, m in mixers.items():
        heads = [(g,) for g in range(m.n_kv_heads)] if per_head else [tuple(range(m.n_kv_heads))]
        units += [(i, which, h) for which in (0, 1) for h in heads]
    for i in mixers:
        use(i, ranks[i])
    losses = [loss()]

    def rank_of(r: list[list[int]], unit) -> int:  # the unit's rank in its layer's ranks r
        return r[unit[1]][unit[2][0]]

    def cached() -> int:  # K/V channels per token, all layers
        return sum(sum(map(sum, r)) for r in ranks.values())

    def trial_of(unit) -> list[list[int]] | None:  # the unit's layer with the unit one rank lower
        i, which, heads = unit
        lower = [r for r in mixers[i].cfg.kv_ranks if r < rank_of(ranks[i], unit)]
        if not lower:
            return None
        trial = copy.deepcopy(ranks[i])
        for g in heads:
            trial[which][g] = lower[-1]
        return trial

    def measure(unit, trial) -> float:
        use(unit[0], trial)
        value = loss()
        use(unit[0], ranks[unit[0]])
        forwards.update()
        return value

    from tqdm.auto import tqdm  # (a forward of the calibration tokens per candidate, many on a large model)

    forwards = tqdm(desc="MatryoshkaKV: ranks tried", unit="forward", disable=None)

    if per_head:  # one forward per head and lower rank, then the cheapest steps on those measures
        rise = {u: {} for u in units}
        for u in units:
            while (t := trial_of(u)) is not None:
                rise[u][rank_of(t, u)] = measure(u, t) - losses[0]
                ranks[u[0]] = t
            ranks[u[0]] = top(u[0])
            use(u[0], ranks[u[0]])  # the next head is measured with this one back at full rank
        while cached() > budget * full:
            steps = [(rise[u][rank_of(t, u)] - rise[u].get(rank_of(ranks[u[0]], u), 0.0), u, t)
                     for u in units if (t := trial_of(u)) is not None]  # fmt: skip
            if not steps:
                raise ValueError(f"convert.budget={budget}: even the smallest ranks of kv_ranks exceed it")
            _, unit, trial = min(steps, key=lambda s: s[0])
            ranks[unit[0]] = trial
            use(unit[0], trial)
        losses.append(loss())
    else:  # every candidate measured at every step
        while cached() > budget * full:
            candidates = [(u, t) for u in units if (t := trial_of(u)) is not None]
            if not candidates:
                raise ValueError(f"convert.budget={budget}: even the smallest ranks of kv_ranks exceed it")
            value, unit, trial = min((measure(u, t), u, t) for u, t in candidates)
            ranks[unit[0]] = trial
            use(unit[0], trial)
            losses.append(value)
    forwards.close()
    model.train(was_training)
    return {i: tuple(list(x) if per_head else x[0] for x in r) for i, r in ranks.items()}, losses


def _to_cla(model: CausalLM, spec: Mapping[str, Any]) -> CausalLM:
    if any(src != i for i, src in enumerate(model.config.layer_kv_source)):
        raise ValueError("convert.to=cla: the model already shares K/V across layers; convert an unshared one")
    if ("every" in spec) == ("kv_source" in spec):
        raise ValueError(f"convert.to=cla: give one of every (CLA-s) or kv_source (any layout), got {dict(spec)}")
    new_cfg_dict = copy.deepcopy(model.config.to_dict())
    if "every" in spec:
        check_int(spec["every"], "convert.every", minimum=1)
        new_cfg_dict["kv_sharing"] = {"kind": "cla", "every": spec["every"]}
    else:
        new_cfg_dict["kv_source"] = list(spec["kv_source"])
    for m in _attention_dicts(new_cfg_dict):
        if m.get("kv_merge", 1) > 1:
            raise ValueError("convert: the model has WGQA merge weights (kv_merge > 1); fold_kv_merge it first")
    try:
        sources = ModelConfig.from_dict(new_cfg_dict).layer_kv_source
    except ValueError as e:
        raise ValueError(f"convert.to=cla: {e}") from None
    state = dict(model.state_dict())
    for owner in sorted(set(sources)):
        readers = [i for i, src in enumerate(sources) if src == owner]
        for proj in ("k_proj", "k_norm", "v_proj"):
            for tensor in ("weight", "bias"):
                keys = [f"layers.{i}.mixer.{proj}.{tensor}" for i in readers]
                if keys[0] in state:  # readers[0] is the owner; SVFormer's readers have no V (they read layer 0's)
                    state[keys[0]] = torch.stack([state.pop(k) for k in keys if k in state]).mean(dim=0)
    return _build(new_cfg_dict, state, like=model)


def _with_context_encoder(model: CausalLM, context: Any) -> CausalLM:
    """The model with ``context`` (a ``context:`` section: CEPE's encoder and cross-attention, XC-Cache's cross
    blocks) added: every weight it had kept, the new modules initialised as in training from scratch (as both
    papers start them); a model without a context still computes what it did."""
    if model.config.context is not None:
        raise ValueError("convert.to=context: the model already has a context encoder")
    if not isinstance(context, Mapping):
        raise ValueError(f"convert.to=context needs convert.context, the context section to add (as in "
                         f"configs/model/cepe.yaml), got {context!r}")  # fmt: skip
    new_cfg_dict = copy.deepcopy(model.config.to_dict()) | {"context": dict(context)}
    try:
        cfg = ModelConfig.from_dict(new_cfg_dict)
    except ValueError as e:
        raise ValueError(f"convert.{e}" if str(e).startswith("context") else f"convert.to=context: {e}") from None
    weight = model.embed_tokens.weight
    new = build_model(cfg).to(device=weight.device, dtype=weight.dtype)
    loaded = new.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys  # the decoder's modules are the parent's
    return new


def _to_shared_attention(
    model: CausalLM, spec: Mapping[str, Any], calibration: torch.Tensor | None, report: dict | None
) -> CausalLM:
    cfg = model.config
    if ("n_shared" in spec) == ("spans" in spec):
        raise ValueError(f"convert.to=sa: give one of n_shared (the span is searched) or spans, got {dict(spec)}")
    n = cfg.n_layers
    similarity = None
    if "spans" in spec:
        spans = spec["spans"]
        if not isinstance(spans, (list, tuple)) or not spans:
            raise ValueError(f"convert.spans={spans!r} must list [first, last] layer pairs, e.g. [[2, 4]]")
        for k, span in enumerate(spans):
            if not isinstance(span, (list, tuple)) or len(span) != 2:
                raise ValueError(f"convert.spans[{k}]={span!r} must be [first, last]")
            for x, name in zip(span, ("first", "last"), strict=True):
                check_int(x, f"convert.spans[{k}] ({name})", minimum=0)
            if not span[0] < span[1] < n:
                raise ValueError(f"convert.spans[{k}]={list(span)} must have first < last < n_layers={n}")
        spans = [list(span) for span in spans]
    else:
        check_int(spec["n_shared"], "convert.n_shared", minimum=1)
        if spec["n_shared"] >= n:
            raise ValueError(f"convert.n_shared={spec['n_shared']} must be below n_layers={n}")
        if calibration is None:
            raise ValueError("convert.to=sa with n_shared needs calibration tokens to compare the layers' attention on")
        similarity = attention_similarity(model, calibration)
        spans = [sa_span(similarity, spec["n_shared"])]
    sources = list(range(n))
    for first, last in spans:
        for i in range(first + 1, last + 1):
            if sources[i] != i:
                raise ValueError(f"convert.spans: layer {i} lies in two spans ({spans})")
            sources[i] = first
    new_cfg_dict = copy.deepcopy(cfg.to_dict())
    new_cfg_dict["attention_source"] = sources
    try:
        ModelConfig.from_dict(new_cfg_dict)
    except ValueError as e:
        raise ValueError(f"convert.to=sa: {e}") from None
    readers = [i for i in range(n) if sources[i] != i]
    dropped = tuple(f"layers.{i}.mixer.{proj}." for i in readers for proj in ("q_proj", "k_proj", "q_norm", "k_norm"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    if report is not None:
        report["sa"] = {"spans": spans, "attention_source": sources}
        if similarity is not None:
            report["sa"]["similarity"] = [[round(float(x), 4) for x in row] for row in similarity]
    log.info("SA: layers %s apply the attention weights of layers %s", readers, [sources[i] for i in readers])
    return _build(new_cfg_dict, state, like=model)


@torch.no_grad()
def attention_similarity(model: CausalLM, calibration: torch.Tensor) -> torch.Tensor:
    """[L, L]: the mean cosine similarity of layers' attention probabilities on ``calibration``, over every
    query of every sequence, head h of one layer against head h of the other (SA's criterion)."""
    weights = attention_probabilities(model, calibration, "sa")
    rows = [torch.nn.functional.normalize(weights[i].float(), dim=-1) for i in range(len(weights))]
    similarity = torch.eye(len(rows), dtype=torch.float64)
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):  # each row's cosine in float32, their mean in float64
            similarity[a, b] = similarity[b, a] = (rows[a] * rows[b]).sum(-1).double().mean()
    return similarity


@torch.no_grad()
def attention_probabilities(model: CausalLM, calibration: torch.Tensor, target: str) -> dict[int, torch.Tensor]:
    """{layer: its attention probabilities [B, H, T, T] on ``calibration``}, every layer being attention that
    forms one distribution per query head (``target`` names the conversion in the error otherwise)."""
    mixers = [layer.mixer for layer in model.layers]
    for i, m in enumerate(mixers):
        if not isinstance(m.cfg, AttentionConfig) or m.cfg.query_allocation == "kdgqa" or m.kv_source > i:
            raise ValueError(f"convert.to={target}: layer {i} does not form one attention distribution per head")
    weights: dict[int, torch.Tensor] = {}

    def keep(mixer, _args, kwargs, _out):
        weights[mixer.layer_idx] = kwargs["state"].published[("attention", mixer.layer_idx)]

    hooks = [m.register_forward_hook(keep, with_kwargs=True) for m in mixers]
    shared, training = [m.shares_attention for m in mixers], model.training
    try:
        for m in mixers:  # the same attention, formed explicitly so that it is published
            m.shares_attention = True
        model.eval()(calibration.to(model.embed_tokens.weight.device))
    finally:
        for hook in hooks:
            hook.remove()
        for m, shares in zip(mixers, shared, strict=True):
            m.shares_attention = shares
        model.train(training)
    return weights


@torch.no_grad()
def recurformer_recency(model: CausalLM, calibration: torch.Tensor, window: int) -> dict[int, torch.Tensor]:
    """{layer: [K/V heads]}: how recency-aware each K/V head's attention is on ``calibration``, RecurFormer's
    criterion as its abstract states it ("attention weights concentrated on tokens near the query"): the
    probability mass on the last ``window`` positions (the query's own included), averaged over the queries
    that can see past the window (position >= window) of every sequence, then over a K/V head's query heads."""
    T = calibration.shape[1]
    if T <= window:
        raise ValueError(f"convert.window={window}: the calibration rows are {T} tokens; the recency of a head needs "
                         "queries that see past the window")  # fmt: skip
    T += model.config.meta_tokens  # they go first, at positions 0, 1, ...: keys like the tokens' own
    behind = torch.arange(T, device=calibration.device)[:, None] - torch.arange(T, device=calibration.device)
    near = (behind >= 0) & (behind < window)  # [query, key]: the key is one of the query's last `window`
    recency = {}
    for i, weights in attention_probabilities(model, calibration, "recurformer").items():
        mass = (weights.double() * near.to(weights.device)).sum(-1)[:, :, window:].mean(dim=(0, 2))  # [query heads]
        per_kv = model.layers[i].mixer.n_heads // model.layers[i].mixer.n_kv_heads
        recency[i] = mass.view(-1, per_kv).mean(-1).cpu()
    return recency


def _recurformer_heads(
    model: CausalLM, spec: Mapping[str, Any], calibration: torch.Tensor | None, report: dict | None
) -> list[list[int]]:
    """Per layer, the K/V heads to replace: given (``heads``), or chosen by ``fraction`` / ``threshold``."""
    given = [name for name in ("fraction", "threshold", "heads") if name in spec]
    if len(given) != 1:
        raise ValueError(f"convert.to=recurformer: give one of fraction, threshold or heads, got {dict(spec)}")
    counts = [layer.mixer.n_kv_heads for layer in model.layers]
    if "heads" in spec:
        heads = spec["heads"]
        if not isinstance(heads, (list, tuple)) or len(heads) != len(counts):
            raise ValueError(f"convert.heads={heads!r} must list, for each of the {len(counts)} layers, the K/V heads "
                             "to replace (e.g. [[0, 3], [], ...])")  # fmt: skip
        for i, (layer, n) in enumerate(zip(heads, counts, strict=True)):
            if not isinstance(layer, (list, tuple)) or len(set(layer)) != len(layer):
                raise ValueError(f"convert.heads[{i}]={layer!r} must list distinct K/V heads")
            for h in layer:
                check_int(h, f"convert.heads[{i}]", minimum=0)
                if h >= n:
                    raise ValueError(f"convert.heads[{i}]: head {h} is not one of layer {i}'s {n} K/V heads")
        return [sorted(layer) for layer in heads]
    window = spec.get("window", 16)
    check_int(window, "convert.window", minimum=1)
    name = given[0]
    check_float(spec[name], f"convert.{name}")
    if name == "fraction" and not 0 <= spec[name] <= 1:
        raise ValueError(f"convert.fraction={spec[name]} must be in [0, 1] (of all K/V heads)")
    if calibration is None:
        raise ValueError("convert.to=recurformer needs calibration tokens to measure the heads' recency on")
    recency = recurformer_recency(model, calibration, window)
    units = sorted(((float(r), i, h) for i, row in recency.items() for h, r in enumerate(row)), reverse=True)
    if name == "fraction":
        chosen = units[: round(spec[name] * len(units))]
    else:
        chosen = [u for u in units if u[0] >= spec[name]]
    heads = [sorted(h for _, i, h in chosen if i == layer) for layer in range(len(counts))]
    if report is not None:
        report["recurformer"] = {
            "window": window,
            "recency": [[round(float(r), 4) for r in recency[i]] for i in range(len(counts))],
            "replaced": heads,
        }
    return heads


def _to_recurformer(
    model: CausalLM, spec: Mapping[str, Any], calibration: torch.Tensor | None, report: dict | None
) -> CausalLM:
    cfg = model.config
    for i, (m, src) in enumerate(zip(cfg.layer_mixers, cfg.layer_kv_source, strict=True)):
        if (not isinstance(m, AttentionConfig) or src != i or m.kv_merge > 1 or m.kv_groups is not None
                or m.n_v_heads is not None or m.kv_ranks is not None or m.value_residual is not None
                or m.query_allocation is not None or m.output_gate):  # fmt: skip
            raise ValueError(f"convert.to=recurformer: layer {i} is not plain attention with its own K/V (MHA/GQA/MQA; "
                             "no gated outputs)")  # fmt: skip
        if m.o_bias:
            raise ValueError(f"convert.to=recurformer: layer {i}'s o_proj has a bias (o_bias), which the replacing "
                             "Mamba's output projection has not")  # fmt: skip
    mamba = dict(spec.get("mamba") or {})
    if "inner" in mamba or "kind" in mamba:
        raise ValueError("convert.mamba: inner and kind are set by the conversion (the replaced heads' width)")
    init = spec.get("init", "values")
    check_choice(init, "convert.init", RECURFORMER_INITS)
    replaced = _recurformer_heads(model, spec, calibration, report)
    layer_dicts, state = [to_dict(m) for m in cfg.layer_mixers], {}
    value_rows = {}  # layer -> the replaced query heads' value rows, in the order of the Mamba's channels
    parent = model.state_dict()
    for i, (layer, heads) in enumerate(zip(model.layers, replaced, strict=True)):
        if not heads:
            continue
        mixer, prefix = layer.mixer, f"layers.{i}.mixer."
        per_kv, width = mixer.n_heads // mixer.n_kv_heads, mixer.v_head_dim
        kept = [h for h in range(mixer.n_kv_heads) if h not in heads]
        queries = {name: [q for h in group for q in range(h * per_kv, (h + 1) * per_kv)]
                   for name, group in (("kept", kept), ("replaced", heads))}  # fmt: skip
        branch = {**mamba, "kind": "mamba", "inner": len(queries["replaced"]) * width}
        own = {k[len(prefix) :]: v for k, v in parent.items() if k.startswith(prefix)}
        columns = _head_rows(queries["kept"] + queries["replaced"], width)  # the heads as the new layer lays them
        state[prefix + "out_proj.weight"] = own["o_proj.weight"][:, columns]
        value_rows[i] = own["v_proj.weight"][_head_rows([q // per_kv for q in queries["replaced"]], width)]
        if not kept:  # every head recency-aware: a Mamba layer behind the attention's output projection
            layer_dicts[i] = branch
            continue
        layer_dicts[i] = {"kind": "parallel", "shared_output": True, "combine": "concat",
                          "mixers": [{**layer_dicts[i], "n_heads": len(queries["kept"]), "n_kv_heads": len(kept)},
                                     branch]}  # fmt: skip
        for name, tensor in own.items():
            if name.startswith("o_proj."):
                continue
            proj = name.split(".")[0]
            if proj in ("q_proj", "k_proj", "v_proj"):
                rows = queries["kept"] if proj == "q_proj" else kept
                size = mixer.head_dim if proj != "v_proj" else width
                tensor = tensor[_head_rows(rows, size)]
            state[f"{prefix}branches.0.{name}"] = tensor
    rebuilt = tuple(f"layers.{i}.mixer." for i in value_rows)  # the mixers this conversion builds anew
    converted = _build(_one_mixer_per_layer(copy.deepcopy(cfg.to_dict()), layer_dicts),
                       {k: v for k, v in parent.items() if not k.startswith(rebuilt)} | state, like=model,
                       fresh=rebuilt)  # fmt: skip
    if init == "values":  # the SSM input x starts as the replaced heads' values (each query head's K/V head's)
        with torch.no_grad():
            for i, rows in value_rows.items():
                new = converted.layers[i].mixer
                ssm = new.branches[1] if hasattr(new, "branches") else new
                ssm.in_proj.weight[: ssm.inner].copy_(rows)
    log.info("RecurFormer: K/V heads replaced by Mamba per layer %s", [len(h) for h in replaced])
    return converted


def _head_rows(heads: list[int], size: int) -> torch.Tensor:
    """The rows (or columns) of ``heads``, ``size`` each, in that order."""
    return torch.tensor([h * size + j for h in heads for j in range(size)], dtype=torch.long)


def sa_span(similarity: torch.Tensor, n_shared: int) -> list[int]:
    """[first, first + n_shared]: the span whose layers' attention is, on average, most like its first layer's."""
    n = similarity.shape[0]
    scores = [float(similarity[s, s + 1 : s + n_shared + 1].mean()) for s in range(n - n_shared)]
    first = max(range(len(scores)), key=scores.__getitem__)
    return [first, first + n_shared]


def _to_mla(model: CausalLM, kv_lora_rank: int, rope_dims: int, calibration: torch.Tensor | None) -> CausalLM:
    cfg = model.config
    m = cfg.mixer
    if not isinstance(m, AttentionConfig) or any(src != i for i, src in enumerate(cfg.layer_kv_source)):
        raise ValueError("convert.to=mla: the model must be attention in every layer (one mixer), unshared")
    reasons = {
        "partial RoPE": m.rope_dims != m.head_dim,
        "RoPE scaling": m.rope_scaling is not None,  # MLA's decoupled RoPE key has none
        "a sliding window": m.window is not None,
        "biases": m.qkv_bias or m.o_bias,
        "WGQA merge weights": m.kv_merge > 1,
        "a value residual": m.value_residual is not None,
        "per-head query and key norms (qk_norm)": m.qk_norm,  # the latent's keys are linear in it
        "a softmax_scale of its own": m.softmax_scale is not None,
        "soft-capped scores (softcap)": m.softcap is not None,
        "learned sink logits (learned_sinks)": m.learned_sinks,
        "gated outputs (output_gate)": m.output_gate,
    }
    if any(reasons.values()):
        raise ValueError(f"convert.to=mla: the model has {', '.join(k for k, v in reasons.items() if v)}; MLA has none")
    if rope_dims % 2 or rope_dims > m.head_dim:
        raise ValueError(f"convert.rope_dims={rope_dims} must be even and at most the head_dim={m.head_dim}")
    H, Hk, d, half = m.n_heads, m.n_kv_heads, m.head_dim, m.head_dim // 2
    dv = m.v_head_dim or d
    D, G = d - rope_dims, Hk  # no-RoPE width per head; one RoPE key per parent K/V head
    pairs = mha2mla_rope_pairs(model, rope_dims, calibration)
    new_cfg_dict = copy.deepcopy(cfg.to_dict())
    new_cfg_dict["mixer"] = {
        "kind": "mla", "n_heads": H, "head_dim": D, "v_head_dim": dv, "rope_head_dim": rope_dims,
        "rope_kv_heads": G, "rope_spectrum": d, "kv_lora_rank": kv_lora_rank, "q_lora_rank": None,
        "rope_theta": m.rope_theta, "latent_norm": False,
    }  # fmt: skip
    state = {k: v for k, v in model.state_dict().items() if ".mixer." not in k}
    for i, layer in enumerate(model.layers):
        mixer, prefix = layer.mixer, f"layers.{i}.mixer."
        keep = pairs[i]  # [Hk, rope_dims / 2], sorted
        rope_idx, nope_idx = [], []  # per K/V head: channels in [pairs' first halves; second halves] order
        for g in range(Hk):
            kept = keep[g].tolist()
            dropped = [p for p in range(half) if p not in kept]
            rope_idx.append(torch.tensor(kept + [p + half for p in kept], dtype=torch.long))
            nope_idx.append(torch.tensor(dropped + [p + half for p in dropped], dtype=torch.long))
        w_q = mixer.q_proj.weight.detach().view(H, d, -1)
        w_k = mixer.k_proj.weight.detach().view(Hk, d, -1)
        w_v = mixer.v_proj.weight.detach().view(Hk, dv, -1)
        group = [h * Hk // H for h in range(H)]  # the parent K/V head each query head read
        state[prefix + "q_proj.weight"] = torch.cat(
            [torch.cat([w_q[h, nope_idx[group[h]]], w_q[h, rope_idx[group[h]]]]) for h in range(H)]
        )
        # joint SVD of [no-RoPE keys; values] of every K/V head: [Hk * (D + dv), d_model]
        stacked = upcast(torch.cat([torch.cat([w_k[g, nope_idx[g]], w_v[g]]) for g in range(Hk)]))
        U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        r = min(kv_lora_rank, S.numel())
        down = torch.zeros(kv_lora_rank, stacked.shape[1], dtype=stacked.dtype, device=stacked.device)
        down[:r] = Vh[:r]
        up = torch.zeros(stacked.shape[0], kv_lora_rank, dtype=stacked.dtype, device=stacked.device)
        up[:, :r] = U[:, :r] * S[:r]
        up = up.view(Hk, D + dv, kv_lora_rank)
        k_rope = torch.cat([w_k[g, rope_idx[g]] for g in range(Hk)])
        dtype = w_k.dtype
        state[prefix + "kv_a_proj_with_mqa.weight"] = torch.cat([down.to(dtype), k_rope])
        state[prefix + "kv_b_proj.weight"] = torch.cat([up[group[h]] for h in range(H)]).to(dtype)
        state[prefix + "o_proj.weight"] = mixer.o_proj.weight.detach()
        state[prefix + "rotary.pair_index"] = keep
    return _build(new_cfg_dict, state, like=model)


@torch.no_grad()
def mha2mla_rope_pairs(
    model: CausalLM, rope_dims: int, calibration: torch.Tensor | None = None
) -> dict[int, torch.Tensor]:
    """Per layer, the ``rope_dims / 2`` rotary pairs each K/V head keeps: [n_kv_heads, rope_dims / 2], sorted.

    Pair p of a head is channels (p, p + head_dim / 2). Its score is the mean
    2-norm of the pair in the head's keys times the summed mean 2-norms in its
    query heads' queries, an upper bound of its share of q.k (MHA2MLA's
    S_2-norm); norms are taken before RoPE, which rotates pairs without
    changing their norms. Without calibration tokens the projection rows'
    Frobenius norms stand in for the activations.
    """
    outputs = {}
    if calibration is not None:
        outputs = _projection_outputs(model, calibration, list(range(len(model.layers))), ("q_proj", "k_proj"))
    pairs = {}
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        H, Hk, d = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
        norms = {}
        for proj, heads in (("q_proj", H), ("k_proj", Hk)):
            if calibration is not None:  # [tokens, heads, d]: mean over tokens of each pair's 2-norm
                x = outputs[i, proj].float().view(-1, heads, d)
                norms[proj] = torch.sqrt(x[..., : d // 2] ** 2 + x[..., d // 2 :] ** 2).mean(0)
            else:  # [heads, d, d_model]: each pair's rows
                w = getattr(mixer, proj).weight.float().view(heads, d, -1)
                norms[proj] = torch.sqrt((w[:, : d // 2] ** 2).sum(-1) + (w[:, d // 2 :] ** 2).sum(-1))
        queries = norms["q_proj"].view(Hk, H // Hk, d // 2).sum(1)
        score = queries * norms["k_proj"]
        pairs[i] = score.topk(rope_dims // 2, dim=-1).indices.sort(dim=-1).values
    return pairs


def _build(cfg_dict: dict, state: dict[str, torch.Tensor], like: CausalLM, fresh: tuple[str, ...] = ()) -> CausalLM:
    """A model of ``cfg_dict`` holding ``state`` (every parameter), on ``like``'s device and dtype.

    Buffers the target has and ``state`` lacks (DGQA's allocation) keep their initial values, and so do the
    parameters under the prefixes ``fresh`` (new modules: RecurFormer's Mamba), drawn with seed 0."""
    with torch.device("meta"):
        new = build_model(ModelConfig.from_dict(cfg_dict))
    new.to_empty(device=like.embed_tokens.weight.device)
    # buffers (RoPE tables) and fresh modules (their own seed, so that a conversion is repeatable); every other
    # parameter is overwritten next
    new.init_weights(seed=0 if fresh else None)
    new.to(like.embed_tokens.weight.dtype)  # before loading, so a float64 state is kept whole
    buffers = dict(new.named_buffers())
    kept = {name: t for name, t in new.state_dict().items()
            if name not in state and (name.startswith(fresh) or name in buffers)}  # fmt: skip
    new.load_state_dict({**kept, **state}, strict=True)
    return new


def fold_kv_merge(model: CausalLM) -> CausalLM:
    """The same function with WGQA's merge weights folded into the K/V projections (``kv_merge: 1``)."""
    new_cfg_dict = copy.deepcopy(model.config.to_dict())
    for m in _attention_dicts(new_cfg_dict):
        m["kv_merge"] = 1
    state = dict(model.state_dict())
    for i, layer in enumerate(model.layers):
        mixer = layer.mixer
        if not isinstance(mixer.cfg, AttentionConfig) or not mixer.owns_kv or mixer.cfg.kv_merge == 1:
            continue
        merge, D = mixer.cfg.kv_merge, mixer.head_dim
        for proj in ("k_proj", "v_proj"):
            w = state.pop(f"layers.{i}.mixer.{proj[0]}_merge").view(mixer.n_kv_heads, merge, 1)
            for tensor in ("weight", "bias"):
                key = f"layers.{i}.mixer.{proj}.{tensor}"
                if key in state:
                    t = state[key]
                    heads = t.reshape(mixer.n_kv_heads, merge, D, -1) * w.unsqueeze(-1)
                    state[key] = heads.sum(dim=1).reshape(mixer.n_kv_heads * D, *t.shape[1:])
    return _build(new_cfg_dict, state, like=model)


def _attention_dicts(cfg_dict: dict) -> list[dict]:
    """The attention mixer configs inside a ModelConfig dict (``mixer``, or the values of ``mixers``), to edit."""
    mixers = [cfg_dict["mixer"]] if cfg_dict["mixer"] else list((cfg_dict["mixers"] or {}).values())
    return [m for m in mixers if m["kind"] == AttentionConfig.kind]


def _permute_heads(state: dict, prefix: str, order: list[int], head_dim: int, dim: int) -> None:
    """Reorder the heads of a projection (output rows, dim=0; input columns of o_proj, dim=1)."""
    index = _head_rows(order, head_dim)
    for tensor in ("weight", "bias"):
        key = f"{prefix}.{tensor}"
        if key in state and (dim == 0 or tensor == "weight"):  # o_proj's bias has no head axis
            state[key] = state[key].index_select(dim, index.to(state[key].device))


@torch.no_grad()
def similarity_groups(
    model: CausalLM, calibration: torch.Tensor, n_kv_heads: int, equal: bool = True
) -> dict[int, list[list[int]]]:
    """For each K/V-owning attention layer, its K/V heads in ``n_kv_heads`` groups of alike heads.

    A head is described by its keys and values on ``calibration`` (all tokens,
    concatenated); alike means cosine similarity. ``equal``: greedy equal-size
    groups, the lowest-numbered free head taking the free heads most like it
    until its group is full. Otherwise average-linkage clustering: the two
    clusters most alike on average merge until ``n_kv_heads`` remain (groups
    listed by their lowest head). Both are deterministic.
    """
    groups = {}
    for i, similarity in head_similarity(model, calibration).items():
        heads = similarity.shape[0]
        if n_kv_heads > heads:
            raise ValueError(f"convert.n_kv_heads={n_kv_heads} is more than layer {i}'s {heads} K/V heads")
        groups[i] = _equal_groups(similarity, n_kv_heads) if equal else _linkage_groups(similarity, n_kv_heads)
    return groups


def _kv_owners(model: CausalLM) -> list[int]:
    return [i for i, layer in enumerate(model.layers)
            if isinstance(layer.mixer.cfg, AttentionConfig) and layer.mixer.owns_kv]  # fmt: skip


@torch.no_grad()
def head_similarity(
    model: CausalLM, calibration: torch.Tensor, projections: tuple[str, ...] = ("k_proj", "v_proj")
) -> dict[int, torch.Tensor]:
    """For each K/V-owning attention layer, the [H, H] cosine similarity of its K/V heads' keys and values
    (or only the outputs of ``projections``) on ``calibration`` (all tokens, concatenated)."""
    owners = _kv_owners(model)
    outputs = _projection_outputs(model, calibration, owners, projections)
    heads = {i: model.layers[i].mixer.n_kv_heads for i in owners}
    return {i: _cosine(torch.cat([_per_head(outputs[i, p], heads[i]) for p in projections], dim=1)) for i in owners}


def _per_head(output: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's output [tokens, heads * d] -> [heads, tokens * d], in float32."""
    return output.float().unflatten(1, (heads, -1)).transpose(0, 1).flatten(1)


def _cosine(features: torch.Tensor) -> torch.Tensor:
    """[n, n] cosine similarity of the rows of ``features``."""
    features = torch.nn.functional.normalize(features, dim=1)
    return features @ features.T


def qcqa_groups(
    model: CausalLM, n_kv_heads: int, equal: bool, population: int, generations: int, seed: int
) -> tuple[dict[int, list[list[int]]], list[dict]]:
    """QCQA's groupings of every K/V-owning attention layer within ``n_kv_heads`` K/V heads per layer on
    average, and its Pareto front (``kvlab.archs.grouping.qcqa_search``) with each point's bf16 bytes/token."""
    grams = {}
    for i in _kv_owners(model):
        mixer = model.layers[i].mixer
        if not hasattr(mixer, "v_proj") or mixer.cfg.kv_merge > 1:
            raise ValueError(f"convert.method=qcqa: layer {i} has no plain V projection (SVFormer or WGQA)")
        if n_kv_heads > mixer.n_kv_heads:
            raise ValueError(f"convert.n_kv_heads={n_kv_heads} is more than layer {i}'s {mixer.n_kv_heads} K/V heads")
        bias = {p: getattr(mixer, p).bias for p in ("k_proj", "v_proj")}
        grams[i] = grouping.head_gram(mixer.k_proj.weight, mixer.v_proj.weight, mixer.n_kv_heads, bias["k_proj"],
                                      bias["v_proj"])  # fmt: skip
    budget = n_kv_heads * len(grams)
    groups, front = grouping.qcqa_search(grams, budget, equal, population, generations, seed)
    per_head = {i: 2 * model.layers[i].mixer.head_dim * torch.bfloat16.itemsize for i in grams}
    for point in front:
        point["kv_bytes_per_token_bf16"] = sum(
            n * per_head[i] for i, n in zip(sorted(grams), point["kv_heads_per_layer"], strict=True)
        )
    chosen = next(p for p in front if p["chosen"])
    log.info("QCQA: %d Pareto points; chosen %d K/V heads (budget %d), WSE %.4g, per layer %s",
             len(front), chosen["kv_heads"], budget, chosen["wse"], chosen["kv_heads_per_layer"])  # fmt: skip
    return groups, front


def asymgqa_groups(
    model: CausalLM, calibration: torch.Tensor, n_kv_heads: int, uneven: bool, iterations: int, seed: int
) -> tuple[dict[int, list[list[int]]], list[float]]:
    """AsymGQA's search (``kvlab.archs.grouping.asymgqa_search``): each candidate is the mean-pooled model,
    scored by its loss on the calibration tokens."""
    ids = calibration.to(model.embed_tokens.weight.device)

    @torch.no_grad()
    def loss(groups):
        return _to_uneven_gqa(model, groups).eval()(ids[:, :-1], labels=ids[:, 1:]).item()

    groups, losses = grouping.asymgqa_search(head_similarity(model, calibration), n_kv_heads, uneven, loss,
                                             iterations, seed)  # fmt: skip
    log.info("AsymGQA: calibration loss %.4f -> %.4f over %d iterations", losses[0], losses[-1], iterations)
    return groups, losses


@torch.no_grad()
def _projection_outputs(model: CausalLM, calibration: torch.Tensor, layers: list[int], projections: tuple[str, ...]):
    """{(layer, projection): its output on ``calibration``, [tokens, width]}, by forward hooks."""
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [
        getattr(model.layers[i].mixer, proj).register_forward_hook(
            lambda _m, _inp, out, key=(i, proj): outputs.__setitem__(key, out.detach().flatten(0, -2))
        )
        for i in layers
        for proj in projections
    ]
    try:
        model(calibration.to(model.embed_tokens.weight.device))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _equal_groups(similarity: torch.Tensor, n_groups: int) -> list[list[int]]:
    size = similarity.shape[0] // n_groups
    free, groups = list(range(similarity.shape[0])), []
    while free:
        seed = free[0]
        ranked = sorted(free[1:], key=lambda h: -similarity[seed, h].item())
        group = [seed, *ranked[: size - 1]]
        groups.append(group)
        free = [h for h in free if h not in group]
    return groups


def _linkage_groups(similarity: torch.Tensor, n_groups: int) -> list[list[int]]:
    return grouping.linkage_hierarchy(similarity)[n_groups]


def _pool_heads(w: torch.Tensor, old_heads: int, new_heads: int, method: str) -> torch.Tensor:
    """[old_heads * D, ...] -> [new_heads * D, ...], pooling consecutive heads in groups: their mean, or with
    ``method="first"`` the first head's (method=similarity's groups are made consecutive first, then averaged)."""
    grouped = w.reshape(new_heads, old_heads // new_heads, w.shape[0] // old_heads, *w.shape[1:])
    pooled = grouped[:, 0] if method == "first" else grouped.mean(dim=1)
    return pooled.reshape(new_heads * grouped.shape[2], *w.shape[1:]).clone()
