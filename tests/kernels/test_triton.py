"""Triton kernels against their references, forward and every gradient, under TRITON_INTERPRET=1 on CPU.

Outputs the kernels allocate with torch.empty are NaN-filled here, so an
element a kernel fails to write shows up. Shapes are odd on purpose: T not a
multiple of the block, head dims like 48, value dims unlike key dims.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvlab.kernels.attention import absorbed_attention_reference, attention_reference
from kvlab.kernels.delta_rule import delta_rule_reference
from kvlab.kernels.linear_attention import linear_attention_reference
from kvlab.kernels.norm import rms_norm_reference
from kvlab.kernels.rope import apply_rope_tables_reference, rope_tables
from tests.conftest import rel_error

pytest.importorskip("triton")

TOL = 2e-5  # float32 under the interpreter: kernels and references differ by summation order only


@pytest.fixture(autouse=True)
def on_the_gpu_where_there_is_one():
    """On a CUDA machine (where tests/conftest.py leaves the interpreter off) every case runs compiled on the
    GPU: benchmarks/gpu.sh. Float32 dots are IEEE there (kvlab.kernels.triton_common.dot_precision)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    yield
    torch.set_default_device(None)


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _check(fn, reference, inputs, n_outputs=1):
    outs, refs = fn(*inputs), reference(*inputs)
    outs, refs = (outs, refs) if n_outputs > 1 else ((outs,), (refs,))
    grads_out = [torch.randn_like(r) for r in refs]
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(outs, wanted, grads_out)
    expected = torch.autograd.grad(refs, wanted, grads_out)
    for o, r in zip(outs, refs, strict=True):
        assert not o.isnan().any() and rel_error(o, r) < TOL
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert not g.isnan().any(), f"gradient {i} has unwritten elements"
        assert rel_error(g, e) < TOL, f"gradient {i}: relative error {rel_error(g, e):.2e}"


ATTENTION_CASES = {
    "causal": dict(causal=True),
    "full": dict(),
    "window": dict(causal=True, window=5),
    "documents": dict(doc_ids=True),
    "documents+window": dict(doc_ids=True, window=4),
    "capped": dict(causal=True, softcap=0.7),  # Gemma 2's soft cap: c tanh(s / c), low enough to bend these scores
}


HEADS = {"mha": (3, 3), "gqa": (6, 2), "mqa": (4, 1)}


def _flash_attention_cases():
    """Every (mask, head grouping) case; five, which between them take every mask and grouping, by default (each
    runs the interpreter for seconds), the rest with -m slow."""
    default = {("causal", "mha"), ("full", "gqa"), ("window", "mqa"), ("documents", "gqa"), ("documents+window", "mqa"),
               ("capped", "gqa")}  # fmt: skip
    for heads in HEADS:
        for case in ATTENTION_CASES:
            marks = () if (case, heads) in default else (pytest.mark.slow,)
            yield pytest.param(case, HEADS[heads], id=f"{heads}-{case}", marks=marks)


@pytest.mark.parametrize("case, heads", list(_flash_attention_cases()))
def test_flash_attention_matches_the_reference(case, heads):
    from kvlab.kernels.triton_attention import attention

    H, Hkv = heads
    B, T, D, DV = 2, 37, 48, 24
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = torch.randn(B, Hkv, T, D, requires_grad=True), torch.randn(B, Hkv, T, DV, requires_grad=True)
    kwargs = dict(ATTENTION_CASES[case])
    if kwargs.get("doc_ids"):
        kwargs["doc_ids"] = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [4] * 37])
    _check(lambda q, k, v: attention(q, k, v, **kwargs), lambda q, k, v: attention_reference(q, k, v, **kwargs),
           (q, k, v))  # fmt: skip


@pytest.mark.parametrize(
    "case, heads", [("causal", (6, 2)), pytest.param("documents+window", (4, 1), marks=pytest.mark.slow)]
)
def test_flash_attention_with_sink_logits_matches_the_reference(case, heads):
    """gpt-oss's sink logits in the kernel (a first key of score b_h and no value, in the online softmax), their
    gradient formed from the stored log-sum-exp: outputs and every gradient, the logits' included."""
    from kvlab.kernels.triton_attention import attention

    H, Hkv = heads
    B, T, D = 2, 37, 32
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = torch.randn(B, Hkv, T, D, requires_grad=True), torch.randn(B, Hkv, T, D, requires_grad=True)
    sinks = (torch.randn(H) * 2).requires_grad_()
    kwargs = dict(ATTENTION_CASES[case])
    if kwargs.get("doc_ids"):
        kwargs["doc_ids"] = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [4] * 37])
    _check(lambda q, k, v, s: attention(q, k, v, sink_logits=s, **kwargs),
           lambda q, k, v, s: attention_reference(q, k, v, sink_logits=s, **kwargs), (q, k, v, sinks))  # fmt: skip


@pytest.mark.parametrize("tile", [(32, 16), (16, 32)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", ["causal", "documents+window"])
def test_flash_attention_with_unequal_tiles(case, tile, monkeypatch):
    """GPU autotune configs pair unequal query and key tiles (128 x 32 ...); the interpreter runs the first
    config, so each kernel's list is swapped for one such tile here."""
    import triton

    from kvlab.kernels import triton_attention

    config = triton.Config({"BLOCK_M": tile[0], "BLOCK_N": tile[1]}, num_warps=1, num_stages=1)
    for kernel in (triton_attention._forward, triton_attention._backward_dkdv, triton_attention._backward_dq):
        monkeypatch.setattr(kernel, "configs", [config])
    q, k, v = (torch.randn(1, 2, 37, 32, requires_grad=True) for _ in range(3))
    kwargs = dict(ATTENTION_CASES[case])
    if kwargs.get("doc_ids"):
        kwargs["doc_ids"] = torch.tensor([[0] * 19 + [1] * 18])
    _check(lambda q, k, v: triton_attention.attention(q, k, v, **kwargs),
           lambda q, k, v: attention_reference(q, k, v, **kwargs), (q, k, v))  # fmt: skip


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_flash_attention_on_whole_tiles(causal):
    """Lengths a multiple of every tile and power-of-two head dims: the loads check no bounds (the other cases'
    odd shapes check them all)."""
    from kvlab.kernels.triton_attention import _largest_tile, _meta, attention

    q, k, v = (torch.randn(1, 2, 4 * _largest_tile(), 32, requires_grad=True) for _ in range(3))
    meta = _meta(q, k, v, None, None, causal, None)
    assert not meta["CHECK_LEN"] and not meta["CHECK_D"]
    _check(lambda *a: attention(*a, causal=causal), lambda *a: attention_reference(*a, causal=causal), (q, k, v))


def test_flash_attention_decodes_one_query_over_a_longer_cache():
    from kvlab.kernels.triton_attention import attention

    q = torch.randn(2, 4, 1, 32, requires_grad=True)
    k, v = torch.randn(2, 2, 21, 32, requires_grad=True), torch.randn(2, 2, 21, 32, requires_grad=True)
    _check(lambda *a: attention(*a, scale=0.3), lambda *a: attention_reference(*a, scale=0.3), (q, k, v))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("D", [48, 64])
def test_rms_norm_matches_the_reference(residual, D):
    from kvlab.kernels.triton_norm import rms_norm

    x, w = torch.randn(3, 7, D, requires_grad=True), torch.randn(D, requires_grad=True)
    r = torch.randn(3, 7, D, requires_grad=True) if residual else None
    _check(lambda x, w, r: rms_norm(x, w, 1e-5, r), lambda x, w, r: rms_norm_reference(x, w, 1e-5, r), (x, w, r),
           n_outputs=2 if residual else 1)  # fmt: skip


@pytest.mark.parametrize("dims", [(48, 48), (48, 16), (64, 32)], ids=["full", "partial-16", "partial-32"])
def test_rope_matches_the_reference(dims):
    from kvlab.kernels.triton_rope import apply_rope

    D, d = dims
    x = torch.randn(2, 3, 11, D, requires_grad=True)
    cos, sin = rope_tables(d, 10000.0, 11)
    _check(lambda x: apply_rope(x, cos, sin), lambda x: apply_rope_tables_reference(x, cos, sin), (x,))


DOCUMENTS = ("one-document", "packed")


def _documents(docs: str, T: int, second: int = 20):
    """None, or doc ids over T tokens: row 0 three documents (starting at 0, 5 and 5 + ``second``), row 1 one;
    made at the call, on the default device (the GPU's, where there is one)."""
    if docs == "one-document":
        return None
    return torch.tensor([[0] * 5 + [1] * second + [2] * (T - 5 - second), [3] * T])


def _linear_attention_cases():
    """Every (documents, decay, initial state, final-state gradient, read) case but exclusive reads without a
    final-state gradient (that path does not depend on the read); four of the twenty-four, which between them
    take every branch and every pair of documents and decay, by default (each runs the interpreter for
    seconds), the rest with -m slow."""
    default = {
        ("packed", True, True, True, True),
        ("one-document", False, False, False, False),
        ("packed", False, True, True, False),
        ("one-document", True, False, True, True),
    }
    for exclusive in (False, True):
        for final_grad in (False, True) if not exclusive else (True,):
            for with_state in (False, True):
                for vector in (False, True):
                    for docs in DOCUMENTS:
                        case = (docs, vector, with_state, final_grad, exclusive)
                        name = "-".join([
                            "exclusive" if exclusive else "inclusive",
                            "outputs+final-state" if final_grad else "outputs",
                            "initial-state" if with_state else "empty",
                            "vector-decay" if vector else "scalar-decay",
                            docs,
                        ])  # fmt: skip
                        marks = () if case in default else (pytest.mark.slow,)
                        yield pytest.param(*case, id=name, marks=marks)


@pytest.mark.parametrize("docs, vector, with_state, final_grad, exclusive", list(_linear_attention_cases()))
def test_recurrent_linear_attention_matches_the_reference(docs, vector, with_state, final_grad, exclusive):
    from kvlab.kernels.triton_linear_attention import linear_attention

    B, H, T, DK, DV = 2, 3, 21, 12, 20  # value dim over one block of 16 under the interpreter
    doc_ids = _documents(docs, T, second=9)  # the recurrent kernels' interpreted cost grows with T
    q, k, v = torch.randn(B, H, T, DK), torch.randn(B, H, T, DK), torch.randn(B, H, T, DV)
    log_decay = -torch.rand(B, H, T, *([DK] if vector else [])) * 0.5
    state = torch.randn(B, H, DK, DV) if with_state else None
    inputs = [t.requires_grad_() for t in (q, k, v, log_decay) + ((state,) if with_state else ())]

    def pick(fn):
        def call(q, k, v, g, state=None):
            out, final = fn(q, k, v, g, state=state, doc_ids=doc_ids, exclusive=exclusive)
            return (out, final) if final_grad else out

        return call

    recurrent = functools.partial(linear_attention, form="recurrent")
    _check(pick(recurrent), pick(linear_attention_reference), inputs, n_outputs=2 if final_grad else 1)


def _chunked_cases():
    """Every (documents, initial state, read, decay) case; a decay per key channel's cost 15-20 s each under the
    interpreter, so two of its eight, which between them take every branch, by default, the rest -m slow."""
    vector_default = {("packed", True, True), ("one-document", False, False)}
    for vector in (False, True):
        for exclusive in (False, True):
            for with_state in (False, True):
                for docs in DOCUMENTS:
                    slow = vector and (docs, with_state, exclusive) not in vector_default
                    name = "-".join([
                        "vector-decay" if vector else "scalar-decay", "exclusive" if exclusive else "inclusive",
                        "initial-state" if with_state else "empty", docs,
                    ])  # fmt: skip
                    yield pytest.param(docs, with_state, exclusive, vector, id=name,
                                       marks=(pytest.mark.slow,) if slow else ())  # fmt: skip


@pytest.mark.parametrize("docs, with_state, exclusive, vector", list(_chunked_cases()))
def test_chunked_linear_attention_matches_the_reference(docs, with_state, exclusive, vector):
    """The chunked form: T = 2 chunks + 5 is two chunks and a partial one (a decay per key channel: chunks of
    VECTOR_CHUNK in sub-chunks of 16, two under the interpreter, so keys and queries also meet across
    sub-chunks); packed documents start mid-chunk, and for a vector decay mid-sub-chunk; outputs and the final
    state both carry gradients."""
    from kvlab.kernels.triton_linear_attention import CHUNK, VECTOR_CHUNK, linear_attention

    chunk = VECTOR_CHUNK if vector else CHUNK  # 16 (32) interpreted, 64 on a GPU
    B, H, T, DK, DV = 2, 2 if vector else 3, 2 * chunk + 5, 12, 20
    q, k, v = torch.randn(B, H, T, DK), torch.randn(B, H, T, DK), torch.randn(B, H, T, DV)
    log_decay = -torch.rand(B, H, T, *([DK] if vector else [])) * 0.5
    log_decay[0, 0, 3] = -30.0  # a token that forgets everything before it
    state = torch.randn(B, H, DK, DV) if with_state else None
    inputs = [t.requires_grad_() for t in (q, k, v, log_decay) + ((state,) if with_state else ())]
    kwargs = dict(doc_ids=_documents(docs, T), exclusive=exclusive)
    _check(lambda q, k, v, g, s=None: linear_attention(q, k, v, g, state=s, form="chunked", **kwargs),
           lambda q, k, v, g, s=None: linear_attention_reference(q, k, v, g, state=s, **kwargs), inputs,
           n_outputs=2)  # fmt: skip


def test_chunked_linear_attention_with_a_constant_decay(monkeypatch):
    """RetNet's decays are constants: q, k, v and the initial state get their gradients, the decay's is never
    computed."""
    from kvlab.kernels import triton_linear_attention as tla

    B, H, T, DK, DV = 1, 2, tla.CHUNK + 7, 16, 24
    q, k, v = torch.randn(B, H, T, DK), torch.randn(B, H, T, DK), torch.randn(B, H, T, DV)
    log_decay = torch.log(1 - 2.0 ** (-1.0 - torch.arange(H, dtype=torch.float32)))[None, :, None].expand(B, H, T)
    state = torch.randn(B, H, DK, DV)
    inputs = [t.requires_grad_() for t in (q, k, v)] + [log_decay, state.requires_grad_()]
    monkeypatch.setattr(tla, "reverse_cumsum_within_documents", None)  # calling it would raise
    _check(lambda q, k, v, g, s: tla.linear_attention(q, k, v, g, state=s, form="chunked"),
           lambda q, k, v, g, s: linear_attention_reference(q, k, v, g, state=s), inputs, n_outputs=2)  # fmt: skip


@pytest.mark.parametrize("vector", [False, True], ids=["scalar-decay", "vector-decay"])
def test_chunked_linear_attention_in_half_precision_on_the_gpus_path(vector, monkeypatch):
    """On a GPU the chunked kernels multiply tiles in the inputs' dtype (tensor cores), where the interpreter
    upcasts them. fp16, which the interpreter computes natively (bf16 it does not), through the GPU's path:
    within fp16's rounding of float32 on the same inputs, gradients included."""
    from kvlab.kernels import triton_linear_attention as tla

    if torch.cuda.is_available():
        pytest.skip("on a GPU every chunked case runs this path")
    monkeypatch.setattr(tla, "interpreting", lambda: False)  # UPCAST off: the dtype GPUs multiply in
    B, H, T, D = 1, 2, 2 * (tla.VECTOR_CHUNK if vector else tla.CHUNK) + 5, 32
    half = [(torch.randn(B, H, T, D) * 0.3).half().requires_grad_() for _ in range(3)]
    log_decay = -torch.rand(B, H, T, *([D] if vector else [])) * 0.2
    cot = torch.randn(B, H, T, D)
    out, final = tla.linear_attention(*half, log_decay, form="chunked")
    grads = torch.autograd.grad((out.float() * cot).sum() + final.sum(), half)
    exact = [t.detach().float().requires_grad_() for t in half]
    ref_out, ref_final = linear_attention_reference(*exact, log_decay)
    ref_grads = torch.autograd.grad((ref_out * cot).sum() + ref_final.sum(), exact)
    assert out.dtype == torch.float16 and rel_error(out.float(), ref_out) < 3e-3
    assert rel_error(final, ref_final) < 3e-3
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float16 and rel_error(g.float(), r) < 3e-3


def test_linear_attention_kernel_forms():
    """auto: chunked over more than a chunk (VECTOR_CHUNK tokens for a decay per key channel), recurrent for
    decoding and shorter sequences; both forms agree on a sequence shorter than a chunk."""
    from kvlab.kernels import triton_linear_attention as tla

    calls = []
    original = tla._LinearAttention.apply
    T = tla.VECTOR_CHUNK + 8  # over one chunk of either kind
    q, k, v = torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16), torch.randn(1, 2, T, 16)
    scalar, vector = -torch.rand(1, 2, T), -torch.rand(1, 2, T, 16)
    short_vector = [t[:, :, : tla.VECTOR_CHUNK] for t in (q, k, v, vector)]  # one chunk: recurrent
    try:
        tla._LinearAttention.apply = lambda *args: calls.append(args[-1]) or original(*args)
        tla.linear_attention(q, k, v, scalar)
        tla.linear_attention(q, k, v, vector)
        tla.linear_attention(*short_vector)
        tla.linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], scalar[:, :, :1])
    finally:
        tla._LinearAttention.apply = original
    assert calls == [True, True, False, False]
    for decay in (scalar, vector):
        short = [t[:, :, :5] for t in (q, k, v, decay)]
        chunked, recurrent = (
            tla.linear_attention(*short, form="chunked"),
            tla.linear_attention(*short, form="recurrent"),
        )
        for c, r in zip(chunked, recurrent, strict=True):
            assert rel_error(c, r) < TOL
    with pytest.raises(ValueError, match="form='fused'"):
        tla.linear_attention(q, k, v, scalar, form="fused")


def test_mamba2_scan_runs_on_the_linear_attention_kernel(monkeypatch):
    """ssd has no kernel of its own: under ``triton`` its linear attention is Triton's. Mamba-1's selective_scan
    has its own (the test below)."""
    import kvlab.kernels.ops as ops_module
    from kvlab.kernels import registry
    from kvlab.kernels.ssm import ssd_reference

    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    used = []
    choose = registry.choose

    def spy(op, *args):
        backend = choose(op, *args)
        used.append((op, backend.name))
        return backend

    monkeypatch.setattr(registry, "choose", spy)
    x, dt = torch.randn(1, 7, 2, 4, requires_grad=True), (torch.rand(1, 7, 2) * 0.5).requires_grad_()
    A, B, C = -torch.rand(2), torch.randn(1, 7, 1, 4, requires_grad=True), torch.randn(1, 7, 1, 4, requires_grad=True)
    with registry.use_kernels("triton"):
        # one B/C group: the kernel gets one q/k head for both value heads (expanded in its wrapper)
        _check(lambda x, dt, B, C: ops_module.ssd(x, dt, A, B, C)[0],
               lambda x, dt, B, C: ssd_reference(x, dt, A, B, C)[0], (x, dt, B, C))  # fmt: skip
    assert ("linear_attention", "triton") in used and ("ssd", "torch") in used


def _recurrent_cases():
    """A recurrent kernel's (documents, initial state, final-state gradient) cases; two of the eight, which
    between them take every branch, by default (each runs the interpreter for seconds), the rest with -m slow."""
    default = {("packed", True, True), ("one-document", False, False)}
    for docs in DOCUMENTS:
        for with_state in (False, True):
            for final_grad in (False, True):
                name = (
                    f"{'outputs+final-state' if final_grad else 'outputs'}-{'initial-state' if with_state else 'empty'}"
                )
                marks = () if (docs, with_state, final_grad) in default else (pytest.mark.slow,)
                yield pytest.param(docs, with_state, final_grad, id=f"{name}-{docs}", marks=marks)


@pytest.mark.parametrize("docs, with_state, final_grad", list(_recurrent_cases()))
def test_selective_scan_kernel_matches_the_reference(docs, with_state, final_grad, monkeypatch):
    """Mamba-1's scan kernel, every gradient (A's and the initial state's included), through the registry's
    ``triton`` choice; 20 channels in blocks of 16, a state of 5 in a block of 8, 37 tokens in checkpointed
    chunks of 16 (the last partial)."""
    import kvlab.kernels.ops as ops_module
    from kvlab.kernels import registry
    from kvlab.kernels.ssm import selective_scan_reference

    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    Bsz, D, N, T = 2, 20, 5, 37
    inputs = [torch.randn(Bsz, D, T), torch.rand(Bsz, D, T) * 0.5, -torch.rand(D, N) * 2, torch.randn(Bsz, N, T),
              torch.randn(Bsz, N, T)]  # fmt: skip
    inputs += [torch.randn(Bsz, D, N, 1)] if with_state else []
    inputs = [t.clone().requires_grad_() for t in inputs]
    chosen = []

    def pick(fn):
        def call(u, delta, A, B, C, state=None):
            y, final = fn(u, delta, A, B, C, state=state, doc_ids=_documents(docs, T))
            return (y, final) if final_grad else y

        return call

    def kernel(*args, **kwargs):
        with registry.use_kernels("triton"):
            chosen.append(registry.choose("selective_scan", args, kwargs).name)
            return ops_module.selective_scan(*args, **kwargs)

    _check(pick(kernel), pick(selective_scan_reference), inputs, n_outputs=2 if final_grad else 1)
    assert chosen == ["triton"]


@pytest.mark.parametrize("docs, with_state, final_grad", list(_recurrent_cases()))
def test_recurrent_delta_rule_matches_the_reference(docs, with_state, final_grad):
    from kvlab.kernels.triton_delta_rule import delta_rule

    B, H, T, DK, DV = 2, 2, 37, 12, 20  # 3 checkpointed chunks of 16, the last one partial
    k = torch.nn.functional.normalize(torch.randn(B, H, T, DK), dim=-1)
    eta = torch.rand(B, H, T, DK)  # RWKV-7's in-context learning rate: a = -k eta, b = k eta
    inputs = [torch.randn(B, H, T, DK), k, torch.randn(B, H, T, DV), -torch.rand(B, H, T, DK) * 0.5, -k * eta, k * eta]
    inputs += [torch.randn(B, H, DK, DV)] if with_state else []
    inputs = [t.clone().requires_grad_() for t in inputs]

    def pick(fn):
        def call(q, k, v, g, a, b, state=None):
            out, final = fn(q, k, v, g, a, b, state=state, doc_ids=_documents(docs, T))
            return (out, final) if final_grad else out

        return call

    _check(pick(delta_rule), pick(delta_rule_reference), inputs, n_outputs=2 if final_grad else 1)


def test_gated_delta_rule_runs_on_the_recurrent_kernel():
    """Gated DeltaNet's and KDA's rule as the generalised one (here a decay per key channel, KDA's) against its
    recurrence."""
    from kvlab.kernels.delta_rule import gated_delta_rule_reference
    from kvlab.kernels.triton_delta_rule import gated_delta_rule

    B, H, T, DK, DV = 1, 2, 21, 8, 12
    k = torch.nn.functional.normalize(torch.randn(B, H, T, DK), dim=-1)
    inputs = [torch.randn(B, H, T, DK), k, torch.randn(B, H, T, DV), -torch.rand(B, H, T, DK) * 3,
              torch.rand(B, H, T), torch.randn(B, H, DK, DV)]  # fmt: skip
    inputs = [t.clone().requires_grad_() for t in inputs]

    def pick(fn):
        return lambda q, k, v, g, beta, state: fn(q, k, v, g, beta, state=state)

    _check(pick(gated_delta_rule), pick(gated_delta_rule_reference), inputs, n_outputs=2)


def test_mla_absorbed_decode_matches_the_reference():
    from kvlab.kernels.triton_attention import absorbed_attention

    q, latent = torch.randn(2, 4, 1, 80, requires_grad=True), torch.randn(2, 23, 80, requires_grad=True)
    _check(lambda q, c: absorbed_attention(q, c, 64, scale=0.1),
           lambda q, c: absorbed_attention_reference(q, c, 64, scale=0.1), (q, latent))  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [7, 1000], ids=["uneven-chunks", "one-chunk"])
def test_fused_cross_entropy_rows_match_the_plain_path(reduction, rows):
    from kvlab.kernels.cross_entropy import linear_cross_entropy_reference
    from kvlab.kernels.triton_cross_entropy import linear_cross_entropy

    # V = 301 spans two vocabulary blocks of the kernel (256 under the interpreter), the last one partial
    hidden = torch.randn(2, 23, 48, requires_grad=True)
    weight = (torch.randn(301, 48) * 0.3).requires_grad_()
    labels = torch.randint(0, 301, (2, 23))
    labels[:, ::5] = -100
    labels[0, 1], labels[1, 2] = 300, 0  # the first and last vocabulary entries as targets

    def fused(h, w):
        return linear_cross_entropy(h, w, labels, reduction=reduction, rows_per_chunk=rows)

    def plain(h, w):
        return linear_cross_entropy_reference(h, w, labels, reduction=reduction)

    _check(fused, plain, (hidden, weight))
    with torch.no_grad():
        per_row = linear_cross_entropy(hidden, weight, labels, reduction="none", rows_per_chunk=rows)
        expected = linear_cross_entropy_reference(hidden, weight, labels, reduction="none")
        assert not per_row.isnan().any() and rel_error(per_row, expected) < TOL


def test_fused_cross_entropy_carries_a_soft_cap():
    """Gemma 2's capped logits through the kernel's chunks: loss and gradients of the plain capped path."""
    from kvlab.kernels.cross_entropy import linear_cross_entropy_reference
    from kvlab.kernels.triton_cross_entropy import linear_cross_entropy

    hidden, weight = torch.randn(2, 23, 48, requires_grad=True), (torch.randn(301, 48) * 0.3).requires_grad_()
    labels = torch.randint(0, 301, (2, 23))
    labels[:, ::5] = -100
    _check(lambda h, w: linear_cross_entropy(h, w, labels, rows_per_chunk=7, softcap=1.5),
           lambda h, w: linear_cross_entropy_reference(h, w, labels, softcap=1.5), (hidden, weight))  # fmt: skip


@pytest.mark.parametrize("docs", [False, True], ids=["one-document", "packed"])
@pytest.mark.parametrize("with_prev", [False, True], ids=["zeros-before", "prev"])
def test_causal_conv_matches_the_reference(docs, with_prev):
    from kvlab.kernels.causal_conv import causal_conv1d_reference
    from kvlab.kernels.triton_causal_conv import causal_conv1d

    B, T, C, K = 2, 37, 40, 4  # T and C over one block of 16 / 32 under the interpreter, neither a multiple
    x, weight, bias = torch.randn(B, T, C), torch.randn(C, K), torch.randn(C)
    prev = torch.randn(B, K - 1, C) if with_prev else None
    doc_ids = torch.tensor([[0] * 2 + [1] * 20 + [2] * 15, [5] * 37]) if docs else None
    inputs = [t.requires_grad_() for t in (x, weight, bias) + ((prev,) if with_prev else ())]

    def pick(fn):
        return lambda x, w, b, p=None: fn(x, w, b, prev=p, doc_ids=doc_ids)

    _check(pick(causal_conv1d), pick(causal_conv1d_reference), inputs, n_outputs=2)


def test_causal_conv_decodes_a_token_and_runs_without_bias():
    from kvlab.kernels.causal_conv import causal_conv1d_reference
    from kvlab.kernels.triton_causal_conv import causal_conv1d

    x, weight, prev = torch.randn(3, 1, 24), torch.randn(24, 4), torch.randn(3, 3, 24)
    for got, expected in zip(causal_conv1d(x, weight, prev=prev), causal_conv1d_reference(x, weight, prev=prev),
                             strict=True):  # fmt: skip
        assert not got.isnan().any() and rel_error(got, expected) < TOL


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed+state"])
def test_diagonal_scan_matches_the_reference(packed):
    """Griffin's recurrence token by token in the kernel, its gradients walked back: 40 channels over blocks of 16
    under the interpreter, a zero decay (a reset) and decays to -6 a token."""
    from kvlab.kernels.diagonal_scan import diagonal_scan_reference
    from kvlab.kernels.triton_diagonal_scan import diagonal_scan

    B, T, W = 2, 37, 40
    log_decay = -torch.rand(B, T, W) * 6
    log_decay[0, 9, :5] = float("-inf")
    inputs = [torch.randn(B, T, W).requires_grad_(), log_decay.requires_grad_()]
    if packed:
        inputs.append(torch.randn(B, W).requires_grad_())
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [4] * 37]) if packed else None

    def pick(fn):
        return lambda x, g, s=None: fn(x, g, state=s, doc_ids=doc_ids)

    _check(pick(diagonal_scan), pick(diagonal_scan_reference), inputs, n_outputs=2)


@pytest.mark.parametrize("bits, group", [(2, 4), (4, 48), (8, 16)])
def test_dequantize_matches_the_reference(bits, group):
    from kvlab.kernels.quant import dequantize_reference, quantize
    from kvlab.kernels.triton_quant import dequantize

    x = torch.randn(3, 5, 2, 48)  # a width that is not a power of two
    for dtype in (torch.float32, torch.bfloat16):
        packed, scale, zero = quantize(x, bits, group, dtype)
        got = dequantize(packed, scale, zero, bits, dtype)
        want = dequantize_reference(packed, scale, zero, bits, dtype)
        assert got.dtype == dtype and not got.isnan().any()
        ulp = (2**-23 if dtype == torch.float32 else 2**-7) * float(want.abs().max())  # as the torch op's test
        torch.testing.assert_close(got, want, rtol=0, atol=ulp)


def test_float32_dots_follow_torchs_matmul_precision_and_autotuning_can_be_turned_off(monkeypatch):
    """Float32 kernels multiply in IEEE float32 while torch's float32 matmuls do ("highest", the default) and in
    TF32 once torch allows it; half inputs keep TF32. KVLAB_TRITON_AUTOTUNE=0 keeps the first GPU tile alone."""
    from kvlab.kernels.triton_common import dot_precision, tune_configs

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "tf32"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    tiles = [({"BLOCK_M": 64}, 4, 2), ({"BLOCK_M": 128}, 8, 3)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert [c.kwargs for c in tune_configs(tiles, {"BLOCK_M": 16})] == [{"BLOCK_M": 64}, {"BLOCK_M": 128}]
    monkeypatch.setenv("KVLAB_TRITON_AUTOTUNE", "0")
    assert [c.kwargs for c in tune_configs(tiles, {"BLOCK_M": 16})] == [{"BLOCK_M": 64}]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert [c.kwargs for c in tune_configs(tiles, {"BLOCK_M": 16})] == [{"BLOCK_M": 16}]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", pytest.param("float32", marks=pytest.mark.slow)])
def test_every_triton_kernel_compiles_for_a_gpu(dtype):
    """The interpreter runs a kernel's Python; only Triton's compiler checks what a GPU builds (a dot's operand
    types, layouts). Every kernel variant the entry points reach compiles for sm_90 here, without a GPU, and
    none is left unreached (tests/kernels/compile_for_gpu.py; float32's IEEE dots take minutes: slow)."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU every other test here compiles its kernels for real")
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no CUDA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.compile_for_gpu", "--dtype", dtype], env=env,
                          cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "kernel variants compiled for sm_90" in done.stdout
