"""Mamba-1's selective scan in Triton, recurrent: each channel's state stays on chip going forward.

    s_t = exp(delta_t A_d) * s_(t-1) + delta_t u_t B_t,   y_t = C_t . s_t      (per channel d, state [N])

(``kvlab.kernels.ssm``'s contract: u, delta [B, D, T], A [D, N], B and C
[B, N, T]; the skip term and the gate are the layer's.) Channels are
independent, so one program holds a block of channels' states [BLOCK_D, N]
for one sequence and walks its tokens; the wrapper lays u, delta, B and C
out token-major ([B, T, .]) so each token's loads are contiguous. Without
this kernel a GPU ran the torch backend's scan, a Python loop of small ops
per token (398 ms forward and backward at 2 x 512 channels x 1,024 tokens
on an H200: benchmarks/RESULTS.md, "GPU kernels"); mamba-ssm's CUDA kernel,
where installed, takes neither an initial state nor packed documents, which
this one does (a cache's prefill, packed training rows).

The forward pass writes the state at every chunk boundary (each ``chunk``
tokens) when a gradient is wanted. Backward walks the chunks from last to
first, recomputes from its checkpoint the states the chunk's tokens start
from into a scratch buffer, then walks its tokens backwards (each token's
own state recomputed from the one before) carrying g_t = dL/ds_t (g_T =
dL/ds_final), with a_t = exp(delta_t A) (0 where a document starts):
    g_t += gy_t C_t;  dC_t = sum_d gy_t s_t;  dB_t = sum_d delta_t u_t g_t;
    e_t = g_t s_(t-1) a_t (the gradient of delta_t A);  d delta_t = sum_n e_t A + u_t sum_n g_t B_t;
    du_t = delta_t sum_n g_t B_t;  dA += e_t delta_t;  g_(t-1) = a_t g_t
dB, dC (sums over channels) are written per channel block and dA per
sequence, then summed; dL/ds_0 is the last g. Memory beyond the inputs:
T / chunk checkpoints and one chunk of states per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvlab.kernels.attention import document_starts
from kvlab.kernels.triton_common import interpreting


@triton.jit
def _step(state, U, DELTA, A, B, STARTS, b, t, T, D, N, idx_d, idx_n, in_d, in_n, HAS_DOCS: tl.constexpr):
    """s_t from s_(t-1), and what the backward pass reuses: a_t, delta_t, u_t, B_t."""
    delta = tl.load(DELTA + (b * T + t) * D + idx_d, mask=in_d, other=0.0).to(tl.float32)
    u = tl.load(U + (b * T + t) * D + idx_d, mask=in_d, other=0.0).to(tl.float32)
    b_t = tl.load(B + (b * T + t) * N + idx_n, mask=in_n, other=0.0).to(tl.float32)
    decay = tl.exp(delta[:, None] * A)
    if HAS_DOCS:  # a document's first token starts from an empty state
        decay = decay * (1.0 - tl.load(STARTS + b * T + t).to(tl.float32))
    return decay * state + (delta * u)[:, None] * b_t[None, :], decay, delta, u, b_t


@triton.jit
def _forward(U, DELTA, A_, B, C, S0, STARTS, Y, S_FINAL, CHECKPOINTS, T, D, N, BSZ, HAS_DOCS: tl.constexpr,
             HAS_STATE: tl.constexpr, CHECKPOINT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_N: tl.constexpr):  # fmt: skip
    b = tl.program_id(1)
    idx_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    idx_n = tl.arange(0, BLOCK_N)
    in_d, in_n = idx_d < D, idx_n < N
    in_s = in_d[:, None] & in_n[None, :]
    s_off = (b * D + idx_d[:, None]) * N + idx_n[None, :]  # this program's slice of a [B, D, N] state
    A = tl.load(A_ + idx_d[:, None] * N + idx_n[None, :], mask=in_s, other=0.0).to(tl.float32)
    state = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_STATE:
        state += tl.load(S0 + s_off, mask=in_s, other=0.0).to(tl.float32)
    for t in range(T):
        if CHECKPOINT:
            if t % CHUNK == 0:  # the state before the chunk's first token
                tl.store(CHECKPOINTS + (t // CHUNK) * BSZ * D * N + s_off, state, mask=in_s)
        state, _decay, _delta, _u, _b = _step(state, U, DELTA, A, B, STARTS, b, t, T, D, N, idx_d, idx_n, in_d, in_n,
                                              HAS_DOCS)  # fmt: skip
        c = tl.load(C + (b * T + t) * N + idx_n, mask=in_n, other=0.0).to(tl.float32)
        tl.store(Y + (b * T + t) * D + idx_d, tl.sum(state * c[None, :], axis=1).to(Y.dtype.element_ty), mask=in_d)
    tl.store(S_FINAL + s_off, state, mask=in_s)


@triton.jit
def _backward(U, DELTA, A_, B, C, STARTS, DY, DS_FINAL, CHECKPOINTS, SCRATCH, DU, DDELTA, DA, DB, DC, DS0, T, D, N,
              BSZ, HAS_DOCS: tl.constexpr, HAS_DFINAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    jd = tl.arange(0, BLOCK_D)
    idx_d = pid_d * BLOCK_D + jd
    idx_n = tl.arange(0, BLOCK_N)
    in_d, in_n = idx_d < D, idx_n < N
    in_s = in_d[:, None] & in_n[None, :]
    s_off = (b * D + idx_d[:, None]) * N + idx_n[None, :]
    A = tl.load(A_ + idx_d[:, None] * N + idx_n[None, :], mask=in_s, other=0.0).to(tl.float32)
    tile = jd[:, None] * BLOCK_N + idx_n[None, :]
    scratch = SCRATCH + (pid_d * BSZ + b) * CHUNK * BLOCK_D * BLOCK_N
    partial = (pid_d * BSZ + b) * T * N  # offset of this program's rows of dB and dC (summed over channel blocks)
    grad = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_DFINAL:
        grad += tl.load(DS_FINAL + s_off, mask=in_s, other=0.0).to(tl.float32)
    grad_A = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    n_chunks = tl.cdiv(T, CHUNK)
    for c in range(n_chunks):
        chunk = n_chunks - 1 - c
        first = chunk * CHUNK
        last = tl.minimum(first + CHUNK, T)
        # the states each token of the chunk starts from: scratch[i] = s_(first + i - 1) (scratch[0]: the
        # checkpoint); the walk back recomputes each token's own state from them
        state = tl.load(CHECKPOINTS + chunk * BSZ * D * N + s_off, mask=in_s, other=0.0)
        tl.store(scratch + tile, state)
        for t in range(first, last - 1):
            state, _decay, _delta, _u, _b = _step(state, U, DELTA, A, B, STARTS, b, t, T, D, N, idx_d, idx_n, in_d,
                                                  in_n, HAS_DOCS)  # fmt: skip
            tl.store(scratch + (t - first + 1) * BLOCK_D * BLOCK_N + tile, state)
        for step in range(first, last):
            t = last - 1 + first - step
            s_prev = tl.load(scratch + (t - first) * BLOCK_D * BLOCK_N + tile)
            s_t, decay, delta, u, b_t = _step(s_prev, U, DELTA, A, B, STARTS, b, t, T, D, N, idx_d, idx_n, in_d, in_n,
                                              HAS_DOCS)  # fmt: skip
            gy = tl.load(DY + (b * T + t) * D + idx_d, mask=in_d, other=0.0).to(tl.float32)
            c_t = tl.load(C + (b * T + t) * N + idx_n, mask=in_n, other=0.0).to(tl.float32)
            grad += gy[:, None] * c_t[None, :]
            tl.store(DC + partial + t * N + idx_n, tl.sum(gy[:, None] * s_t, axis=0), mask=in_n)
            tl.store(DB + partial + t * N + idx_n, tl.sum((delta * u)[:, None] * grad, axis=0), mask=in_n)
            grad_du = tl.sum(grad * b_t[None, :], axis=1)
            grad_log_decay = grad * s_prev * decay
            row = (b * T + t) * D + idx_d
            tl.store(DDELTA + row, tl.sum(grad_log_decay * A, axis=1) + grad_du * u, mask=in_d)
            tl.store(DU + row, grad_du * delta, mask=in_d)
            grad_A += grad_log_decay * delta[:, None]
            grad = grad * decay
    tl.store(DS0 + s_off, grad, mask=in_s)
    tl.store(DA + s_off, grad_A, mask=in_s)


def _blocks(batch: int, D: int, N: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_D, BLOCK_N, chunk, warps): a program's channels, the whole state width, the tokens between
    checkpoints, and the warps for a [BLOCK_D, BLOCK_N] tile. Each program walks every token in turn, so the
    programs side by side are the parallelism: blocks of 32 channels, halved (down to 4) while there would be
    fewer than two programs per multiprocessor (a batch-1 prefill of 512 channels: 16 programs of 32 on 132
    multiprocessors, 128 of 4)."""
    block_n = triton.next_power_of_2(N)
    if interpreting():
        return min(triton.next_power_of_2(D), 16), block_n, 16, 4
    block_d = min(triton.next_power_of_2(D), 32)
    if device.type == "cuda":  # (elsewhere: compiled for a GPU without one, tests/kernels/compile_for_gpu.py)
        processors = torch.cuda.get_device_properties(device).multi_processor_count
        while block_d > 4 and batch * triton.cdiv(D, block_d) < 2 * processors:
            block_d //= 2
    return block_d, block_n, 16, max(1, min(4, block_d * block_n // 128))


class _SelectiveScan(torch.autograd.Function):
    """u, delta [B, T, D], A [D, N], B and C [B, T, N] (token-major), s0 [B, D, N] or None, starts [B, T] int8 or
    None: y [B, T, D] and the final state [B, D, N] (float32). ``checkpoint``: whether a backward pass may follow
    (inside ``forward`` gradients are always off, so the caller says)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, s0, starts, checkpoint):
        Bsz, T, D = u.shape
        N = A.shape[1]
        block_d, block_n, chunk, warps = _blocks(Bsz, D, N, u.device)
        grid = (triton.cdiv(D, block_d), Bsz)
        f32 = {"dtype": torch.float32, "device": u.device}
        y = torch.empty(Bsz, T, D, dtype=u.dtype, device=u.device)
        final = torch.empty(Bsz, D, N, **f32)
        checkpoints = torch.empty((triton.cdiv(T, chunk) if checkpoint else 0), Bsz, D, N, **f32)
        no_starts = u.new_empty(0, dtype=torch.int8)
        _forward[grid](u, delta, A, B, C, s0 if s0 is not None else final, starts if starts is not None else no_starts,
                       y, final, checkpoints, T, D, N, Bsz, HAS_DOCS=starts is not None, HAS_STATE=s0 is not None,
                       CHECKPOINT=checkpoint, CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
                       num_warps=warps)  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, starts, checkpoints)
        ctx.blocks, ctx.grid, ctx.has_state = (block_d, block_n, chunk, warps), grid, s0 is not None
        ctx.set_materialize_grads(False)  # an unused final state's gradient stays None: the kernel skips it
        return y, final

    @staticmethod
    def backward(ctx, d_y, d_final):
        u, delta, A, B, C, starts, checkpoints = ctx.saved_tensors
        Bsz, T, D = u.shape
        N = A.shape[1]
        block_d, block_n, chunk, warps = ctx.blocks
        grid = ctx.grid
        f32 = {"dtype": torch.float32, "device": u.device}
        scratch = torch.empty(grid[0] * Bsz * chunk * block_d * block_n, **f32)
        du, ddelta = torch.empty(Bsz, T, D, **f32), torch.empty(Bsz, T, D, **f32)
        dB, dC = torch.empty(grid[0], Bsz, T, N, **f32), torch.empty(grid[0], Bsz, T, N, **f32)
        dA, ds0 = torch.empty(Bsz, D, N, **f32), torch.empty(Bsz, D, N, **f32)
        no_starts = u.new_empty(0, dtype=torch.int8)
        d_y = d_y.contiguous() if d_y is not None else torch.zeros_like(u)
        _backward[grid](u, delta, A, B, C, starts if starts is not None else no_starts, d_y,
                        d_final.float().contiguous() if d_final is not None else ds0, checkpoints, scratch, du,
                        ddelta, dA, dB, dC, ds0, T, D, N, Bsz, HAS_DOCS=starts is not None,
                        HAS_DFINAL=d_final is not None, CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
                        num_warps=warps)  # fmt: skip
        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype), dB.sum(0).to(B.dtype),
                dC.sum(0).to(C.dtype), ds0 if ctx.has_state else None, None, None)  # fmt: skip


def selective_scan(u, delta, A, B, C, *, state=None, doc_ids=None, chunk_size: int = 64):
    """``kvlab.kernels.ssm.selective_scan``'s contract: y [B, D, T] and the final state [B, D, N, 1] (float32,
    differentiable here). ``chunk_size`` is not used."""
    u_t, delta_t, B_t, C_t = (x.transpose(1, 2).contiguous() for x in (u, delta, B, C))
    s0 = state[..., 0].float().contiguous() if state is not None else None
    starts = document_starts(doc_ids).to(torch.int8) if doc_ids is not None else None
    inputs = (u_t, delta_t, A.contiguous(), B_t, C_t, s0)
    checkpoint = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, final = _SelectiveScan.apply(*inputs, starts, checkpoint)
    return y.transpose(1, 2), final[..., None]
