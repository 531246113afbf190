"""Every kernel op, registered with its backends; layers call these functions.

Each function here has the signature of its ``torch`` backend and forwards
to whatever ``kvlab.kernels.registry`` chooses for the call (see there for
modes, ``KVLAB_KERNELS`` and the fallback rules). Backends per op:

    op                    reference  torch                   triton  external
    attention             x          SDPA                    x       flash-attn (+ varlen)
    attention_weights     x          grouped matmul + softmax (the probabilities, for layers sharing them)
    absorbed_attention    x          einsums                 x (the attention kernel, one K/V head)
    linear_attention      x          chunked                 x (chunked over a chunk of tokens, else recurrent)
    delta_rule            x          chunked (UT transform)  x (recurrent, chunk checkpoints)
    gated_delta_rule      x          chunked (WY form)       x (delta_rule's, the decay on every key channel)
    ssd                   x          via linear_attention            mamba-ssm
    selective_scan        x          token loop (compiled chunks)  x (recurrent, chunk checkpoints)  mamba-ssm
    diagonal_scan         x          Hillis-Steele (log2 T passes, reverse-scan backward)  x (token by token)
    causal_conv1d         x          shifted multiply-adds   x
    rms_norm (+residual)  x          F.rms_norm              x
    apply_rope            x          rotate-half             x
    linear_cross_entropy  x          chunked, fused backward x (per-row loss + gradient kernel)
    dequantize            x          unpack + scale + zero   x (one pass; the caches' low-bit codes read back)

Triton kernels live in ``kvlab.kernels.triton_*`` and external wrappers in
``kvlab.kernels.external``; both are named by strings, imported only when
chosen.
"""

from __future__ import annotations

import torch

from kvlab.kernels.attention import absorbed_attention as _absorbed_attention_torch
from kvlab.kernels.attention import absorbed_attention_reference as _absorbed_attention_reference
from kvlab.kernels.attention import attention as _attention_torch
from kvlab.kernels.attention import attention_reference as _attention_reference
from kvlab.kernels.attention import attention_weights as _attention_weights_torch
from kvlab.kernels.attention import attention_weights_reference as _attention_weights_reference
from kvlab.kernels.causal_conv import causal_conv1d as _causal_conv1d_torch
from kvlab.kernels.causal_conv import causal_conv1d_reference as _causal_conv1d_reference
from kvlab.kernels.cross_entropy import linear_cross_entropy as _linear_cross_entropy_torch
from kvlab.kernels.cross_entropy import linear_cross_entropy_reference as _linear_cross_entropy_reference
from kvlab.kernels.delta_rule import delta_rule as _delta_rule_torch
from kvlab.kernels.delta_rule import delta_rule_reference as _delta_rule_reference
from kvlab.kernels.delta_rule import gated_delta_rule as _gated_delta_rule_torch
from kvlab.kernels.delta_rule import gated_delta_rule_reference as _gated_delta_rule_reference
from kvlab.kernels.diagonal_scan import diagonal_scan as _diagonal_scan_torch
from kvlab.kernels.diagonal_scan import diagonal_scan_reference as _diagonal_scan_reference
from kvlab.kernels.linear_attention import linear_attention as _linear_attention_torch
from kvlab.kernels.linear_attention import linear_attention_reference as _linear_attention_reference
from kvlab.kernels.norm import rms_norm as _rms_norm_torch
from kvlab.kernels.norm import rms_norm_reference as _rms_norm_reference
from kvlab.kernels.quant import dequantize as _dequantize_torch
from kvlab.kernels.quant import dequantize_reference as _dequantize_reference
from kvlab.kernels.registry import dispatch, register
from kvlab.kernels.rope import apply_rope as _apply_rope_torch
from kvlab.kernels.rope import apply_rope_tables_reference as _apply_rope_reference
from kvlab.kernels.ssm import selective_scan as _selective_scan_torch
from kvlab.kernels.ssm import selective_scan_reference as _selective_scan_reference
from kvlab.kernels.ssm import ssd as _ssd_torch
from kvlab.kernels.ssm import ssd_reference as _ssd_reference

HALF = (torch.float16, torch.bfloat16)


def _triton_attention_supports(
    q, k, v, *, mask=None, causal=False, window=None, doc_ids=None, scale=None, softcap=None, sink_logits=None
):
    if mask is not None:
        return "an explicit mask (the kernel takes causal/window/doc_ids)"
    if (causal or window is not None or doc_ids is not None) and q.shape[2] != k.shape[2]:
        return "causal, window or doc_ids with fewer queries than keys"
    if window is not None and not (causal or doc_ids is not None):
        return "a window without causal or doc_ids"
    if max(q.shape[-1], v.shape[-1]) > 256:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > 256"
    return None


def _flash_attention_supports(
    q, k, v, *, mask=None, causal=False, window=None, doc_ids=None, scale=None, softcap=None, sink_logits=None
):
    if not q.is_cuda or q.dtype not in HALF:
        return f"flash-attn needs CUDA fp16/bf16 tensors (got {q.device.type} {q.dtype})"
    if q.shape[-1] != v.shape[-1] or q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"head dims q {q.shape[-1]}, v {v.shape[-1]} (flash-attn: equal, <= 256, multiple of 8)"
    if softcap is not None and not _flash_takes_softcap():
        return "a soft cap on the scores (flash-attn >= 2.6 takes it)"
    if sink_logits is not None:
        return "sink logits (gpt-oss's attention sinks: kvlab's Triton kernel and the torch backend take them)"
    return _triton_attention_supports(q, k, v, mask=mask, causal=causal, window=window, doc_ids=doc_ids)


def _flash_takes_softcap() -> bool:
    import inspect

    from flash_attn import flash_attn_func  # (importable: the backend's packages are checked first)

    return "softcap" in inspect.signature(flash_attn_func).parameters


def _cuda(*args, **kwargs):
    return None if args[0].is_cuda else "needs CUDA tensors"


def _selective_scan_supports(u, *args, state=None, doc_ids=None, **kwargs):
    if not u.is_cuda:
        return "needs CUDA tensors"
    if state is not None or doc_ids is not None:
        return "mamba-ssm's selective_scan_fn takes no initial state and no packed documents"
    return None


def _triton_recurrent_supports(q, *args, **kwargs):
    return None if q.shape[-1] <= 256 else f"key dim {q.shape[-1]} > 256 (the kernel holds a state column)"


def _triton_absorbed_supports(q, latent, value_dim, *, mask=None, scale=None):
    if mask is not None:
        return "an explicit mask (prefill over a cache)"
    return None if q.shape[-1] <= 256 else f"latent width {q.shape[-1]} > 256"


def _sdpa_is_faster(
    q, k, v, *, mask=None, causal=False, window=None, doc_ids=None, scale=None, softcap=None, sink_logits=None
):
    # On an H200, SDPA's fused kernels ran causal attention 1.3x (FlashAttention-2) to 2x (cuDNN) faster than
    # kvlab's Triton kernel, forward + backward (benchmarks/RESULTS.md, "GPU kernels"). Windows, packed
    # documents, unequal head dims and capped scores SDPA runs unfused (a mask, padded values, the scores formed):
    # those stay on the kernel, as do sink logits (which SDPA takes only as one more key, its heads widened).
    if window is None and doc_ids is None and q.shape[-1] == v.shape[-1] and softcap is None and sink_logits is None:
        return "SDPA's fused kernels run plain attention faster (benchmarks/RESULTS.md, 'GPU kernels')"
    return None


def _triton_rope_supports(x, cos, sin):
    return None if cos.dim() == 2 and cos.shape[0] == x.shape[2] else "per-sequence or per-head RoPE tables"


def _triton_dequantize_supports(packed, scale, zero, bits, dtype):
    return "float64 (the kernel computes in float32)" if torch.float64 in (scale.dtype, dtype) else None


register("attention", "reference", _attention_reference)
register("attention", "torch", _attention_torch)
register("attention", "triton", "kvlab.kernels.triton_attention:attention", packages=["triton"],
         supports=_triton_attention_supports, auto_skip=_sdpa_is_faster)  # fmt: skip
register("attention", "external", "kvlab.kernels.external:flash_attention", packages=["flash_attn"],
         supports=_flash_attention_supports)  # fmt: skip
register("attention_weights", "reference", _attention_weights_reference)
register("attention_weights", "torch", _attention_weights_torch)
register("absorbed_attention", "reference", _absorbed_attention_reference)
register("absorbed_attention", "torch", _absorbed_attention_torch)
register("absorbed_attention", "triton", "kvlab.kernels.triton_attention:absorbed_attention", packages=["triton"],
         supports=_triton_absorbed_supports)  # fmt: skip
register("linear_attention", "reference", _linear_attention_reference)
register("linear_attention", "torch", _linear_attention_torch)
register("linear_attention", "triton", "kvlab.kernels.triton_linear_attention:linear_attention", packages=["triton"],
         supports=_triton_recurrent_supports)  # fmt: skip
register("delta_rule", "reference", _delta_rule_reference)
register("delta_rule", "torch", _delta_rule_torch)
register("delta_rule", "triton", "kvlab.kernels.triton_delta_rule:delta_rule", packages=["triton"],
         supports=_triton_recurrent_supports)  # fmt: skip
register("gated_delta_rule", "reference", _gated_delta_rule_reference)
register("gated_delta_rule", "torch", _gated_delta_rule_torch)
register("gated_delta_rule", "triton", "kvlab.kernels.triton_delta_rule:gated_delta_rule", packages=["triton"],
         supports=_triton_recurrent_supports)  # fmt: skip
register("ssd", "reference", _ssd_reference)
register("ssd", "torch", _ssd_torch)
register("ssd", "external", "kvlab.kernels.external:mamba_ssd", packages=["mamba_ssm"], supports=_cuda)
register("selective_scan", "reference", _selective_scan_reference)
register("selective_scan", "torch", _selective_scan_torch)
register("selective_scan", "triton", "kvlab.kernels.triton_selective_scan:selective_scan", packages=["triton"])
register("selective_scan", "external", "kvlab.kernels.external:mamba_selective_scan", packages=["mamba_ssm"],
         supports=_selective_scan_supports)  # fmt: skip
register("diagonal_scan", "reference", _diagonal_scan_reference)
register("diagonal_scan", "torch", _diagonal_scan_torch)
register("diagonal_scan", "triton", "kvlab.kernels.triton_diagonal_scan:diagonal_scan", packages=["triton"])
register("causal_conv1d", "reference", _causal_conv1d_reference)
register("causal_conv1d", "torch", _causal_conv1d_torch)
register("causal_conv1d", "triton", "kvlab.kernels.triton_causal_conv:causal_conv1d", packages=["triton"])
register("rms_norm", "reference", _rms_norm_reference)
register("rms_norm", "torch", _rms_norm_torch)
register("rms_norm", "triton", "kvlab.kernels.triton_norm:rms_norm", packages=["triton"])
register("apply_rope", "reference", _apply_rope_reference)
register("apply_rope", "torch", _apply_rope_torch)
register("apply_rope", "triton", "kvlab.kernels.triton_rope:apply_rope", packages=["triton"],
         supports=_triton_rope_supports)  # fmt: skip
register("dequantize", "reference", _dequantize_reference)
register("dequantize", "torch", _dequantize_torch)
register("dequantize", "triton", "kvlab.kernels.triton_quant:dequantize", packages=["triton"],
         supports=_triton_dequantize_supports)  # fmt: skip
register("linear_cross_entropy", "reference", _linear_cross_entropy_reference)
register("linear_cross_entropy", "torch", _linear_cross_entropy_torch)
register("linear_cross_entropy", "triton", "kvlab.kernels.triton_cross_entropy:linear_cross_entropy",
         packages=["triton"])  # fmt: skip


def attention(
    q, k, v, *, mask=None, causal=False, window=None, doc_ids=None, scale=None, softcap=None, sink_logits=None
):
    return dispatch(
        "attention", q, k, v, mask=mask, causal=causal, window=window, doc_ids=doc_ids, scale=scale, softcap=softcap,
        sink_logits=sink_logits,
    )  # fmt: skip


def attention_weights(
    q, k, *, mask=None, causal=False, window=None, doc_ids=None, scale=None, softcap=None, sink_logits=None
):
    return dispatch(
        "attention_weights", q, k, mask=mask, causal=causal, window=window, doc_ids=doc_ids, scale=scale,
        softcap=softcap, sink_logits=sink_logits,
    )  # fmt: skip


def absorbed_attention(q, latent, value_dim, *, mask=None, scale=None):
    return dispatch("absorbed_attention", q, latent, value_dim, mask=mask, scale=scale)


def linear_attention(q, k, v, log_decay, *, state=None, doc_ids=None, exclusive=False, chunk_size=64):
    return dispatch(
        "linear_attention", q, k, v, log_decay, state=state, doc_ids=doc_ids, exclusive=exclusive,
        chunk_size=chunk_size,
    )  # fmt: skip


def delta_rule(q, k, v, log_decay, a, b, *, state=None, doc_ids=None, chunk_size=16):
    return dispatch("delta_rule", q, k, v, log_decay, a, b, state=state, doc_ids=doc_ids, chunk_size=chunk_size)


def gated_delta_rule(q, k, v, log_decay, beta, *, state=None, doc_ids=None, chunk_size=64):
    return dispatch(
        "gated_delta_rule", q, k, v, log_decay, beta, state=state, doc_ids=doc_ids, chunk_size=chunk_size
    )  # fmt: skip


def ssd(x, dt, A, B, C, *, state=None, doc_ids=None, chunk_size=64):
    return dispatch("ssd", x, dt, A, B, C, state=state, doc_ids=doc_ids, chunk_size=chunk_size)


def selective_scan(u, delta, A, B, C, *, state=None, doc_ids=None, chunk_size=64):
    return dispatch("selective_scan", u, delta, A, B, C, state=state, doc_ids=doc_ids, chunk_size=chunk_size)


def diagonal_scan(x, log_decay, *, state=None, doc_ids=None):
    return dispatch("diagonal_scan", x, log_decay, state=state, doc_ids=doc_ids)


def dequantize(packed, scale, zero, bits, dtype):
    return dispatch("dequantize", packed, scale, zero, bits, dtype)


def causal_conv1d(x, weight, bias=None, *, prev=None, doc_ids=None):
    return dispatch("causal_conv1d", x, weight, bias, prev=prev, doc_ids=doc_ids)


def rms_norm(x, weight, eps, residual=None):
    return dispatch("rms_norm", x, weight, eps, residual)


def apply_rope(x, cos, sin):
    return dispatch("apply_rope", x, cos, sin)


def linear_cross_entropy(hidden, weight, labels, *, reduction="mean", softcap=None):
    return dispatch("linear_cross_entropy", hidden, weight, labels, reduction=reduction, softcap=softcap)
