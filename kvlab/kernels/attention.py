"""Causal softmax attention with grouped K/V heads (MHA, GQA, MQA), and MLA's absorbed form.

``attention`` is the fast path: PyTorch's fused SDPA with ``enable_gqa``, so
grouped K/V heads are never copied out to the number of query heads.
``attention_reference`` is the textbook form, softmax(q k^T * scale + mask) v
with K/V heads repeated explicitly, used by the tests as the ground truth.
Shapes: q [B, H, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] with H divisible
by Hkv. Which keys a query sees:

- ``mask``: boolean, True where a query may attend to a key, broadcastable
  to [B, H, T, S];
- ``causal=True``: each query sees the keys up to its own position, the
  queries being the last T of the S positions (bottom-right aligned, as
  flash-attn's; T == S: the usual causal mask; T < S: a prompt on a filled
  cache);
- ``doc_ids`` [B, T] (packed documents, T == S): causal, and only within the
  query's document (documents are runs of equal ids);
- ``window``: with causal or doc_ids, a query at p sees keys p - window < k <= p.

``softcap`` c (Gemma 2's attn_logit_softcapping): each score s = q.k * scale
becomes c * tanh(s / c) before the mask and the softmax. No fused CPU kernel
takes it, so such attention forms its scores (``attention_weights``): T x S
per head, as ``transformers``' eager path (without gradients, a block of
queries at a time); on a GPU kvlab's Triton kernel and flash-attn >= 2.6
take it fused.

``sink_logits`` [H] (gpt-oss's attention sinks): one learned logit b_h per
query head joins every softmax of that head as a key with no value,

    p_j = exp(s_j) / (exp(b_h) + sum_i exp(s_i)),   out = sum_j p_j v_j,

so a head may attend to nothing (its weights sum to less than 1). Over
several queries (a prefill, training) the sink becomes one more key that
every query sees, through the fused kernels (``_sink_as_key``); one query
(decoding), or capped scores, form the scores as soft-capped attention does.
kvlab's Triton kernel takes them in its online softmax (on a GPU).

The structured options (causal, window, doc_ids) are what kernels that never
build a mask (Triton, flash-attn varlen) take; here they become one.

``attention_weights`` returns the softmax probabilities themselves, [B, H,
T, S], for layers that give them to others (Shared Attention, Liao & Vargas
2024: later layers apply them to their own values with
``apply_attention_weights``); fused kernels never form them, so only the
layers that share take this path. Its reference is the same textbook form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvlab.kernels.precision import compute_dtype, upcast


def _structured_mask(q, mask, causal, window, doc_ids, S: int):
    """The boolean mask the options describe (None: no mask), and whether SDPA's is_causal does it alone."""
    T = q.shape[2]
    if doc_ids is not None:
        structured = document_mask(doc_ids, window)
    elif causal and window is not None:
        structured = position_mask(torch.arange(S - T, S, device=q.device), torch.arange(S, device=q.device), window)
    elif causal and mask is None and T == S:
        return None, True
    elif causal:
        structured = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    else:
        return mask, False
    return (structured if mask is None else structured & mask), False


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    B, H, T, D = q.shape
    S, Hkv = k.shape[2], k.shape[1]
    if causal and window is not None and doc_ids is None and mask is None and T <= S and T > 2 * window:
        # block by block: each block of ``window`` queries against the keys from ``window - 1`` before it, so
        # memory and time grow with T * window, not T * S (a long prefill, or a prompt's pieces after others)
        return windowed_attention_with_sinks(
            attention, q, k, v, 0, window, 0, scale, softcap=softcap, sink_logits=sink_logits
        )
    if sink_logits is not None and softcap is None and T > 1:
        return _sink_as_key(q, k, v, sink_logits, mask, causal, window, doc_ids, scale)
    if softcap is not None or sink_logits is not None:  # (scores capped, or one query's sink: formed explicitly)
        return _explicit_attention(q, k, v, mask, causal, window, doc_ids, scale, softcap, sink_logits)
    if T > 1 and q.shape[-1] > v.shape[-1]:
        # SDPA's memory-efficient kernels want one head size: pad the values (zeros add nothing), else the math
        # path would hold every [T, S] score (MLA's prefill: 20 GB at 16K tokens).
        padded = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
        out = attention(q, k, padded, mask=mask, causal=causal, window=window, doc_ids=doc_ids, scale=scale)
        return out[..., : v.shape[-1]]
    if T > 1 and q.shape[-1] < v.shape[-1]:
        # and the other way (Hymba's values twice its keys' width): zero-padded queries and keys score the same,
        # at the queries' own scale, where the math path held every [T, S] score
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        q, k = (F.pad(t, (0, v.shape[-1] - D)) for t in (q, k))
        return attention(q, k, v, mask=mask, causal=causal, window=window, doc_ids=doc_ids, scale=scale)
    if causal and T < S and mask is None and window is None and doc_ids is None and _splits_on_cpu(q, k, v):
        return _causal_after_cache(q, k, v, scale)
    mask, is_causal = _structured_mask(q, mask, causal, window, doc_ids, S)
    if T == 1 and not is_causal and _short_compiled_cpu_query(q, k):
        return _one_query(q, k, v, mask, scale)
    if T == 1 and Hkv < H and not is_causal and (mask is None or mask.dim() < 3 or mask.shape[-3] == 1):
        # One query per head (decoding): each K/V head's query heads become its queries, so SDPA reads each K/V
        # head once rather than once per query head (x2 to x3 faster at long contexts on CPU).
        grouped = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=mask, scale=scale)
        return grouped.reshape(B, H, 1, v.shape[-1])
    if _short_bf16_training_on_cpu(q, k, v):
        with torch.autocast("cpu", enabled=False):  # (or autocast would cast the inputs back down)
            out = F.scaled_dot_product_attention(
                upcast(q), upcast(k), upcast(v), attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=Hkv != H
            )
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=Hkv != H
    )


# Training under bf16 autocast on a CPU (trainer.precision=bf16-mixed: with AMX, the gqa preset's step x1.5 to x2
# faster than in fp32 on this machine), torch 2.13's CPU flash kernel runs its bf16 backward far slower than its
# float32 one over short rows: a cost per head and block that a short row's work does not cover. Causal, forward and
# backward, 2,048 tokens a call, 8 query heads over 2 K/V heads, float32 (the casts included) against bf16: head size
# 32 x2.34 / x1.80 / x1.28 / x0.89 at 128 / 256 / 512 / 1,024 positions, 64 x2.26 / x1.39 / x0.75 at 128 / 256 / 512,
# 128 x1.20 / x0.82 at 128 / 256 (benchmarks/kernel_ops.py --bf16-attention; the step x1.15 to x1.27, RESULTS.md).
# So up to BF16_SHORT the attention runs in float32, and is the more exact for it.
BF16_SHORT = 16384  # positions x head size at most


def _short_bf16_training_on_cpu(q, k, v) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.shape[2] * q.shape[-1] <= BF16_SHORT
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
    )


# A compiled decode step's one query per head over a short cache, on a CPU: written as plain tensor ops, which
# Inductor fuses into two loops (scores and softmax; the weighted values), rather than a call into SDPA, whose
# fixed cost dominates there. gqa's compiled step: x1.10 at batch 1 over 256 positions (1.10 against 1.21 ms),
# x1.06 over 1,024, even at batch 8 over 256 and x1.06 over 512; past 1,024 positions, or 4,096 over a batch,
# SDPA's blocked kernel is faster (x0.94 at batch 1 over 2,048, x0.69 at batch 8; benchmarks/RESULTS.md). MLA's
# absorbed attention, whose latent is every head's and wide, takes only its scores so, and over a shorter cache
# (SHORT_LATENT, below): with its weighted values too, the fused loops were x1.07 on the step at batch 1 over 256
# positions but x0.84 over 1,024 and x0.86 at batch 8.
SHORT_CACHE, SHORT_BATCH_CACHE = 1024, 4096


def _short_compiled_cpu_query(q, k) -> bool:
    S = k.shape[2]
    return (
        q.device.type == "cpu"
        and torch.compiler.is_compiling()
        and S <= SHORT_CACHE
        and q.shape[0] * S <= SHORT_BATCH_CACHE
    )


EXPLICIT_ROWS = 512  # queries per block of scores formed at once, where no gradient is wanted


def _explicit_attention(q, k, v, mask, causal, window, doc_ids, scale, softcap, sink_logits):
    """Attention over soft-capped scores, or with sink logits, formed explicitly (``attention_weights``). Without
    gradients (a prefill) in blocks of EXPLICIT_ROWS queries, so a long prompt holds a block's [rows, S] scores
    per head, not [T, S] (Gemma 2's 8K-token prompt: 2 GiB a layer in one block at 8 heads)."""
    T = q.shape[2]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink_logits))
    scores = {"scale": scale, "softcap": softcap, "sink_logits": sink_logits}
    if T <= EXPLICIT_ROWS or grad:
        weights = attention_weights(q, k, mask=mask, causal=causal, window=window, doc_ids=doc_ids, **scores)
        return apply_attention_weights(weights, v)
    full = _weights_mask(q, k, mask, causal, window, doc_ids)  # boolean, [T, S] or broadcast to [B, H, T, S]
    out = []
    for a in range(0, T, EXPLICIT_ROWS):
        rows = slice(a, a + EXPLICIT_ROWS)
        block = None if full is None else full if full.shape[-2] == 1 else full[..., rows, :]
        out.append(apply_attention_weights(attention_weights(q[:, :, rows], k, mask=block, **scores), v))
    return torch.cat(out, dim=2)


def _sink_as_key(q, k, v, sink_logits, mask, causal, window, doc_ids, scale, align: int | None = None):
    """Attention with sink logits through the fused kernels: the sink as one more key, before the others, that every
    query sees, scoring b_h and adding nothing. Its score comes from one more channel: the queries' holds b_h /
    scale, the keys' 0 and the sink's 1, so q.k * scale is b_h whatever q is (and b_h gets its gradient through
    it); its value is zero (and the values get a zero channel too where their width is the keys', so the head
    sizes stay equal, as the fused paths want). A causal square (no cache, no window) gets a query before the
    others too, so SDPA's is_causal still applies (that row's output dropped); a causal prompt over a cache is
    causal still, the sink one more cached key (``attention`` splits it in two fused calls, no mask); any other
    mask gains the sink's column. Forward and backward over 1 x 2,048 positions: x6.6 faster than the scores
    formed, 1.3x plain attention's time; over 8 x 256, x1.6 (benchmarks/RESULTS.md, "gpt-oss"). ``align``: the
    widened heads are padded with zeros to a multiple of it (None: 1 on a CPU, whose kernels take any size; 8
    elsewhere, as flash kernels want, which would otherwise leave SDPA its unfused path)."""
    B, H, T, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    align = (1 if q.device.type == "cpu" else 8) if align is None else align
    extra = -(-(D + 1) // align) * align - D  # the sink's channel, then zeros
    sink_key = k.new_zeros(B, Hkv, 1, D + extra)
    sink_key[..., D] = 1
    k = torch.cat([sink_key, F.pad(k, (0, extra))], dim=2)
    v = F.pad(v, (0, extra)) if Dv == D else v
    v = torch.cat([v.new_zeros(B, v.shape[1], 1, v.shape[-1]), v], dim=2)
    sink_query = (sink_logits / scale).to(q.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    q = torch.cat([q, F.pad(sink_query, (0, extra - 1))], dim=-1)
    if causal and mask is None and window is None and doc_ids is None:
        if T == S:  # a square: is_causal with a query before the others
            q = torch.cat([q.new_zeros(B, H, 1, D + extra), q], dim=2)
            return attention(q, k, v, causal=True, scale=scale)[:, :, 1:, :Dv]
        return attention(q, k, v, causal=True, scale=scale)[..., :Dv]  # (bottom-right: the sink among the cached)
    full, _ = _structured_mask(q, mask, causal, window, doc_ids, S)
    if full is not None:
        full = torch.cat([full.new_ones(*full.shape[:-1], 1), full], dim=-1)
    return attention(q, k, v, mask=full, scale=scale)[..., :Dv]


def _one_query(q, k, v, mask, scale):
    """``attention`` for T = 1 (q [B, H, 1, D]) as elementwise products and sums, in float32 (or float64): each
    K/V head's query heads read it together; ``mask`` (boolean) broadcastable to [B, H, 1, S]."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = compute_dtype(q.dtype)
    grouped = q.reshape(B, Hkv, H // Hkv, 1, D).to(dt)
    scores = (grouped * k[:, :, None].to(dt)).sum(-1) * scale  # [B, Hkv, H / Hkv, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.expand(B, H, 1, S).reshape(B, Hkv, H // Hkv, S), float("-inf"))
    out = (scores.softmax(-1)[..., None] * v[:, :, None].to(dt)).sum(-2)  # [B, Hkv, H / Hkv, Dv]
    return out.reshape(B, H, 1, v.shape[-1]).to(q.dtype)


def _splits_on_cpu(q, k, v) -> bool:
    """Whether ``_causal_after_cache`` can run: CPU tensors, no gradient wanted (a prompt on a cache is inference),
    equal head sizes, as many key heads as value heads, and torch's CPU flash kernel, which returns the
    log-sum-exp the halves merge by."""
    return (
        q.device.type == "cpu"
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        and q.shape[-1] == v.shape[-1]
        and k.shape[1] == v.shape[1]
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _causal_after_cache(q, k, v, scale):
    """Causal attention of the last T of S positions (a prompt on a filled cache) as two fused calls, not one over
    a [T, S] mask, which SDPA's CPU kernel runs in full and turns into a float mask first: the S - T cached keys,
    which every query sees (each K/V head's query heads folded into its rows, so nothing is repeated), and the T
    new ones, causal; their outputs merge by their log-sum-exps. gqa's 16K-token prompt in 2,048-token pieces:
    x1.8, as fast as in one call (benchmarks/RESULTS.md, "Chunked prefill")."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    B, H, T, D = q.shape
    Hkv, past = k.shape[1], k.shape[2] - T
    old, old_lse = flash(q.reshape(B, Hkv, H // Hkv * T, D), k[:, :, :past], v[:, :, :past], 0.0, False, scale=scale)
    old, old_lse = old.reshape(B, H, T, D), old_lse.reshape(B, H, T)
    new_k, new_v = (t[:, :, past:].repeat_interleave(H // Hkv, dim=1) for t in (k, v))  # T keys: small
    new, new_lse = flash(q, new_k, new_v, 0.0, True, scale=scale)
    lse = torch.logaddexp(old_lse, new_lse)
    weight_old, weight_new = ((x - lse).exp()[..., None].to(q.dtype) for x in (old_lse, new_lse))
    return old * weight_old + new * weight_new


def windowed_attention_with_sinks(
    attend,
    q,
    k,
    v,
    k_pos: torch.Tensor | int,
    window: int,
    sinks: int,
    scale=None,
    *,
    softcap=None,
    sink_logits=None,
):
    """Sliding-window attention with sinks (``position_mask``'s rule) block by block, through ``attend`` (an
    attention op taking a mask) per block of ``window`` queries: the block's window of keys and the sinks before
    it, so time and memory grow with T * (window + sinks), not T * S. ``k_pos`` [S]: the keys' positions,
    ascending, the last T of them the queries' own and consecutive (a sink ring's view, whose caches list the
    held keys in position order: the sinks, then a run of positions; a gap between them is allowed); or an int
    p, keys at the positions p, p + 1, ... (a row without a cache; or, with no sinks, ``attention``'s causal
    window, the keys counted from 0): no host reads, so a compiled block's graph holds it whole. A mask over
    all S keys would cost as much as full attention."""
    T, S = q.shape[2], k.shape[2]
    blocks = range(0, T, window)
    # each block's first key: the first at or after its first query's position - window + 1; the keys below sinks
    if isinstance(k_pos, int):
        firsts = [max(0, S - T + a - window + 1) for a in blocks]
        n_sinks = min(max(sinks - k_pos, 0), S)
        k_pos = torch.arange(k_pos, k_pos + S, device=q.device)
    else:
        firsts = torch.searchsorted(k_pos, k_pos[S - T :: window] - window + 1).tolist()
        n_sinks = int(torch.searchsorted(k_pos, torch.tensor(sinks, device=k_pos.device)))
    q_pos = k_pos[S - T :]
    out = []
    for a, first in zip(blocks, firsts, strict=True):
        b, held = min(a + window, T), min(n_sinks, first)  # the sinks not already in the block's window
        keys = slice(first, S - T + b)
        k_b, v_b, pos_b = k[:, :, keys], v[:, :, keys], k_pos[keys]
        if held:
            k_b, v_b = torch.cat([k[:, :, :held], k_b], dim=2), torch.cat([v[:, :, :held], v_b], dim=2)
            pos_b = torch.cat([k_pos[:held], pos_b])
        mask = position_mask(q_pos[a:b], pos_b, window, sinks)
        out.append(attend(q[:, :, a:b], k_b, v_b, mask=mask, scale=scale, softcap=softcap, sink_logits=sink_logits))
    return torch.cat(out, dim=2)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (upcast(q) @ upcast(k).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = _weights_mask(q, k, mask, causal, window, doc_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (_softmax_with_sinks_reference(scores, sink_logits) @ upcast(v)).to(q.dtype)


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) [B, H, T, S] in q's dtype (the softmax in at least fp32), the scores
    capped first at ``softcap``, each head's ``sink_logits`` in its denominators. Each K/V head's query heads become
    its rows, so grouped keys are never repeated to the query heads."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = (q.reshape(B, Hkv, H // Hkv * T, D) @ k.transpose(-1, -2)).view(B, H, T, S)
    work = compute_dtype(q.dtype)
    scores = scores.to(work) * scale
    if softcap is not None:  # (before the mask: a capped -inf would be -softcap)
        scores = torch.tanh(scores / softcap) * softcap
    mask = _weights_mask(q, k, mask, causal, window, doc_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return _softmax_with_sinks(scores, sink_logits).to(q.dtype)


def _softmax_with_sinks(scores: torch.Tensor, sink_logits: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dim of scores [B, H, T, S]; with ``sink_logits`` [H], each head's logit joins its
    rows as one more column, dropped after the softmax (a key with no value)."""
    if sink_logits is None:
        return scores.softmax(dim=-1)
    B, H, T, _ = scores.shape
    sinks = sink_logits.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    return torch.cat([scores, sinks], dim=-1).softmax(dim=-1)[..., :-1]


def attention_weights_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    work = compute_dtype(q.dtype)
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = _weights_mask(q, k, mask, causal, window, doc_ids)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return _softmax_with_sinks_reference(scores, sink_logits).to(q.dtype)


def _softmax_with_sinks_reference(scores: torch.Tensor, sink_logits: torch.Tensor | None) -> torch.Tensor:
    """The references' softmax, the sink's term as written: exp(s_j - m) / (exp(b_h - m) + sum_i exp(s_i - m)),
    m the larger of the row's largest score and b_h (a row that sees no key: all zeros)."""
    if sink_logits is None:
        return scores.softmax(dim=-1)
    b = sink_logits.to(scores.dtype).view(1, -1, 1, 1)
    m = torch.maximum(scores.amax(dim=-1, keepdim=True), b)
    e = (scores - m).exp()
    return e / (e.sum(dim=-1, keepdim=True) + (b - m).exp())


def _weights_mask(q, k, mask, causal, window, doc_ids) -> torch.Tensor | None:
    """The boolean mask of the options, for scores that are formed whole (the references, the shared weights):
    never SDPA's is_causal shortcut."""
    mask, is_causal = _structured_mask(q, mask, causal, window, doc_ids, k.shape[2])
    if is_causal:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    return mask


def apply_attention_weights(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Probabilities [B, H, T, S] applied to values [B, Hv, S, Dv] (Hv dividing H: query head h reads value
    head h // (H / Hv)) -> [B, H, T, Dv], without repeating the values to the query heads."""
    B, H, T, S = weights.shape
    Hv = v.shape[1]
    out = weights.to(v.dtype).reshape(B, Hv, H // Hv * T, S) @ v
    return out.view(B, H, T, v.shape[-1])


def absorbed_attention(q, latent, value_dim: int, *, mask=None, scale: float | None = None) -> torch.Tensor:
    """MLA's absorbed attention: every query head over one shared latent, values its first ``value_dim``
    channels. q [B, H, T, W] (absorbed no-RoPE part + RoPE part), latent [B, S, W] -> [B, H, T, value_dim]."""
    # Two einsums over the one latent: SDPA would broadcast the latent head to every query head
    # (measured 20x slower at decode on CPU, benchmarks/kernels.py).
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    latent = latent.to(q.dtype)
    if _short_compiled_cpu_latent(q, latent):  # the scores in the softmax's loop: [B, H, 1, W] * [B, 1, S, W]
        scores = (upcast(q) * upcast(latent[:, None])).sum(-1)[:, :, None] * scale  # [B, H, 1, S]
    else:
        scores = upcast(torch.einsum("bhtw,bsw->bhts", q, latent)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bsr->bhtr", scores.softmax(-1).to(q.dtype), latent[..., :value_dim])


# A compiled CPU decode step's scores over a short latent cache (at most 512 positions over the batch): elementwise
# products and sums, which Inductor fuses with the softmax, not a batched matrix product of 5-10 us whatever its
# work. mla's greedy generation (128 after a 128-token prompt): x1.00 to x1.04 at batch 1 (256 positions; five
# processes), x1.013 at batch 2, x1.004 at batch 1 over 512; x0.96 at batch 4 and x0.99 at batch 8, so no further.
# The weighted values keep their product (as fused loops too, the step was no faster: benchmarks/RESULTS.md).
SHORT_LATENT = 512


def _short_compiled_cpu_latent(q, latent) -> bool:
    return (
        q.device.type == "cpu"
        and torch.compiler.is_compiling()
        and q.shape[2] == 1
        and q.shape[0] * latent.shape[1] <= SHORT_LATENT
    )


def absorbed_attention_reference(q, latent, value_dim: int, *, mask=None, scale: float | None = None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhtw,bsw->bhts", upcast(q), upcast(latent)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bsr->bhtr", scores.softmax(-1), upcast(latent[..., :value_dim])).to(q.dtype)


def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None, sinks: int = 0) -> torch.Tensor:
    """Boolean [T, S] mask from absolute positions: causal, and within ``window`` if given (``k_pos`` [..., S]
    positions per row and head: [..., T, S]).

    A query at position p sees keys at positions p - window < k <= p: the
    window counts the query's own token, as in Mistral's sliding window.
    With ``sinks``, the keys at positions below ``sinks`` stay visible to
    every later query whatever the window (Hymba's meta tokens, StreamingLLM's
    attention sinks).
    """
    if window is None:  # one comparison, without the [T, S] of int64 differences (a chunked prefill's cost)
        return k_pos[..., None, :] <= q_pos[:, None]
    diff = q_pos[:, None] - k_pos[..., None, :]
    within = diff < window
    if sinks:
        within |= k_pos[..., None, :] < sinks
    return (diff >= 0) & within


def document_mask(doc_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask for packed sequences: causal, within ``window``,
    and only between tokens of the same document (``doc_ids`` [B, T])."""
    T = doc_ids.shape[-1]
    pos = torch.arange(T, device=doc_ids.device)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (position_mask(pos, pos, window) & same_doc)[:, None]


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool, True where a new document begins after another (never at position 0)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document ([B, T]), restarting at 0 where doc_ids changes."""
    T = doc_ids.shape[-1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = document_starts(doc_ids)
    starts[:, 0] = True
    return idx - torch.where(starts, idx, 0).cummax(dim=-1).values


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """flash-attn's varlen form of packed documents, ``cu_seqlens`` [N + 1] (the cumulative lengths of N documents
    over the batch's tokens flattened row by row, from 0 to B * T), as ``doc_ids`` [B, T]. A row boundary must be a
    document boundary too (a document does not continue into the next row)."""
    B, T = shape
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError("cu_seqlens: expected a 1-D integer tensor of cumulative document lengths [0, ..., B * T]")
    cu = cu_seqlens.long()
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != B * T or not bool((cu[1:] > cu[:-1]).all()):
        raise ValueError(f"cu_seqlens={cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}: must rise strictly from 0 "
                         f"to the batch's {B} x {T} = {B * T} tokens")  # fmt: skip
    rows = torch.arange(1, B, device=cu.device) * T
    if not bool(torch.isin(rows, cu).all()):
        raise ValueError(f"cu_seqlens: every row boundary (multiples of {T}) must be a document boundary too")
    flat = torch.arange(B * T, device=cu.device)
    return torch.searchsorted(cu[1:], flat, right=True).view(B, T)
