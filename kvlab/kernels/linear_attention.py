"""Linear attention with decay: retention, gated retention, Mamba-2's SSD, RWKV-6.

The recurrence, per batch row and head, with a state S of [Dk, Dv]:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          (g_t = log decay <= 0)
    o_t = q_t S_t          (``exclusive``: o_t = q_t S_{t-1})

The decay is a scalar per head and token (log_decay [B, H, T]: RetNet's
retention with a fixed g = log gamma per head, YOCO's gated retention and
Mamba-2 with a data-dependent one) or a vector over the key channels
(log_decay [B, H, T, Dk]: RWKV-6, GLA). ``exclusive`` reads the state
before the token's own write, as RWKV does (which adds the token's own
term separately, with its bonus u). Packed documents (``doc_ids`` [B, T])
start from an empty state where the id changes; position 0 continues
``state``. q and k may have one head that every value head reads (q, k
[B, 1, T, Dk]: Mamba-2's B and C with one group): it is broadcast, not
copied per head, and the chunked form's q k^T products are computed once.

- ``linear_attention_reference``: the recurrence token by token, for tests.
- ``linear_attention_chunked``: the chunkwise form (RetNet §2.2, SSD's block
  decomposition). Inside a chunk of C tokens it is attention with a decay
  mask, o_t = sum_{s<=t} (q_t . k_s) exp(b_t - b_s) v_s (b: the cumulative
  log decay within the chunk, so every exponent is <= 0 and nothing
  overflows; with a vector decay the mask is per key channel, see
  ``decayed_products``); across chunks the state is carried once per chunk:
  o_t += exp(b_t) q_t S_prev and S = exp(b_C) S_prev + sum_s exp(b_C - b_s) k_s^T v_s.
  Work is O(T C D) instead of O(T^2 D), and only T/C steps are sequential.
- ``linear_attention_step``: one token (decoding), its output read from the
  state it finds.
- ``linear_attention``: picks the step for one token, the recurrence for
  two, the chunked form otherwise.

Both compute in float32 (float64 inputs stay float64) and return the
outputs in q's dtype and the final state in float32 or float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvlab.kernels.attention import document_starts
from kvlab.kernels.flushed_exp import flushed_exp
from kvlab.kernels.precision import compute_dtype

# While exp(+-FACTORABLE_DECAY) bounds both factors, they and their products stay far inside float32.
FACTORABLE_DECAY = 30.0


def _keys_first(state: torch.Tensor) -> bool:
    """A matrix state [.., Dk, Dv] held with Dk contiguous (``StateSlot``'s key_contiguous; a one-column state
    is contiguous either way and counts as not)."""
    return state.shape[-1] > 1 and state.stride(-2) == 1


def minus_inf_where_hidden(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, -inf elsewhere, in ``dtype``: added to finite exponents broadcast over more dimensions, it
    hides what ``masked_fill_`` with ``~visible`` would, in a vectorized pass, where ATen's masked fill with a
    broadcast mask is a scalar loop (at 8 x 8 x 2 x 64 x 64: 40 against 530 us)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def decayed_products(x, y, x_decay, y_decay, visible):
    """P[.., t, s] = sum_d x_td y_sd exp(x_decay_td - y_decay_sd) where ``visible[t, s]``, else 0.

    x, y, x_decay, y_decay [.., C, D] (decays: cumulative log decays within a chunk, in [total, 0]);
    visible [C, C] or broadcastable [.., C, C]. The exponent factors around the chunk's middle m,
    x exp(x_decay - m) times y exp(m - y_decay): one matrix product, used while both factors stay
    within exp(+-FACTORABLE_DECAY). Chunks that decay harder (channels that forget within a few
    tokens, as RWKV-6, Mamba or KDA can learn) are factored block by block (``_blocked_products``):
    exact, slower, no exponent positive.

    The choice reads the decays' values: under torch.compile (trainer.compile's blocks) its callers run
    between graphs (``between_graphs``), where traced it recompiled the block at every call.
    """
    C = x.shape[-2]
    middle = y_decay[..., C // 2 : C // 2 + 1, :]
    x_exponent, y_exponent = x_decay - middle, middle - y_decay
    if max(float(x_exponent.detach().abs().max()), float(y_exponent.detach().abs().max())) <= FACTORABLE_DECAY:
        scores = (x * x_exponent.exp()) @ (y * y_exponent.exp()).transpose(-1, -2)
        # (finite scores: zeroed by a product, a vectorized pass, where masked_fill with a broadcast mask is ATen's
        # scalar loop: 40-50 against 640 us at 8 x 8 x 2 x 64 x 64)
        return scores.mul_(visible)
    return _blocked_products(x, y, x_decay, y_decay, visible)


def _blocked_products(x, y, x_decay, y_decay, visible, block: int = 8):
    """``decayed_products`` for chunks that decay too hard to factor whole: in blocks of ``block`` rows. A block's
    rows against the columns before it factor around the decay of the last column before the block, r: x exp(X - r)
    times y exp(r - Y), both exponents <= 0 (decays only accumulate), so none overflows, one batched product for
    every block; within a block the [block, block, D] exponents are formed."""
    C = x.shape[-2]
    pad = -C % block
    if pad:  # (rows and columns past C: cut away below; the decays repeat the last, so they stay monotone)
        x, y = F.pad(x, (0, 0, 0, pad)), F.pad(y, (0, 0, 0, pad))
        x_decay, y_decay = (torch.cat([d, d[..., -1:, :].expand(*d.shape[:-2], pad, d.shape[-1])], dim=-2)
                            for d in (x_decay, y_decay))  # fmt: skip
        visible = F.pad(visible.to(torch.uint8), (0, pad, 0, pad)).bool()
    n = (C + pad) // block
    xb, xd = x.unflatten(-2, (n, block)), x_decay.unflatten(-2, (n, block))  # [.., n, block, D]
    yb, yd = y.unflatten(-2, (n, block)), y_decay.unflatten(-2, (n, block))
    # r_i: the decay of the column before block i (block 0 has no such columns: its own first, all hidden below)
    r = torch.cat([yd[..., :1, :1, :], yd[..., :-1, -1:, :]], dim=-3)  # [.., n, 1, D]
    before = torch.arange(C + pad, device=x.device) < (torch.arange(n, device=x.device) * block)[:, None]  # [n, C]
    columns = (r - y_decay[..., None, :, :]).add_(minus_inf_where_hidden(before[..., None], r.dtype))
    rows = (xd - r).clamp_(max=0)  # (<= 0 already, but in block 0, whose columns are all hidden)
    earlier = (xb * flushed_exp(rows)) @ (y[..., None, :, :] * flushed_exp(columns)).transpose(-1, -2)  # [.., n, b, C]
    # (a pair after its row's token, the exponent positive, is clamped to 0: finite, and hidden by ``visible`` below)
    exponent = (xd[..., :, None, :] - yd[..., None, :, :]).clamp_(max=0)
    own = (xb[..., :, None, :] * yb[..., None, :, :] * flushed_exp(exponent)).sum(-1)  # [.., n, block, block]
    eye = torch.eye(n, dtype=own.dtype, device=own.device)[:, None, :, None]
    scores = earlier.unflatten(-1, (n, block)) + own[..., None, :] * eye  # [.., n, block, n, block]
    scores = scores.flatten(-4, -3).flatten(-2, -1) * visible
    return scores[..., :C, :C]


def linear_attention_reference(
    q, k, v, log_decay, *, state=None, doc_ids=None, exclusive: bool = False, chunk_size=None
):
    """o [B, H, T, Dv] and the final state [B, H, Dk, Dv], token by token.

    q, k [B, H or 1, T, Dk] (one head: read by every head of v); v [B, H, T, Dv]; log_decay [B, H, T] or
    [B, H, T, Dk]; chunk_size is ignored; state [B, H, Dk, Dv] or None (zeros).
    """
    dt = compute_dtype(q.dtype)
    B, _, T, Dk = q.shape
    H = v.shape[1]
    S = q.new_zeros(B, H, Dk, v.shape[-1], dtype=dt) if state is None else state.to(dt)
    starts = document_starts(doc_ids) if doc_ids is not None else None
    g = log_decay.to(dt) if log_decay.dim() == 4 else log_decay.to(dt)[..., None]  # [B, H, T, Dk or 1]
    outputs = []
    for t in range(T):
        if starts is not None:
            S = S.masked_fill(starts[:, t, None, None, None], 0.0)
        read = q[:, :, t, None, :].to(dt)
        if exclusive:
            outputs.append(read @ S)
        S = g[:, :, t, :, None].exp() * S + k[:, :, t, :, None].to(dt) * v[:, :, t, None, :].to(dt)
        if not exclusive:
            outputs.append(read @ S)
    return torch.cat(outputs, dim=2).to(q.dtype), S


def linear_attention_chunked(
    q, k, v, log_decay, *, state=None, doc_ids=None, exclusive: bool = False, chunk_size: int = 64
):
    """Same contract as ``linear_attention_reference``, in chunks of ``chunk_size`` tokens."""
    dt, out_dtype = compute_dtype(q.dtype), q.dtype  # (q is rebound to its chunks in ``dt`` below)
    B, _, T, Dk = q.shape
    H, Dv = v.shape[1], v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T  # padded tokens have k = 0 and no decay: they leave the state as it is
    vector = log_decay.dim() == 4

    def chunked(x):  # [B, heads, T, D] -> [B, heads, N, C, D]; a copy only where T needs padding
        x = x.to(dt)
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B, x.shape[1], N, C, -1)

    # q and k keep their own head count: one shared head is broadcast against the decays' H heads below.
    # v is made contiguous once: both its products would otherwise copy a strided one (Mamba-2's is a
    # transposed view) to fold their batch dimensions
    q, k, v = chunked(q), chunked(k), chunked(v).contiguous()
    g = chunked(log_decay if vector else log_decay[..., None])  # [B, H, N, C, Dk or 1]
    b = g.cumsum(dim=3)  # cumulative log decay within each chunk, up to and including each token
    b_read = b - g if exclusive else b  # the decay a token's read has seen
    visible = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1 if exclusive else 0)
    if doc_ids is None:
        carries = None  # every token sees the state carried into its chunk
        b_end = b[:, :, :, -1]
    else:
        starts = F.pad(document_starts(doc_ids), (0, pad)).view(B, 1, N, C)
        segment = starts.cumsum(dim=-1)  # documents begun so far within the chunk
        visible = visible & (segment[..., :, None] == segment[..., None, :])
        carries = (segment == 0)[..., None]  # tokens still in the document the carried state belongs to
        # only the chunk's last document passes its state on
        b_end = b[:, :, :, -1].masked_fill(segment[..., -1:] > 0, float("-inf"))
    # Without a gradient (a prefill) and with a scalar decay, what is spent is overwritten rather than copied: the
    # decay weights by the scores, each chunk's share of the state by the state carried past it, and the outputs
    # take each chunk's read of the carried state in place. Mamba-2's scan alone at 8 x 128 tokens: 1.9 against 4.4
    # ms (its temporaries are 2 MB each there, often fresh pages); at 1 x 128 0.43 against 0.50; in a prefill, as the
    # allocator's state allows (benchmarks/RESULTS.md, "Past AOTAutograd's wrappers")
    inplace = not vector and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, log_decay)))
    # inside each chunk: attention with the decay mask exp(b_read_t - b_s) over the visible s
    if vector:  # per key channel
        scores = decayed_products(q, k, b_read, b, visible)
    else:
        exponent = (b_read[..., 0, None] - b[..., None, :, 0]).add_(minus_inf_where_hidden(visible, dt))  # (b finite)
        if inplace:
            scores = flushed_exp(exponent, inplace=True).mul_(q @ k.transpose(-1, -2))
        else:
            scores = (q @ k.transpose(-1, -2)) * flushed_exp(exponent)
    out = scores @ v
    # what each chunk adds to the state: exp(b_C - b_s) k_s^T v_s over its last document's tokens
    to_end = b[:, :, :, -1:] - b
    if carries is not None:
        to_end = to_end.masked_fill((segment != segment[..., -1:])[..., None], float("-inf"))
    # A scalar decay (Mamba-2, retention) can push a chunk's weights far below exp's range (flushed_exp); a
    # vector one (RWKV-6, GLA) too, but there the rows of decayed_products take those chunks (through
    # flushed_exp), and flushed_exp's passes over these [.., C, Dk] weights cost its training step 14%
    exp = torch.exp if vector else flushed_exp
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state.to(dt)
    if inplace and _keys_first(S):  # a state held keys-first: the chunks' shares laid out alike, so
        # the sums over the chunks keep that layout and the final state is copied back into it as it is
        # (mamba2's scan at 8 x 128 and its copy back: 3.2 ms as from a plain state, 3.3-3.4 mixing the layouts)
        written = (v.transpose(-1, -2) @ (k * exp(to_end))).mT  # [B, H, N, Dk, Dv], Dk contiguous
    else:
        written = (k * exp(to_end)).transpose(-1, -2) @ v  # [B, H, N, Dk, Dv]
    if inplace:  # the read of the carried state scaled in the outputs (a scalar per token), not in a copy of q
        read_decay, end_decay = exp(b_read), exp(b_end)[..., None]  # [B, H, N, C, 1], [B, H, N, 1, 1]
        if carries is not None:
            read_decay = read_decay.mul_(carries)
        for n in range(N):
            out[:, :, n].addcmul_(q[:, :, n] @ S, read_decay[:, :, n])
            S = written[:, :, n].addcmul_(end_decay[:, :, n], S)  # (this chunk's share is spent)
        return out.reshape(B, H, N * C, Dv)[:, :, :T].to(out_dtype), S
    q_decayed = q * exp(b_read)
    if carries is not None:
        q_decayed = q_decayed * carries
    inter = []
    # across chunks: T / C sequential steps (unbind: one backward for all chunks, not one per index)
    for q_n, decay_n, written_n in zip(q_decayed.unbind(2), exp(b_end).unbind(2), written.unbind(2), strict=True):
        inter.append(q_n @ S)
        S = decay_n[..., None] * S + written_n
    out = out + torch.stack(inter, dim=2)
    return out.reshape(B, H, N * C, Dv)[:, :, :T].to(out_dtype), S


def linear_attention_step(q, k, v, log_decay, *, state=None, exclusive: bool = False):
    """One token (T = 1, a decode step; no documents to separate): ``linear_attention_reference``'s contract.

    The output is read from the state the token finds, o = (q * exp(g)) S_prev + (q . k) v (the same
    o = q S as the recurrence's), not from the state it leaves: so the new state is only written (into the
    cache, where the caller copies it) and the old one read once by the update and once by the output,
    not written to a temporary and read back (a quarter less traffic over a Mamba-2 state per step). Traced
    over a state held keys-first, the output is the new state's reduction, which Inductor fuses with the
    update: the state read once."""
    dt = compute_dtype(q.dtype)
    S = q.new_zeros(q.shape[0], v.shape[1], q.shape[-1], v.shape[-1], dtype=dt) if state is None else state.to(dt)
    read, key, value = q[:, :, 0].to(dt), k[:, :, 0].to(dt), v[:, :, 0].to(dt)  # [B, H, D]
    decay = log_decay[:, :, 0].to(dt).exp()  # [B, H] or [B, H, Dk]
    decay = decay[..., None] if decay.dim() == 3 else decay[..., None, None]  # [B, H, Dk or 1, 1]
    key_first = _keys_first(S)
    # the outer product in the state's own layout: a sum over mixed layouts is a slower loop (eager)
    written = (value[..., :, None] * key[..., None, :]).mT if key_first else key[..., :, None] * value[..., None, :]
    if key_first and not exclusive and torch.compiler.is_compiling():
        # Under Inductor, the output as the reduction over keys of the new state, which it fuses with the update
        # row by row: the state read once and written once (with the order below, or with P contiguous, it is
        # read twice, in two loops). The new state is made twice on purpose: one tensor with two users and over
        # four inputs is stored as a buffer of its own and read back, which splits the loops again.
        def updated():
            return decay * S + written

        return (read[..., :, None] * updated()).sum(-2)[:, :, None].to(q.dtype), updated()
    if exclusive:
        out = (read[:, :, None, :] @ S)[:, :, 0]
    else:
        decayed = read * decay[..., 0]  # [B, H, Dk]
        out = (decayed[:, :, None, :] @ S)[:, :, 0] + (read * key).sum(-1, keepdim=True) * value
    return out[:, :, None].to(q.dtype), decay * S + written


def linear_attention(q, k, v, log_decay, *, state=None, doc_ids=None, exclusive: bool = False, chunk_size: int = 64):
    """One token's step (decoding), the recurrence for two, the chunked form otherwise."""
    kwargs = {"state": state, "doc_ids": doc_ids, "exclusive": exclusive}
    if q.shape[2] == 1 and doc_ids is None:
        return linear_attention_step(q, k, v, log_decay, state=state, exclusive=exclusive)
    if q.shape[2] <= 2:
        return linear_attention_reference(q, k, v, log_decay, **kwargs)
    chunked = between_graphs(linear_attention_chunked) if log_decay.dim() == 4 else linear_attention_chunked
    return chunked(q, k, v, log_decay, chunk_size=chunk_size, **kwargs)


def between_graphs(fn):
    """``fn`` as it is, or inside torch.compile (trainer.compile's blocks) run between the block's graphs: for
    work a graph holds badly. The chunked forms over a vector decay choose each chunk's form by the decays'
    values (``decayed_products``); traced, each read split the block and specialised what followed on the
    value read: rwkv6's compiled step ran at 0.62x its eager one, and rwkv7's first step compiled for 214 s.
    Mamba-1's scan (``kvlab.kernels.ssm``) would unroll its token loop into the graph."""
    return torch.compiler.disable(fn) if torch.compiler.is_compiling() else fn
