"""Mamba's scans in the layouts of mamba-ssm's kernels, computed as linear attention.

- ``ssd`` (Mamba-2's state-space duality): per head h, with a scalar decay
  exp(dt_t A_h) and a state [N, P]:
      S_t = exp(dt_t A_h) S_{t-1} + B_t^T (dt_t x_t),   y_t = C_t S_t
  x [B, T, H, P], dt [B, T, H] (after softplus), A [H] (negative),
  B and C [B, T, G, N] shared by the H / G heads of each group.
- ``selective_scan`` (Mamba-1): every channel d has its own state [N] and
  a decay per state element, exp(delta_t A_d):
      s_t = exp(delta_t A_d) * s_{t-1} + delta_t B_t u_t,   y_t = C_t . s_t
  u and delta [B, D, T], A [D, N], B and C [B, N, T].

Both are linear attention with decay (``kvlab.kernels.linear_attention``):
q = C, k = B (times dt for Mamba-1), v = dt x (x for Mamba-1), log decay
dt A. ``state`` and the returned final state use linear attention's layout
([B, H, N, P]; [B, D, N, 1]), so caches are the same whichever backend ran.
The skip term D x and the gate are the layer's. The ``_reference`` variants
run linear attention's token-by-token recurrence; mamba-ssm's fused kernels
are the external backends (``kvlab.kernels.external``), and Mamba-1's scan
has a Triton kernel of its own (``kvlab.kernels.triton_selective_scan``).
The ``torch`` form of
``ssd`` calls linear attention through the registry (its chunked form, or
its Triton kernel where that is chosen). Mamba-1's is the elementwise scan
s_t = a_t * s_{t-1} + b_t itself, as mamba-ssm's kernel runs it: its value
is one wide, so the chunked form would build a [C, C] decay mask per channel
and state element (2.1 s forward and backward at the ``jamba`` preset's
shapes on 2 CPU cores, against 0.18 s this way: ``benchmarks/jamba.py``);
the loop's steps are small elementwise ops, and the backward pass is the
same scan in reverse (``_SelectiveScan``), not an autograd graph of T steps.
Training on a CPU, the loop runs in compiled chunks of SCAN_CHUNK tokens
(``_CompiledSelectiveScan``), its state in registers through each chunk;
without gradients, one fused op per token (``_scan_without_grad``).
"""

from __future__ import annotations

import logging

import torch

from kvlab.kernels.attention import document_starts
from kvlab.kernels.linear_attention import between_graphs, linear_attention_reference
from kvlab.kernels.registry import ISOLATED_COMPILE, compile_wanted

log = logging.getLogger(__name__)

# Mamba-1's training scan on a CPU in compiled chunks of SCAN_CHUNK tokens (_CompiledSelectiveScan) where
# batch x channels x state x tokens reaches COMPILED_SCAN_MIN: below it the compilation (about 10 s, once per
# shape and process) would not pay for itself; a module global so that tests can lower it.
SCAN_CHUNK = 8
COMPILED_SCAN_MIN = 1 << 20
# Without gradients (prefill, evaluation) the scan forms a block of tokens' decays and inputs at once, in blocks
# of about this many elements (4 MiB in float32: they stay in cache), and at most NO_GRAD_BLOCK_TOKENS tokens.
NO_GRAD_BLOCK_ELEMENTS = 1 << 20
NO_GRAD_BLOCK_TOKENS = 64


def _ssd(x, dt, A, B, C, state, doc_ids, scan, **kwargs):
    H, G = x.shape[2], B.shape[2]
    log_decay = (dt * A).transpose(1, 2)  # [B, H, T]
    if torch.is_grad_enabled():
        v = (x * dt[..., None].to(x.dtype)).transpose(1, 2)
    else:  # written in the [B, H, T, P] layout the scan reads (it would copy a transposed view): one pass, not two
        x, dt = x.transpose(1, 2), dt.transpose(1, 2)[..., None].to(x.dtype)
        v = torch.mul(x, dt, out=x.new_empty(x.shape))
    # one group: B and C go in as one head that every head reads (linear attention broadcasts it, and its
    # chunked form computes C B^T once, not per head)
    k, q = (t.transpose(1, 2) if G == 1 else t.transpose(1, 2).repeat_interleave(H // G, dim=1) for t in (B, C))
    y, final = scan(q, k, v, log_decay, state=state, doc_ids=doc_ids, **kwargs)
    return y.transpose(1, 2), final


def _through_registry(op: str):
    """The registry's ``op`` (``kvlab.kernels.ops``, which imports this module, so looked up at the call): what
    a Triton kernel or an external backend registered for it serves."""

    def call(*args, **kwargs):
        # names, not the module: an export's remote code rewrites ``from kvlab.x import name`` lines only
        from kvlab.kernels.ops import linear_attention, selective_scan

        return {"linear_attention": linear_attention, "selective_scan": selective_scan}[op](*args, **kwargs)

    return call


def ssd(x, dt, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    """y [B, T, H, P] (without the D skip) and the final state [B, H, N, P]."""
    return _ssd(x, dt, A, B, C, state, doc_ids, _through_registry("linear_attention"), chunk_size=chunk_size)


def ssd_reference(x, dt, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    return _ssd(x, dt, A, B, C, state, doc_ids, linear_attention_reference)


def _selective_scan(u, delta, A, B, C, state, doc_ids, scan, **kwargs):
    batch, D, T = u.shape
    N = A.shape[1]
    log_decay = delta[..., None] * A[:, None, :]  # [B, D, T, N]
    k = delta[..., None] * B.transpose(1, 2)[:, None]  # [B, D, T, N]
    q = C.transpose(1, 2)[:, None].expand(batch, D, T, N)
    y, final = scan(q, k, u[..., None], log_decay, state=state, doc_ids=doc_ids, **kwargs)
    return y[..., 0], final


def _decay(delta, A, keep, t):
    """Token t's decay a_t = exp(delta_t A) [B, D, N], zero where a document starts (``keep`` [T, B] 0)."""
    a = (delta[t, ..., None] * A).exp()
    return a if keep is None else a * keep[t, :, None, None]


class _SelectiveScan(torch.autograd.Function):
    """Mamba-1's scan token by token, its backward the same scan in reverse; per step only [B, D, N] tensors
    (the discretised a_t = exp(delta_t A) and b_t = delta_t u_t B_t are formed in the step, never for all
    tokens at once). u, delta [T, B, D]; A [D, N]; B, C [T, B, N]; s0 [B, D, N]; keep [T, B] (0 where a
    document starts) or None. Returns y [T, B, D] and the final state (not differentiable: a cache's).

    Backward, with g_t the gradient reaching s_t from y_t and from s_{t+1}:
    g_t = C_t gy_t + a_{t+1} g_{t+1};  dC_t = gy_t s_t;  d(a_t) = g_t s_{t-1};  d(b_t) = g_t;  d s0 = a_0 g_0."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, s0, keep):
        T = u.shape[0]
        states = u.new_empty(T, *s0.shape)
        y = torch.empty_like(u)
        s = s0
        for t in range(T):
            a = _decay(delta, A, keep, t)
            s = torch.addcmul(a * s, (delta[t] * u[t])[..., None], B[t, :, None, :])
            states[t] = s
            y[t] = torch.bmm(s, C[t, :, :, None])[..., 0]
        ctx.save_for_backward(u, delta, A, B, C, s0, keep, states)
        final = states[-1].clone()
        ctx.mark_non_differentiable(final)
        return y, final

    @staticmethod
    def backward(ctx, grad_y, _grad_final):
        u, delta, A, B, C, s0, keep, states = ctx.saved_tensors
        T = u.shape[0]
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(delta)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(s0)  # summed over the batch at the end
        g = torch.zeros_like(s0)
        for t in range(T - 1, -1, -1):
            gy = grad_y[t]
            grad_C[t] = torch.bmm(gy[:, None, :], states[t])[:, 0]
            g = torch.addcmul(g, gy[..., None], C[t, :, None, :])
            du = delta[t] * u[t]
            grad_du = torch.bmm(g, B[t, :, :, None])[..., 0]
            grad_B[t] = torch.bmm(du[:, None, :], g)[:, 0]
            a = _decay(delta, A, keep, t)
            grad_log_a = g * (states[t - 1] if t else s0) * a  # through a = exp(delta A) (times keep)
            grad_delta[t] = (grad_log_a * A).sum(-1) + grad_du * u[t]
            grad_u[t] = grad_du * delta[t]
            grad_A.addcmul_(grad_log_a, delta[t, ..., None])
            g = g * a
        return grad_u, grad_delta, grad_A.sum(0), grad_B, grad_C, g, None


def _scan_chunk(s, delta, u, A, B, C, keep):
    """The scan over one chunk of L tokens from the state ``s`` [B, D, N] before it: y [L, B, D] and the state
    after the chunk (layouts as _SelectiveScan's). Compiled, the L steps are one loop over (b, d, n): the
    state stays in registers rather than passing through memory five times a token."""
    ys = []
    for t in range(delta.shape[0]):
        a = _decay(delta, A, keep, t)
        s = a * s + (delta[t] * u[t])[..., None] * B[t, :, None, :]
        ys.append((s * C[t, :, None, :]).sum(-1))
    return torch.stack(ys), s


def _scan_chunk_backward(s, g, grad_y, delta, u, A, B, C, keep):
    """One chunk's backward (_SelectiveScan's equations) from the state ``s`` before the chunk, recomputing
    the chunk's states, and ``g``, the gradient reaching the state after it: the gradients of the chunk's
    u, delta, B and C, of A summed over it, and the gradient reaching ``s``."""
    L = delta.shape[0]
    decays, states = [], [s]
    for t in range(L):
        a = _decay(delta, A, keep, t)
        decays.append(a)
        states.append(a * states[-1] + (delta[t] * u[t])[..., None] * B[t, :, None, :])
    grad_u, grad_delta, grad_B, grad_C = ([None] * L for _ in range(4))
    grad_A = torch.zeros_like(A)
    for t in range(L - 1, -1, -1):
        gy = grad_y[t, ..., None]
        grad_C[t] = (gy * states[t + 1]).sum(1)
        g = g + gy * C[t, :, None, :]
        grad_du = (g * B[t, :, None, :]).sum(-1)
        grad_B[t] = ((delta[t] * u[t])[..., None] * g).sum(1)
        grad_log_a = g * states[t] * decays[t]
        grad_delta[t] = (grad_log_a * A).sum(-1) + grad_du * u[t]
        grad_u[t] = grad_du * delta[t]
        grad_A = grad_A + (grad_log_a * delta[t, ..., None]).sum(0)
        g = g * decays[t]
    return g, torch.stack(grad_u), torch.stack(grad_delta), grad_A, torch.stack(grad_B), torch.stack(grad_C)


_compiled_chunks: dict[str, object] = {}  # "forward"/"backward" -> the compiled chunk; cleared when it fails


def _run_chunk(which: str, *args):
    """The chunk through its compiled form; on any compiler failure, warned once, eagerly from then on."""
    eager = _scan_chunk if which == "forward" else _scan_chunk_backward
    compiled = _compiled_chunks.get(which)
    if compiled is None:
        return eager(*args)
    try:
        return compiled(*args)
    except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly, say why
        _compiled_chunks.clear()
        _compiled_chunks["failed"] = True
        log.warning("Mamba-1 scan: the compiled chunks are unavailable (%s: %s); scanning eagerly",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")  # fmt: skip
        return eager(*args)


def _compile_chunks() -> bool:
    """Whether the compiled chunks can run (made on first use; KVLAB_COMPILE=0 keeps the scan eager)."""
    if "failed" in _compiled_chunks or not compile_wanted(None) or not torch._dynamo.is_dynamo_supported():
        return False
    if not _compiled_chunks:
        for which, fn in (("forward", _scan_chunk), ("backward", _scan_chunk_backward)):
            _compiled_chunks[which] = torch.compile(fn, dynamic=False, fullgraph=True, **ISOLATED_COMPILE)
    return True


class _CompiledSelectiveScan(torch.autograd.Function):
    """_SelectiveScan in chunks of SCAN_CHUNK tokens, each chunk one compiled kernel forward and one backward,
    the backward recomputing a chunk's states from the state before it (saved: one state per chunk, not per
    token). A shorter last chunk runs eagerly (no second compilation). At jamba's shapes (batch 8, 512
    channels, state 16, 256 tokens) the scan's forward and backward took 42 ms against 114 token by token
    (benchmarks/RESULTS.md, "Mamba-1's scan in compiled chunks, ...")."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, s0, keep):
        T, L = u.shape[0], SCAN_CHUNK
        starts, ys, s = [], [], s0
        for t0 in range(0, T, L):
            chunk = slice(t0, t0 + L)
            starts.append(s)
            args = (s, delta[chunk], u[chunk], A, B[chunk], C[chunk], None if keep is None else keep[chunk])
            y, s = _run_chunk("forward", *args) if t0 + L <= T else _scan_chunk(*args)
            ys.append(y)
        ctx.save_for_backward(u, delta, A, B, C, keep, *starts)
        final = s.clone()
        ctx.mark_non_differentiable(final)
        return torch.cat(ys), final

    @staticmethod
    def backward(ctx, grad_y, _grad_final):
        u, delta, A, B, C, keep, *starts = ctx.saved_tensors
        T, L = u.shape[0], SCAN_CHUNK
        g, grad_A = torch.zeros_like(starts[0]), torch.zeros_like(A)
        grads = []
        for i in range(len(starts) - 1, -1, -1):
            chunk = slice(i * L, i * L + L)
            args = (starts[i], g, grad_y[chunk].contiguous(), delta[chunk], u[chunk], A, B[chunk], C[chunk],
                    None if keep is None else keep[chunk])  # fmt: skip
            g, *chunk_grads = _run_chunk("backward", *args) if i * L + L <= T else _scan_chunk_backward(*args)
            grad_A += chunk_grads[2]
            grads.append(chunk_grads)
        grad_u, grad_delta, _, grad_B, grad_C = (torch.cat(parts[::-1]) for parts in zip(*grads, strict=True))
        return grad_u, grad_delta, grad_A, grad_B, grad_C, g, None


def _scan_without_grad(u, delta, A, B, C, s0, keep):
    """The scan when nothing needs its gradient (a prefill, an evaluation), in _SelectiveScan's layouts. A block
    of tokens' decays a_t and inputs b_t = delta_t u_t B_t are formed in one op each, then each token is one
    fused op, s_t = b_t + a_t s_{t-1}, written over b_t, and the block's outputs are one batched product. No
    state outlives its block (_SelectiveScan keeps all T for a backward). At batch 1, 512 channels, state 16,
    a 4,096-token prefill took 52 ms against 233 token by token: a token's tensors are small, so its cost is
    the number of ops (benchmarks/RESULTS.md, "Mamba-1's prefill ...")."""
    T, batch, D = u.shape
    block = max(1, min(NO_GRAD_BLOCK_TOKENS, NO_GRAD_BLOCK_ELEMENTS // s0.numel()))
    y = torch.empty_like(u)
    s = s0
    for t0 in range(0, T, block):
        chunk = slice(t0, t0 + block)
        decays = (delta[chunk, ..., None] * A).exp_()  # [L, B, D, N]
        if keep is not None:
            decays.mul_(keep[chunk, :, None, None])
        states = (delta[chunk] * u[chunk])[..., None] * B[chunk, :, None, :]
        for t in range(states.shape[0]):
            s = states[t].addcmul_(decays[t], s)
        L = states.shape[0]
        torch.bmm(states.view(L * batch, D, -1), C[chunk].reshape(L * batch, -1, 1), out=y[chunk].view(L * batch, D, 1))
    return y, s.clone()  # not a view that would hold the last block


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _compiled_scan_pays(u, delta, A, B, C, state) -> bool:
    batch, D, T = u.shape
    return (
        u.device.type == "cpu"
        and batch * D * A.shape[1] * T >= COMPILED_SCAN_MIN
        and T >= SCAN_CHUNK
        and _compile_chunks()
    )


def selective_scan(u, delta, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    """y [B, D, T] (without the D skip) and the final state [B, D, N, 1]; float32 inputs. ``chunk_size`` is
    not used (the scan runs token by token, or SCAN_CHUNK tokens per compiled kernel). The final state
    carries no gradient."""
    # Inside a compiled block (trainer.compile) the scan's loop would unroll into the block's graph: T steps
    # forward and backward (jamba: 305 s to compile, then 15 s a step). It runs between the graphs instead,
    # chosen there by the registry as outside a graph: on a GPU, the Triton kernel rather than this loop.
    if torch.is_grad_enabled() and u.shape[2] > 1 and torch.compiler.is_compiling():
        # (outside a graph the registry sends it back here on a CPU, to the eager scan)
        return between_graphs(_through_registry("selective_scan"))(u, delta, A, B, C, state=state, doc_ids=doc_ids)
    return _selective_scan_eager(u, delta, A, B, C, state, doc_ids)


def _selective_scan_eager(u, delta, A, B, C, state, doc_ids):
    batch, D, T = u.shape
    keep = None
    if doc_ids is not None:  # a document's first token forgets the state before it
        keep = (~document_starts(doc_ids)).T.to(u.dtype)
    s0 = u.new_zeros(batch, D, A.shape[1]) if state is None else state[..., 0].to(u.dtype)
    steps = (t.permute(2, 0, 1).contiguous() for t in (u, delta, B, C))  # [T, B, .]: one slice per token
    u_t, delta_t, B_t, C_t = steps
    if not _needs_grad(u, delta, A, B, C, state):
        scan = _scan_without_grad
    else:
        scan = (_CompiledSelectiveScan if _compiled_scan_pays(u, delta, A, B, C, state) else _SelectiveScan).apply
    # Outside autocast: each step's product is [B, D, N] by [B, N], where a bf16 autocast only adds casts (and the
    # state's rounding): jamba's training step under bf16 autocast ran at 0.89x its float32 speed with them.
    with torch.autocast(u.device.type, enabled=False):
        y, final = scan(u_t, delta_t, A.to(u.dtype), B_t, C_t, s0, keep)
    return y.permute(1, 2, 0), final[..., None]


def selective_scan_reference(u, delta, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    return _selective_scan(u, delta, A, B, C, state, doc_ids, linear_attention_reference)
