"""Each op's fast path against its reference, and the external wrappers' layout conversions.

flash-attn and mamba-ssm cannot be installed here (CUDA only), so the
wrappers in ``kvlab.kernels.external`` run against stand-ins written from
those packages' documented contracts (layouts, window sizes, cu_seqlens,
seq_idx, state layouts): what is tested is our side of the call.
"""

import sys
import types

import pytest
import torch

import kvlab.kernels.attention as attention_module
import kvlab.kernels.ssm as ssm_module
from kvlab.kernels import external, ops, registry
from kvlab.kernels.attention import (
    absorbed_attention,
    absorbed_attention_reference,
    attention,
    attention_reference,
)
from kvlab.kernels.causal_conv import causal_conv1d, causal_conv1d_reference
from kvlab.kernels.diagonal_scan import diagonal_scan_reference
from kvlab.kernels.ssm import selective_scan, selective_scan_reference, ssd, ssd_reference
from tests.conftest import rel_error

DOCS = torch.tensor([[0] * 9 + [1] * 14, [3] * 23])


@pytest.mark.parametrize(
    "kwargs", [dict(causal=True, window=6), dict(doc_ids=DOCS), dict(doc_ids=DOCS, window=5)], ids=str
)
def test_attention_structured_masks_match_the_reference(kwargs):
    q, k, v = torch.randn(2, 4, 23, 16), torch.randn(2, 2, 23, 16), torch.randn(2, 2, 23, 8)
    assert rel_error(attention(q, k, v, **kwargs), attention_reference(q, k, v, **kwargs)) < 1e-5


@pytest.mark.parametrize("queries", [3, 1])
def test_absorbed_attention_matches_the_reference(queries, monkeypatch):
    """One query per head: the scores as products and sums, as a compiled CPU step over a short cache takes them."""
    monkeypatch.setattr(attention_module, "_short_compiled_cpu_latent", lambda q, latent: q.shape[2] == 1)
    q, latent = torch.randn(2, 4, queries, 24), torch.randn(2, 11, 24)
    mask = torch.ones(3, 11, dtype=torch.bool).tril(8)[-queries:]
    expected = absorbed_attention_reference(q, latent, 16, mask=mask, scale=0.2)
    assert rel_error(absorbed_attention(q, latent, 16, mask=mask, scale=0.2), expected) < 1e-5


def _ssd_inputs(T=23, G=2):
    x = torch.randn(2, T, 4, 6, dtype=torch.float64)
    dt = torch.rand(2, T, 4, dtype=torch.float64) * 0.5
    A = -torch.rand(4, dtype=torch.float64) * 2
    B, C = torch.randn(2, T, G, 5, dtype=torch.float64), torch.randn(2, T, G, 5, dtype=torch.float64)
    return x, dt, A, B, C


def _scan_inputs(T=23):
    u, delta = torch.randn(2, 6, T, dtype=torch.float64), torch.rand(2, 6, T, dtype=torch.float64) * 0.5
    A = -torch.rand(6, 5, dtype=torch.float64) * 2
    return u, delta, A, torch.randn(2, 5, T, dtype=torch.float64), torch.randn(2, 5, T, dtype=torch.float64)


def test_ssd_and_selective_scan_chunked_equal_their_recurrences():
    state, inputs = torch.randn(2, 4, 5, 6, dtype=torch.float64), _ssd_inputs()
    for kwargs in (dict(state=state), dict(doc_ids=DOCS)):
        for a, b in zip(ssd(*inputs, chunk_size=8, **kwargs), ssd_reference(*inputs, **kwargs), strict=False):
            assert rel_error(a, b) < 1e-10
    inputs = _scan_inputs()
    for a, b in zip(
        selective_scan(*inputs, chunk_size=8, doc_ids=DOCS),
        selective_scan_reference(*inputs, doc_ids=DOCS),
        strict=False,
    ):
        assert rel_error(a, b) < 1e-10


@pytest.mark.parametrize("block", [5, 64])
def test_selective_scan_without_gradients_matches_the_float64_recurrence(block, monkeypatch):
    """A prefill's scan (nothing needs a gradient): blocks of tokens formed at once and one fused op per token,
    in blocks of 5 (23 = 4 x 5 + 3) and in one, from a state and across documents, in float32 against float64.
    Its final state is its own tensor (not a view of a block), and the state passed in is left as it was."""
    monkeypatch.setattr(ssm_module, "NO_GRAD_BLOCK_TOKENS", block)
    exact, state = _scan_inputs(), torch.randn(2, 6, 5, 1, dtype=torch.float64)
    expected = selective_scan_reference(*exact, state=state, doc_ids=DOCS)
    inputs, state32 = [t.float() for t in exact], state.float()
    before = state32.clone()
    with torch.no_grad():
        got = selective_scan(*inputs, state=state32, doc_ids=DOCS)
    for name, a, b in zip(["y", "final"], got, expected, strict=True):
        assert a.dtype == torch.float32 and rel_error(a, b) < 1e-5, name
    assert got[1].untyped_storage().nbytes() == got[1].nbytes and torch.equal(state32, before)


@pytest.mark.parametrize("kwargs", [{"doc_ids": DOCS}, {"state": "random"}], ids=["documents", "state"])
def test_selective_scans_hand_written_backward_matches_autograd_through_the_recurrence(kwargs):
    """Mamba-1's torch scan runs its backward by hand (the scan in reverse): every input's gradient against
    autograd through linear attention's token-by-token recurrence, in float64."""
    if kwargs.get("state") == "random":
        kwargs = {"state": torch.randn(2, 6, 5, 1, dtype=torch.float64)}
    inputs = [t.requires_grad_() for t in _scan_inputs()]
    weights = torch.randn(2, 6, 23, dtype=torch.float64)  # a loss that weighs every output differently
    grads = []
    for scan in (selective_scan, selective_scan_reference):
        y, final = scan(*inputs, **kwargs)
        grads.append(torch.autograd.grad((y * weights).sum(), inputs))
        assert not final.requires_grad or scan is selective_scan_reference
    for name, a, b in zip("u delta A B C".split(), *grads, strict=True):
        assert rel_error(a, b) < 1e-10, name


def test_selective_scan_runs_in_float32_under_autocast():
    """Mamba-1's scan under bf16 autocast (trainer.precision=bf16-mixed) is the scan outside it: its products per
    token stay float32 (casting them only cost time and the state's precision), outputs and gradients alike."""
    inputs = [t.float().requires_grad_() for t in _scan_inputs()]
    runs = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, final = selective_scan(*inputs, doc_ids=DOCS)
        runs.append((y, final, *torch.autograd.grad(y.square().sum(), inputs)))
    for a, b in zip(*runs, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.fixture
def compiled_scan(monkeypatch):
    """Mamba-1's training scan in compiled chunks at the tests' shapes (the suite sets KVLAB_COMPILE=0)."""
    monkeypatch.setenv("KVLAB_COMPILE", "1")
    monkeypatch.setattr(ssm_module, "COMPILED_SCAN_MIN", 0)
    monkeypatch.setattr(ssm_module, "_compiled_chunks", {})
    return ssm_module._compiled_chunks


def _scan_with_gradients(scan, inputs, state, doc_ids):
    y, final = scan(*inputs, state=state, doc_ids=doc_ids)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # every output weighed differently
    return y, final, *torch.autograd.grad((y * weights).sum(), [*inputs, state])


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is unsupported here")
def test_selective_scan_in_compiled_chunks_matches_the_float64_recurrence(compiled_scan):
    """The training scan on a CPU, SCAN_CHUNK tokens per compiled kernel and a shorter eager chunk last (23 = 8 +
    8 + 7), its backward recomputing each chunk's states: outputs, final state and every gradient (the initial
    state's included) against autograd through the float64 token-by-token recurrence, across documents."""
    exact = [t.requires_grad_() for t in _scan_inputs()]
    state = torch.randn(2, 6, 5, 1, dtype=torch.float64, requires_grad=True)
    expected = _scan_with_gradients(selective_scan_reference, exact, state, DOCS)
    inputs = [t.detach().float().requires_grad_() for t in exact]
    got = _scan_with_gradients(selective_scan, inputs, state.detach().float().requires_grad_(), DOCS)
    assert set(compiled_scan) == {"forward", "backward"}  # made, and none failed
    for name, a, b in zip("y final u delta A B C state".split(), got, expected, strict=True):
        assert a.dtype == torch.float32 and rel_error(a, b) < 1e-5, name


def test_selective_scan_runs_eagerly_and_says_why_when_compilation_fails(compiled_scan, caplog):
    def broken(*args):
        raise RuntimeError("no C++ compiler\nmore detail")

    compiled_scan.update(forward=broken, backward=broken)
    exact = [t.requires_grad_() for t in _scan_inputs()]
    state = torch.zeros(2, 6, 5, 1, dtype=torch.float64, requires_grad=True)
    expected = _scan_with_gradients(selective_scan_reference, exact, state, None)
    with caplog.at_level("WARNING", logger="kvlab.kernels.ssm"):
        got = _scan_with_gradients(selective_scan, exact, state, None)
        again = _scan_with_gradients(selective_scan, exact, state, None)  # token by token from then on, warned once
    assert [r.getMessage() for r in caplog.records] == [
        "Mamba-1 scan: the compiled chunks are unavailable (RuntimeError: no C++ compiler); scanning eagerly"
    ]
    assert compiled_scan == {"failed": True}
    for a, b, c in zip(got, again, expected, strict=True):
        assert rel_error(a, c) < 1e-10 and rel_error(b, c) < 1e-10


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is unsupported here")
def test_selective_scan_inside_a_compiled_block_is_chosen_between_its_graphs(monkeypatch):
    """Under trainer.compile the scan runs outside the block's graphs, and the registry chooses its backend there
    as it would outside any graph (on a GPU, the Triton kernel rather than the torch loop): here the mode's
    ``reference``, which a traced call could not read."""
    from kvlab.kernels import ops, registry

    monkeypatch.delenv("KVLAB_KERNELS", raising=False)
    chosen, choose = [], registry.choose
    monkeypatch.setattr(registry, "choose", lambda op, *a: chosen.append((op, choose(op, *a).name)) or choose(op, *a))
    inputs = [t.float().requires_grad_() for t in _scan_inputs()]
    block = torch.compile(lambda *args: ops.selective_scan(*args)[0].tanh(), backend="eager")
    with registry.use_kernels("reference"):
        got = torch.autograd.grad(block(*inputs).sum(), inputs)
    expected = torch.autograd.grad(selective_scan_reference(*inputs)[0].tanh().sum(), inputs)
    assert chosen == [("selective_scan", "reference")]
    for a, b in zip(got, expected, strict=True):
        assert rel_error(a, b) < 1e-5


@pytest.mark.parametrize("grad", [True, False])
def test_diagonal_scan_matches_its_recurrence(grad):
    """Hillis & Steele's passes and their reverse-scan backward against the token loop in float64: packed
    documents, a carried state, decays from 0 to exp(-40) and a zero one (log decay -inf, Griffin's reset), over 23
    tokens (no power of two); without gradients the same forward."""
    x, state = torch.randn(2, 23, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    log_decay = -torch.rand(2, 23, 5, dtype=torch.float64) * torch.tensor([0.0, 0.1, 1.0, 8.0, 40.0])
    log_decay[0, 4, 2] = float("-inf")
    inputs = [t.requires_grad_(grad) for t in (x, log_decay, state)]
    weights = torch.randn(2, 23, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    results = []
    for scan in (ops.diagonal_scan, diagonal_scan_reference):
        with torch.set_grad_enabled(grad):
            h, final = scan(x, log_decay, state=state, doc_ids=DOCS)
        loss = (h * weights[0]).sum() + (final * weights[1]).sum()
        results.append([h, final, *(torch.autograd.grad(loss, inputs) if grad else ())])
    for a, b in zip(*results, strict=True):
        assert (a - b).abs().max() <= 1e-12


def test_causal_conv1d_matches_its_reference_across_documents_and_calls():
    x, w, bias, prev = torch.randn(2, 23, 5), torch.randn(5, 4), torch.randn(5), torch.randn(2, 3, 5)
    for a, b in zip(causal_conv1d(x, w, bias, prev=prev, doc_ids=DOCS),
                    causal_conv1d_reference(x, w, bias, prev=prev, doc_ids=DOCS), strict=False):  # fmt: skip
        assert rel_error(a, b) < 1e-6


@pytest.mark.parametrize("grad", [True, False])
def test_causal_conv1d_keeps_its_inputs_dtype(grad):
    """bf16 inputs over float32 weights (a Mamba layer under bf16 autocast) give bf16 outputs, as float32's to bf16's
    rounding: float32 taps had promoted the output and made every tap a cast."""
    x, w, bias, prev = torch.randn(2, 23, 5), torch.randn(5, 4), torch.randn(5), torch.randn(2, 3, 5)
    want, _ = causal_conv1d_reference(x, w, bias, prev=prev, doc_ids=DOCS)
    with torch.set_grad_enabled(grad):
        y, new_prev = causal_conv1d(x.bfloat16(), w, bias, prev=prev.bfloat16(), doc_ids=DOCS)
    assert y.dtype == new_prev.dtype == torch.bfloat16
    assert rel_error(y, want) < 2e-2


# -- external wrappers against stand-ins of the packages ---------------------------------------------


def _flash_mask(T, S, causal, window_size):
    """flash-attn 2's visibility: queries aligned to the end of the keys; window_size = (left, right)."""
    i = torch.arange(T)[:, None] + S - T
    j = torch.arange(S)[None, :]
    visible = torch.ones(T, S, dtype=torch.bool)
    if causal:
        visible &= j <= i
    if window_size[0] >= 0:
        visible &= i - j <= window_size[0]
    return visible


def _flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    mask = _flash_mask(q.shape[1], k.shape[1], causal, window_size)
    t = lambda x: x.transpose(1, 2)
    return t(attention_reference(t(q), t(k), t(v), mask=mask, scale=softmax_scale, softcap=softcap or None))


def _flash_attn_varlen_func(
    q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0
):
    assert cu_q.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
    pieces = [_flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal, window_size, softcap)[0]
              for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=False)]  # fmt: skip
    return torch.cat(pieces)


def _chunk_scan(x, dt, A, B, C, chunk_size, initial_states=None, seq_idx=None, return_final_states=False):
    """mamba-ssm's SSD: h [B, H, P, N], h = exp(dt A) h + dt x B^T, y = h C; seq_idx changes reset h."""
    batch, T, H, P = x.shape
    group = H // B.shape[2]
    h = torch.zeros(batch, H, P, B.shape[-1], dtype=x.dtype) if initial_states is None else initial_states.clone()
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(h.dtype)[:, None, None, None]
        Bt, Ct = B[:, t].repeat_interleave(group, 1), C[:, t].repeat_interleave(group, 1)  # [batch, H, N]
        h = (dt[:, t] * A).exp()[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append((h * Ct[:, :, None]).sum(-1))
    return torch.stack(ys, 1), h


def _selective_scan_fn(u, delta, A, B, C, return_last_state=False):
    """mamba-ssm's selective scan: h [B, D, N], h = exp(delta A) h + delta B u, y = h . C."""
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        h = (delta[:, :, t, None] * A).exp() * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1), h


@pytest.fixture
def stand_ins(monkeypatch):
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func, flash.flash_attn_varlen_func = _flash_attn_func, _flash_attn_varlen_func
    ssd_module = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    ssd_module.mamba_chunk_scan_combined = _chunk_scan
    scan_module = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    scan_module.selective_scan_fn = _selective_scan_fn
    for name, module in {"flash_attn": flash, "mamba_ssm.ops.triton.ssd_combined": ssd_module,
                         "mamba_ssm.ops.selective_scan_interface": scan_module}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize(
    "kwargs", [dict(causal=True), dict(causal=True, window=5), dict(doc_ids=DOCS), dict(doc_ids=DOCS, window=4),
               dict(causal=True, softcap=0.5), dict(doc_ids=DOCS, softcap=0.5)],
    ids=str,
)  # fmt: skip
def test_flash_attention_wrapper_converts_layouts_windows_and_documents(stand_ins, kwargs):
    q, k, v = torch.randn(2, 4, 23, 16), torch.randn(2, 2, 23, 16), torch.randn(2, 2, 23, 16)
    expected = attention_reference(q, k, v, scale=0.3, **kwargs)
    assert rel_error(external.flash_attention(q, k, v, scale=0.3, **kwargs), expected) < 1e-5


def test_flash_attention_wrapper_decodes_over_a_cache(stand_ins):
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    assert rel_error(external.flash_attention(q, k, v), attention_reference(q, k, v)) < 1e-5


def test_mamba_ssm_wrappers_convert_states_and_documents(stand_ins):
    state, inputs = torch.randn(2, 4, 5, 6, dtype=torch.float64), _ssd_inputs()  # state: kvlab's [B, H, N, P]
    for kwargs in (dict(state=state), dict(doc_ids=DOCS), dict(state=state, doc_ids=DOCS)):
        for a, b in zip(external.mamba_ssd(*inputs, **kwargs), ssd_reference(*inputs, **kwargs), strict=False):
            assert rel_error(a, b) < 1e-6  # final states come back in float32, as kvlab's caches hold them
    inputs = _scan_inputs()
    for a, b in zip(external.mamba_selective_scan(*inputs), selective_scan_reference(*inputs), strict=False):
        assert rel_error(a, b) < 1e-6


def test_capped_scores_stay_on_the_triton_kernel_that_takes_them():
    """SDPA takes no soft cap, so auto does not leave capped plain attention to it (it would form the scores); the
    kernel takes the cap as it takes masks it computes."""
    q = torch.randn(1, 2, 8, 16)
    assert ops._sdpa_is_faster(q, q, q, causal=True) is not None
    assert ops._sdpa_is_faster(q, q, q, causal=True, softcap=30.0) is None
    assert ops._triton_attention_supports(q, q, q, causal=True, softcap=30.0) is None


def test_sink_logits_stay_on_the_kernels_that_take_them():
    """gpt-oss's sink logits: kvlab's Triton kernel takes them (auto does not leave them to SDPA, which takes them
    only as a widened key), flash-attn declines them by name; on a CPU auto runs the torch backend."""
    q, sinks = torch.randn(1, 2, 8, 16), torch.zeros(2)
    assert ops._triton_attention_supports(q, q, q, causal=True, sink_logits=sinks) is None
    assert ops._sdpa_is_faster(q, q, q, causal=True, sink_logits=sinks) is None
    assert registry.choose("attention", (q, q, q), {"causal": True, "sink_logits": sinks}).name == "torch"
