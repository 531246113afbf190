"""Compiled steps: ``generate``'s decode step, one graph per (batch, cache length, dtype, device), and the
blocks of a training forward (``compiled_block``).

Decoding a token at these model sizes is mostly Python and per-op dispatch,
not arithmetic; ``torch.compile`` of the whole step removes them. The step
is ``CausalLM.decode_step``: its position is a 0-d tensor and every cache
slot is read whole and masked (``kvlab.layers.kv_cache``), so no shape and
no branch depends on how far decoding has gone and the graph is traced
once, not per token (gpt-fast's recipe). Cache lengths are rounded up to
one of eight buckets per octave (``cache_length``), so generations of
nearby lengths share a graph; Inductor keeps its compiled kernels on disk,
so a new process compiles faster than the first.

On a CPU the generated code calls the step's kernels from C++ (Inductor's
``cpp_wrapper``) rather than Python, which shortens a small model's step by
a tenth to a fifth. And there only a cache's first step goes through
TorchDynamo (whose guards check that the graph fits the cache, the weights
and the token, and whose bytecode gathers their tensors): the graph notes
the arguments it was called with, and the cache's later steps call it with
them directly, their own token and position swapped in (``_DirectCall``),
another seventh off a small model's step; without a gradient the call goes
past AOTAutograd's and Inductor's Python wrappers too, to the compiled code
itself (1-3% of a generation at batch 1). That is sound because a step
changes nothing of the cache but its tensors' values (checked on the first
step) and a cache keeps its tensors for its life; what a caller can change
between steps (the token's shape, the rows' pads, the context, the grad
mode) is checked each step, and sends the step through Dynamo again.

On a CUDA device the compiled step is also captured as a CUDA graph
(Inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"`` turns
on): a decode step of a small model is hundreds of kernel launches, and a
graph replays them with one. The cache's tensors are the graph's state:
they are marked static (``mark_static_address``), so the graph writes them
in place rather than copying them in and out each step, and a new cache (a
new ``generate`` call) re-records the graph once.

``compile`` is ``True``, ``False`` (eager: the ordinary cached forward,
``model(token, cache=cache)``, which slices the cache to what it holds) or
``None``: the ``KVLAB_COMPILE`` environment variable (``0`` or ``1``) if
set, else compile. When compilation is unavailable or fails, the step runs
eager and says why in a warning, once per model. ``model.decode_step``
itself also runs uncompiled, for debugging what the graph computes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref

import torch

from kvlab.kernels.registry import ISOLATED_COMPILE as _ISOLATED
from kvlab.kernels.registry import compile_wanted

log = logging.getLogger(__name__)

MIN_BUCKET = 64


def cache_length(needed: int, max_seq_len: int) -> int:
    """The cache length a compiled step is built for, so that nearby lengths reuse one graph: ``needed``
    rounded up to a multiple of a sixteenth of the power of two above it (at least MIN_BUCKET), at most
    ``max_seq_len``. Eight buckets per octave: a cache is at most 1/8 longer than needed (a power-of-two
    bucket could double a long context's cache)."""
    step = max(MIN_BUCKET, 1 << max(0, (needed - 1).bit_length() - 4))
    return min(max_seq_len, -(-needed // step) * step)


class DecodeStep:
    """``model.decode_step`` behind ``torch.compile`` (or eager), advancing the cache it is given.

    Called, it returns the step's logits; ``next_tokens`` returns the greedy choice itself, taken inside the
    graph (a graph of its own). ``compile_seconds`` maps (batch, cache length, dtype, device, padded rows,
    "logits" or "tokens") to the seconds the first step of that shape took: compilation (Inductor's disk cache
    shortens it in later processes)."""

    def __init__(self, model, compile: bool, backend: str = "inductor"):
        self.model, self.backend = model, backend  # another backend: tests trace cheaply ("eager", "aot_eager")
        self.compile_seconds: dict[tuple, float] = {}
        self.fallback_reason: str | None = None
        self.compiled = compile
        self._graphs: dict[tuple, object] = {}
        # On CPUs the step's graphs note their latest call, which later steps of a cache repeat (_DirectCall).
        # Inductor's hundred-odd kernel and matmul calls there are made from generated C++, not Python: a gqa
        # step at batch 1 took 1.01-1.12 ms against 1.19-1.21 (benchmarks/RESULTS.md, "Compiled decoding").
        self._recorder = _RecordingBackend(backend, {"cpp_wrapper": True} if backend == "inductor" else {})
        # cache -> {returns tokens: _DirectCall, or False where its steps cannot bypass Dynamo}
        self._direct: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # What layers compute from their parameters alone and hold for the step (MatryoshkaKV's bases): solved
        # at a cache's first step and when their parameters change in place, outside the graph, which reads them
        self._holders = [m for m in model.modules() if hasattr(m, "hold_for_inference") and m.cfg.kv_ranks is not None]
        self._held_for: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the caches they were solved for
        if compile and not getattr(model, "static_decode", True):  # by design: said once, not warned
            self.fallback_reason, self.compiled = f"{type(model).__name__} decodes eagerly", False
            log.info("decoding eager: %s", self.fallback_reason)
        elif compile and not torch._dynamo.is_dynamo_supported():
            self._fall_back("torch.compile is not supported on this Python/platform")

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self.compiled = False
        log.warning("decoding eager: the compiled decode step is unavailable (%s)", reason)

    def _compile(self, device_type: str, tokens: bool):
        # One compile call per shape, its entries kept apart from other models' and shapes' (isolated), so
        # the guards on the model's modules can go: evaluating them each step cost as much as a layer.
        # Tensor guards stay (the cache's shapes and dtypes).
        skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        options = {"guard_filter_fn": skip_module_guards} if skip_module_guards is not None else {}
        if self.backend == "inductor" and device_type == "cuda":
            options["triton.cudagraphs"] = True
        return torch.compile(
            _greedy(self.model) if tokens else self.model.decode_step,
            backend=self._recorder if device_type == "cpu" else self.backend,
            fullgraph=True,
            dynamic=False,
            options=options,
            **_ISOLATED,
        )

    def __call__(self, token: torch.Tensor, cache) -> torch.Tensor:
        """Logits [B, vocab] of ``token`` [B, 1] after what ``cache`` holds; the cache advances by one."""
        return self._step(token, cache, tokens=False)

    def next_tokens(self, token: torch.Tensor, cache) -> torch.Tensor:
        """The greedy next tokens [B] (the logits' first maximum) after ``token`` [B, 1]; the cache advances by
        one. Compiled, the choice is made in the step's graph, not by an eager ``max`` over the vocabulary after
        it (x1.02 to x1.03 on a batch-1 generation, benchmarks/RESULTS.md)."""
        return self._step(token, cache, tokens=True)

    def _step(self, token: torch.Tensor, cache, tokens: bool) -> torch.Tensor:
        out = self._compiled_step(token, cache, tokens) if self.compiled else None
        if out is None:  # eager: the ordinary cached forward, which slices rather than masks (faster)
            logits = self.model(token, cache=cache)[:, -1]
            return logits.max(dim=-1).indices if tokens else logits
        cache.seen += 1
        return out

    def _compiled_step(self, token: torch.Tensor, cache, tokens: bool) -> torch.Tensor | None:
        """The compiled step's logits (the greedy tokens with ``tokens``); None when compiling it failed just now
        (then decoding is eager)."""
        if cache.seen >= cache.max_len:
            raise ValueError(f"cache holds {cache.seen} tokens; 1 more exceeds its max_len={cache.max_len}")
        if self._holders and not torch.is_grad_enabled():
            again = cache not in self._held_for
            if any([m.hold_for_inference(again) for m in self._holders]):
                self._direct.pop(cache, None)  # new held tensors: the arguments a direct call would pass are stale
            self._held_for[cache] = True
        direct = self._direct.get(cache, {}).get(tokens)
        if direct and direct.fits(token, cache):
            return direct(token, cache)
        start = torch.tensor(cache.start, device=token.device)
        record = token.device.type == "cpu" and direct is not False
        self._recorder.inner = record and not torch.is_grad_enabled()
        # padded rows read their pads from the cache: a graph of their own
        key = (token.shape[0], cache.max_len, cache.dtype, token.device.type, cache.pads is not None,
               "tokens" if tokens else "logits")  # fmt: skip
        cuda_graph = token.device.type == "cuda" and self.backend == "inductor"
        if cuda_graph:
            if not getattr(cache, "_static_marked", False):  # once per cache
                for t in cache_tensors(cache):
                    torch._dynamo.mark_static_address(t)
                cache._static_marked = True
            # the last step's output (read already) may be overwritten by this replay
            torch.compiler.cudagraph_mark_step_begin()
        graph = self._graphs.get(key)
        if record:
            self._recorder.last, before = None, _python_state(cache)
        try:
            result = self._traced_step(graph, key, token, cache, start, tokens)
        finally:
            self._recorder.inner = False
        if result is None:
            return None
        if record and self._recorder.last is not None:
            # a step that changed no attribute of the cache (only its tensors' values) can be bypassed
            unchanged = _python_state(cache) == before
            self._direct.setdefault(cache, {})[tokens] = (
                unchanged and _DirectCall.of(self._recorder.last, token, start, result, cache) or False
            )
            self._recorder.last = None  # its arguments hold the cache's tensors: kept only with the cache
        return result.clone() if cuda_graph else result  # a graph's output is overwritten by its next replay

    def _traced_step(self, graph, key, token, cache, start, tokens: bool) -> torch.Tensor | None:
        """The step through TorchDynamo, compiling its graph first where ``graph`` is None (None: that failed, or
        retracing an existing graph did: a cache of another layout, as a cache policy's, fails its guards)."""
        if graph is not None:
            try:
                return graph(token, cache, start)
            except Exception as e:  # noqa: BLE001 - Dynamo's retrace failed before running: decode eager, say why
                self._fall_back(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                return None
        t0 = time.perf_counter()
        try:
            graph = self._compile(token.device.type, tokens)
            result = graph(token, cache, start)
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode eager, say why
            self._fall_back(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        self._graphs[key] = graph
        self.compile_seconds[key] = time.perf_counter() - t0
        log.info("compiled the decode step for batch %d, cache length %d (%s, %s, padded rows: %s, %s) in %.1f s",
                 *key, self.compile_seconds[key])  # fmt: skip
        return result


class _RecordingBackend:
    """TorchDynamo's ``backend`` (Inductor with the config ``options``), each graph it compiles noting its
    latest call: the compiled callable, the arguments Dynamo gathered and what it returned (``_DirectCall``);
    while ``inner`` is set, also Inductor's own call below AOTAutograd's wrappers (``_innermost_call``)."""

    def __init__(self, backend: str, options: dict):
        self.backend, self.options, self.last, self.inner = backend, options, None, False

    def __call__(self, graph_module, example_inputs):
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx  # what backend="inductor" calls

            with _dense_unit_strides() as cache_key:
                options = self.options if cache_key is None else {**self.options, **cache_key}
                graph = compile_fx(graph_module, example_inputs, config_patches=options)
        else:
            graph = torch._dynamo.lookup_backend(self.backend)(graph_module, example_inputs)

        def run(*args):
            if not self.inner:
                out = graph(*args)
                self.last = (graph, args, out, None)
                return out
            # (tensors made under torch.inference_mode keep no version: nothing marks them written)
            versions = [a._version if isinstance(a, torch.Tensor) and not a.is_inference() else None for a in args]
            with _innermost_call() as calls:
                out = graph(*args)
            # what the wrappers marked as written (the cache's tensors): a direct call marks them too
            written = [a for a, v in zip(args, versions, strict=True) if v is not None and a._version != v]
            self.last = (graph, args, out, (calls, written))
            return out

        return run


@contextlib.contextmanager
def _innermost_call():
    """While a compiled graph runs in this thread: the calls of Inductor's compiled code below AOTAutograd's and
    Inductor's Python wrappers, as [callable, its arguments, its outputs] (empty where this torch has no
    ``CompiledFxGraph``). Those wrappers (six frames, contexts, runtime checks) took 20-40 us of a 0.9 ms step at
    batch 1; a direct call past them is what ``_DirectCall.of`` builds from a call recorded here."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:
        yield []
        return
    original = CompiledFxGraph.__dict__.get("__call__")
    if original is None:
        yield []
        return
    calls, thread = [], threading.get_ident()

    def recorded(graph, inputs):
        if threading.get_ident() != thread:
            return original(graph, inputs)
        call = [graph.current_callable, list(inputs), None]  # (the callable empties the list it is given)
        calls.append(call)
        call[2] = original(graph, inputs)
        return call[2]

    CompiledFxGraph.__call__ = recorded
    try:
        yield calls
    finally:
        CompiledFxGraph.__call__ = original


@contextlib.contextmanager
def _dense_unit_strides():
    """While Inductor compiles a CPU step: the views it passes to its extern kernels (matrix multiplies) get a
    dense stride in their size-1 dimensions, not the 0 it reads off an index that does not depend on them.

    Any stride addresses a size-1 dimension alike, but ATen's ``mm`` takes a row of stride 0 for a matrix BLAS
    cannot read and copies it first: at batch 1 every product of a view's single row, 13 copies in a gqa step,
    73 in rwkv7's, 2-5% of a generation (benchmarks/RESULTS.md, "Compiled decoding"). Yields the config entry that
    keeps graphs compiled so apart in Inductor's cache (a no-op pass whose uuid names this), or None and
    changes nothing where this torch's Inductor lacks what it replaces."""
    try:
        from torch._inductor import ir
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:
        yield None
        return
    original = ir.ExternKernel.__dict__.get("convert_to_reinterpret_view")
    if not isinstance(original, classmethod) or not hasattr(ir, "FixedLayout"):
        yield None
        return

    def dense(cls, x):
        view = original.__func__(cls, x)
        try:
            size, stride = list(view.layout.size), list(view.layout.stride)
            for i in reversed(range(len(size))):
                if size[i] == 1:
                    stride[i] = stride[i + 1] * size[i + 1] if i + 1 < len(size) else 1
            if stride == list(view.layout.stride):
                return view
            layout = ir.FixedLayout(device=view.layout.device, dtype=view.layout.dtype, size=size, stride=stride,
                                    offset=view.layout.offset)  # fmt: skip
            return ir.ReinterpretView(data=view.data, layout=layout)
        except Exception:  # noqa: BLE001 - another torch's IR: its own view, as Inductor made it
            return view

    class Marker(CustomGraphPass):
        def __call__(self, graph) -> None:
            pass

        def uuid(self) -> str:
            return "kvlab: dense strides in size-1 dimensions of extern kernels' views, 2"

    ir.ExternKernel.convert_to_reinterpret_view = classmethod(dense)
    try:
        yield {"post_grad_custom_post_pass": Marker()}
    finally:
        ir.ExternKernel.convert_to_reinterpret_view = original


class _DirectCall:
    """A compiled step's graph called without TorchDynamo, for one cache: the arguments Dynamo gathered on the
    cache's first step (its tensors, the weights), each later step's token and position swapped in.

    What Dynamo's guards would check each step, and could change between steps, is checked here: the
    token's shape and dtype, the rows' pads, the context's length and the grad mode (the cache's other
    attributes and the tensors it holds stay as they are for its life; weights are updated in place).

    Without a gradient, the call goes further down, to Inductor's compiled code itself (``_innermost_call``),
    where what AOTAutograd's wrappers do around it for such a step is nothing but marking the cache's tensors as
    written: it takes the same arguments, every one of them the step's own (none made per call), and returns the
    same outputs (no mutated input to copy back, no alias to rebuild). Else the wrappers' entry, as Dynamo calls
    it."""

    __slots__ = ("graph", "args", "token_at", "start_at", "output_at", "boxed", "written", "token_meta", "pads",
                 "context_len", "grad")  # fmt: skip

    @classmethod
    def of(cls, last, token, start, result, cache) -> _DirectCall | None:
        """From a graph's recorded call (graph, args, outputs, and the innermost call or None) that computed
        ``result`` (the step's logits or tokens) of ``token`` at ``start``; None where the arguments or outputs
        do not hold them as such (then each step goes through Dynamo)."""
        graph, args, outputs, inner = last
        call = cls()
        call.token_meta = (token.shape, token.dtype, token.device)
        call.pads, call.context_len, call.grad = cache.pads, cache.context_len, torch.is_grad_enabled()
        below = _passed_through(inner, args, outputs, start)
        if below is not None and call._takes(*below[:3], token, start, result, boxed=True):
            call.written = below[3]
            return call
        if call._takes(graph, args, outputs, token, start, result, boxed=False):
            return call
        return None

    def _takes(self, graph, args, outputs, token, start, result, boxed: bool) -> bool:
        """Calls ``graph`` with ``args`` (as one list where ``boxed``), which returned ``outputs``; False where the
        token or the result are not among them (the position may be absent: a recurrent model's graph does not read
        it). The token's and the position's places are left empty."""
        self.graph, self.args, self.boxed, self.written = graph, list(args), boxed, None
        self.token_at, self.start_at = _index(args, token), _index(args, start)
        self.output_at = _index(outputs, result) if isinstance(outputs, (list, tuple)) else None
        for at in (self.token_at, self.start_at):
            if at is not None:
                self.args[at] = None  # (a step's own, not kept)
        return self.token_at is not None and self.output_at is not None

    def fits(self, token, cache) -> bool:
        return (
            (token.shape, token.dtype, token.device) == self.token_meta
            and cache.pads is self.pads
            and cache.context_len == self.context_len
            and torch.is_grad_enabled() == self.grad
        )

    def __call__(self, token, cache):
        args = self.args.copy() if self.boxed else self.args  # (a boxed callable empties the list it is given)
        args[self.token_at] = token
        if self.start_at is not None:
            args[self.start_at] = torch.tensor(cache.start, device=token.device)
        if self.boxed:
            result = self.graph(args)[self.output_at]
            if self.written:
                torch.autograd.graph.increment_version(self.written)
            return result
        result = self.graph(*args)[self.output_at]
        args[self.token_at] = None  # not kept past the step
        return result


def _passed_through(inner, args, outputs, start):
    """(Inductor's compiled callable, its arguments, its outputs, the tensors it writes) from a step's innermost
    call (``_innermost_call``, with the tensors the wrappers marked written), where the wrappers above it passed
    the step's arguments and outputs through as they are: one call, every argument one of the step's own, the
    same outputs, the position among its arguments where it is among the step's. Else None."""
    if inner is None or len(inner[0]) != 1:
        return None
    (compiled, inner_args, inner_outputs), written = inner[0][0], inner[1]
    ours = {id(a) for a in args if isinstance(a, torch.Tensor)}
    if not (
        isinstance(inner_outputs, (list, tuple))
        and len(inner_outputs) == len(outputs)
        and all(a is b for a, b in zip(inner_outputs, outputs, strict=True))
        and all(id(a) in ours for a in inner_args)
        and (_index(args, start) is None) == (_index(inner_args, start) is None)
    ):
        return None
    return compiled, inner_args, inner_outputs, written


def _index(items, item) -> int | None:
    """Where ``item`` itself (not an equal value) is in ``items``."""
    return next((i for i, x in enumerate(items) if x is item), None)


def _greedy(model):
    """``model.decode_step`` followed by the greedy choice, for one graph: (token, cache, start) -> tokens [B]."""

    def greedy_step(token, cache, start):
        return model.decode_step(token, cache, start).max(dim=-1).indices

    return greedy_step


def _parts(obj) -> list | None:
    """What a cache's container holds, as (key, value) pairs: a list's or tuple's items, a dict's entries, a kvlab
    object's attributes; None for anything else (a leaf)."""
    if isinstance(obj, (list, tuple)):
        return list(enumerate(obj))
    if isinstance(obj, dict):
        return list(obj.items())
    if type(obj).__module__.startswith("kvlab.") and hasattr(obj, "__dict__"):
        return list(vars(obj).items())
    return None


def _python_state(obj, seen: set | None = None):
    """What a step could change of a cache other than its tensors' values: every attribute but the position
    ``seen`` (which the caller advances), tensors by identity, nested lists, dicts and kvlab objects."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return ("tensor", id(obj))
    parts = _parts(obj)
    if parts is None:
        return obj
    if id(obj) in seen:
        return ("again", id(obj))
    seen.add(id(obj))
    return tuple((k, _python_state(v, seen)) for k, v in parts if k != "seen")


def cache_tensors(obj, seen: set | None = None) -> list[torch.Tensor]:
    """Every tensor a cache holds: its attributes, lists, tuples and dicts, and kvlab objects among them."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return [obj]
    parts = _parts(obj)
    if parts is None or id(obj) in seen:
        return []
    seen.add(id(obj))
    return [t for _, item in parts for t in cache_tensors(item, seen)]


class _Compiled(dict):
    """What was compiled for one module, kept on it (so it is freed with it: a weak map from the module
    would be kept alive by the compiled code's own reference) but never copied or pickled with it."""

    def __deepcopy__(self, memo):
        return _Compiled()

    def __reduce__(self):
        return (_Compiled, ())


def _compiled_for(module) -> _Compiled:
    held = module.__dict__.get("_kvlab_compiled")
    if held is None:  # set in __dict__: nn.Module's __setattr__ would register compiled modules as children
        held = module.__dict__["_kvlab_compiled"] = _Compiled()
    return held


def decode_step_for(model, compile: bool | None = None) -> DecodeStep:
    """The model's decode step, made once per model and choice."""
    wanted = compile_wanted(compile)
    held = _compiled_for(model)
    if ("decode", wanted) not in held:
        held[("decode", wanted)] = DecodeStep(model, wanted)
    return held[("decode", wanted)]


def compiled_block(block, backend: str):
    """``block`` behind ``torch.compile`` with ``backend``, made once per block and backend (its state dict
    and copies are the eager block's). Graph breaks are allowed: the few per-document loops of packed
    training (Infini-attention, FLASH) run between graphs."""
    held = _compiled_for(block)
    if ("block", backend) not in held:
        held[("block", backend)] = torch.compile(block, backend=backend, dynamic=False, **_ISOLATED)
    return held[("block", backend)]
