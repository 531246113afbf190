"""The per-layer plan: what each layer is and what it takes from other layers, resolved once.

``ModelConfig`` expands the YAML users write (``mixer``, ``pattern`` +
``mixers``, ``kv_source``, ``kv_sharing``, or ``layers``) into a tuple of
frozen ``LayerPlan``s, one per layer: the layer's resolved mixer config, its
MLP and norm, and its typed ``reads`` of other layers (``Read("kv", j)``:
attend to layer j's keys/values; ``Read("values", 0)``: a value residual;
``Read("attention", j)``: apply layer j's attention probabilities to this
layer's own values, Shared Attention; ``Read("encoder", e)``: cross-attend to
the context encoder's output after its layer e, CEPE and XC-Cache).
The decoder builds and runs layers from the plan alone, and ``check_plan``
refuses, naming the layers, what the mixers' declared capabilities
(``kvlab.layers.base.MixerConfig``) do not allow.

A layer may read a later layer's keys/values (LCKV; the top and middle
targets of Wu et al. 2024). The layers from the first such reader to the
last layer read that way (``cycle_span``) then run in parallel passes: each
pass reads what the later layers gave in the pass before (nothing at first),
so pass n settles token n; ``passes.no_grad`` passes run without gradients,
then ``passes.grad`` passes with them (the paper's m and b).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab._config import check_choice, check_int
from kvlab.layers import MixerConfig, MLPConfig, NormConfig
from kvlab.layers.base import READ_KINDS, READ_NAMES

PREFILLS = ("parallel", "sequential")


@dataclass(frozen=True)
class Read:
    """Layer ``layer``'s ``what`` (one of ``READ_KINDS``), taken by the layer whose plan holds this."""

    what: str
    layer: int

    def is_later(self, reader: int) -> bool:
        """Whether this reads a layer above ``reader`` (parallel passes); an encoder's layers are not the
        decoder's, so never."""
        return self.what != "encoder" and self.layer > reader

    def describe(self, reader: int) -> str:
        if self.what == "encoder":
            return f"context encoder (its layer {self.layer})"
        return f"{self.what} of {self.layer}" + (" (later)" if self.is_later(reader) else "")


@dataclass(frozen=True)
class LayerPlan:
    index: int
    mixer: MixerConfig
    mlp: MLPConfig
    norm: NormConfig
    reads: tuple[Read, ...] = ()

    @property
    def kv_source(self) -> int:
        """The layer whose keys/values this layer attends to: itself unless it reads another's."""
        return next((r.layer for r in self.reads if r.what == "kv"), self.index)

    @property
    def attention_source(self) -> int:
        """The layer whose attention probabilities this layer uses: itself unless it reads another's."""
        return next((r.layer for r in self.reads if r.what == "attention"), self.index)

    def describe(self) -> str:
        reads = ", ".join(r.describe(self.index) for r in self.reads)
        return f"{self.index}: {self.mixer.kind}" + (f" <- {reads}" if reads else "")


@dataclass
class PassesConfig:
    """How layers that read later layers run: ``no_grad`` parallel passes without gradients, then ``grad``
    passes with them (LCKV's m and b: 7 and 2); a prompt given with a cache is prefilled by the same passes
    (``prefill: parallel``, as LCKV's code does) or token by token, exactly (``sequential``)."""

    no_grad: int = 7
    grad: int = 2
    prefill: str = "parallel"

    def validate(self, path: str) -> None:
        check_int(self.no_grad, f"{path}.no_grad", minimum=0)
        check_int(self.grad, f"{path}.grad", minimum=1)
        check_choice(self.prefill, f"{path}.prefill", PREFILLS)

    @property
    def total(self) -> int:
        return self.no_grad + self.grad


def cycle_span(plan: tuple[LayerPlan, ...]) -> tuple[int, int] | None:
    """(first, last) layer of the span that parallel passes rerun, or None when no layer reads a later one."""
    later = [(p.index, r.layer) for p in plan for r in p.reads if r.is_later(p.index)]
    if not later:
        return None
    return min(i for i, _ in later), max(j for _, j in later)


class PlanError(ValueError):
    """A read the plan cannot serve; ``read`` and ``layer`` say which, so a config can name its own field."""

    def __init__(self, message: str, layer: int | None = None, read: Read | None = None):
        super().__init__(message)
        self.layer, self.read = layer, read


def _attention_read_problem(reader: LayerPlan, source: LayerPlan) -> str | None:
    """Why ``reader`` cannot apply ``source``'s attention probabilities to its own values (None: it can)."""
    if source.attention_source != source.index:
        return f"layer {source.index} reads layer {source.attention_source}'s itself; point at that layer"
    if source.kv_source > source.index:
        return f"layer {source.index} attends to a later layer's K/V (parallel passes), whose weights change by pass"
    if reader.kv_source != reader.index:
        return f"it reads layer {reader.kv_source}'s K/V too; a layer sharing weights caches its own values"
    return None


def check_plan(plan: tuple[LayerPlan, ...], max_seq_len: int) -> None:
    """Raise PlanError (a ValueError), naming the layers, for a read the mixers cannot serve or passes
    cannot run."""
    n = len(plan)
    for p in plan:
        problem = p.mixer.context_problem(max_seq_len)
        if problem is not None:
            raise ValueError(f"layer {p.index}: {problem}")
        for r in p.reads:
            check_choice(r.what, f"layer {p.index}: read of layer {r.layer}", READ_KINDS)
            if r.what == "encoder":  # the context encoder's layer, not the decoder's: ContextConfig checks it
                continue
            cannot = f"layer {p.index} cannot read layer {r.layer}'s {READ_NAMES[r.what]}"
            if not (0 <= r.layer < n):
                raise PlanError(f"{cannot}: there is no layer {r.layer} (layers 0..{n - 1})", p.index, r)
            if r.layer == p.index:
                continue
            source = plan[r.layer]
            if r.layer > p.index and r.what != "kv":
                raise PlanError(f"{cannot}: of later layers only keys/values can be read (by parallel passes)",
                                p.index, r)  # fmt: skip
            problem = p.mixer.read_problem(r.what, source.mixer, later=r.layer > p.index)
            if problem is not None:
                raise PlanError(f"{cannot}: {problem}", p.index, r)
            if r.what == "kv" and source.kv_source != r.layer:
                raise PlanError(
                    f"{cannot}: layer {r.layer} reads layer {source.kv_source} itself; point at a layer that "
                    f"computes its own",
                    p.index,
                    r,
                )
            if r.what == "kv" and source.attention_source != r.layer:  # SA's reader: values alone, no keys
                raise PlanError(f"{cannot}: layer {r.layer} applies layer {source.attention_source}'s attention "
                                f"weights and has no keys of its own", p.index, r)  # fmt: skip
            if r.what == "values" and source.kv_source != r.layer:  # it would publish none: an error mid-forward
                raise PlanError(f"{cannot}: layer {r.layer} reads layer {source.kv_source}'s K/V and computes no "
                                f"values of its own", p.index, r)  # fmt: skip
            if r.what == "attention":
                problem = _attention_read_problem(p, source)
                if problem is not None:
                    raise PlanError(f"{cannot}: {problem}", p.index, r)
    span = cycle_span(plan)
    if span is None:
        return
    low, high = span
    for p in plan[low : high + 1]:
        owns = p.kv_source == p.index
        if (owns and not p.mixer.cache_rewritable()) or p.mlp.stateful:
            what = f"mlp {p.mlp.kind}" if p.mlp.stateful else f"mixer {p.mixer.kind}"
            raise PlanError(
                f"layer {p.index} ({what}) lies in the cycle of layers {low}..{high} (layer {low} reads a later "
                f"layer), which parallel passes rerun; its cache state cannot be computed twice: move it outside "
                f"layers {low}..{high}"
            )
