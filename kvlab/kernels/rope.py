"""Rotary position embedding (Su et al. 2021, RoFormer, eq. 34).

Convention: the "rotate half" layout of GPT-NeoX and Llama, in which the
pairs rotated together are (x[i], x[i + d/2]) rather than neighbours
(x[2i], x[2i+1]). It is what `transformers` Llama uses, so weights move
between the two without permutation. Partial rotary (``dims < head_dim``)
rotates the first ``dims`` channels of each head and passes the rest
through, as in GPT-NeoX.
"""

from __future__ import annotations

import math

import torch

from kvlab.kernels.precision import upcast

ROPE_SCALINGS = {  # kind -> its settings; every one is required
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"),
    "yarn": ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "attention_factor"),
    "longrope": ("short_factor", "long_factor", "original_max_seq_len", "attention_factor"),
}
FACTOR_LISTS = ("short_factor", "long_factor")  # LongRoPE's: one factor per rotated pair
# kind -> settings it may leave out: YaRN's truncate (default true: its ramp's ends floored and ceiled to whole
# indices, as YaRN's code; gpt-oss's false keeps them as they are, as `transformers`' truncate=false)
OPTIONAL_SCALINGS = {"yarn": ("truncate",)}


def longrope_attention_factor(factor: float, original_max_seq_len: int) -> float:
    """LongRoPE's (Phi-3's) default attention factor, sqrt(1 + ln(s) / ln(L)) for a context extended s times from
    L positions (1 for s <= 1)."""
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original_max_seq_len))


def check_rope_scaling(scaling, path: str, dims: int | None = None) -> None:
    """Raise ValueError naming what is wrong with a ``rope_scaling`` mapping (None: no scaling) for RoPE on
    ``dims`` channels (None: not known yet; LongRoPE's factor lists are then not counted)."""
    if scaling is None:
        return
    kind = scaling.get("kind") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"{path}.kind={kind!r} is not one of {', '.join(ROPE_SCALINGS)}")
    wanted, optional = {"kind", *ROPE_SCALINGS[kind]}, set(OPTIONAL_SCALINGS.get(kind, ()))
    if not wanted <= set(scaling) <= wanted | optional:
        more = f" (and may take {', '.join(sorted(optional))})" if optional else ""
        raise ValueError(
            f"{path}: kind {kind} takes exactly {', '.join(sorted(wanted))}{more}; got {', '.join(sorted(scaling))}"
        )
    if "truncate" in scaling and not isinstance(scaling["truncate"], bool):
        raise ValueError(f"{path}.truncate={scaling['truncate']!r} must be true or false")
    for key in ROPE_SCALINGS[kind]:
        value = scaling[key]
        if key in FACTOR_LISTS:
            if not isinstance(value, (list, tuple)) or not value or not all(map(_positive, value)):
                raise ValueError(f"{path}.{key}={value!r} must be a list of positive numbers, one per rotated pair")
            if dims is not None and len(value) != dims // 2:
                raise ValueError(f"{path}.{key} has {len(value)} factors; RoPE on {dims} channels rotates "
                                 f"{dims // 2} pairs, one factor each")  # fmt: skip
        elif not _positive(value):
            raise ValueError(f"{path}.{key}={value!r} must be a positive number")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(f"{path}: high_freq_factor must exceed low_freq_factor")


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor sqrt(1/t) = 0.1 mscale ln(factor) + 1 (eq. 21, with DeepSeek's mscale; 1 for
    factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def scaled_frequencies(
    inv_freq: torch.Tensor, scaling: dict | None, theta: float | None = None, long: bool = False
) -> torch.Tensor:
    """The RoPE frequencies of a context-extended model.

    - ``linear`` (position interpolation, Chen et al. 2023): every frequency
      divided by ``factor``, i.e. positions squeezed by it.
    - ``llama3`` (Llama 3.1): wavelengths longer than
      ``original_max_seq_len / low_freq_factor`` are interpolated by
      ``factor``, those shorter than ``original_max_seq_len /
      high_freq_factor`` are kept, and those between blend the two linearly
      in ``original_max_seq_len / wavelength``.
    - ``yarn`` (Peng et al. 2023, YaRN, "NTK-by-parts"): a frequency is kept
      where the original context (``original_max_seq_len`` L) holds more than
      ``beta_fast`` of its rotations, divided by ``factor`` where it holds
      fewer than ``beta_slow``, and blended linearly in its index between
      (the indices of those rotation counts, i = d ln(L / (2 pi r)) / (2 ln
      theta), floored and ceiled, as YaRN's code and `transformers` compute
      them, or as they are with ``truncate: false``, gpt-oss's; ``theta`` is
      needed for them). Its ``attention_factor`` (eq. 21's
      0.1 ln s + 1 unless a model gives its own) scales the cos/sin tables
      (``rope_tables``), so the rotated channels' scores by its square.
    - ``longrope`` (Ding et al. 2024, LongRoPE, as Phi-3 and Phi-4 use it):
      frequency i divided by its own searched factor, ``short_factor[i]``
      for the original context and ``long_factor[i]`` (``long``) past it;
      its ``attention_factor`` scales the tables as YaRN's does. Which set a
      step uses is the caller's (``kvlab.layers.rope.Rotary``).
    """
    if scaling is None:
        return inv_freq
    if scaling["kind"] == "longrope":
        factors = scaling["long_factor" if long else "short_factor"]
        return inv_freq / torch.tensor(factors, dtype=inv_freq.dtype, device=inv_freq.device)
    factor = scaling["factor"]
    if scaling["kind"] == "linear":
        return inv_freq / factor
    if scaling["kind"] == "yarn":
        half = inv_freq.shape[0]
        dims = 2 * half

        def index_of(rotations: float) -> float:  # the frequency index that turns this often in the context
            return dims * math.log(scaling["original_max_seq_len"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = index_of(scaling["beta_fast"]), index_of(scaling["beta_slow"])
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        high = high + 0.001 if high == low else high  # (as YaRN's code: no zero-width ramp)
        ramp = ((torch.arange(half, dtype=inv_freq.dtype, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp)  # ramp 0: kept (fast), 1: interpolated
    low, high, context = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["original_max_seq_len"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: interpolate fully, 1: keep
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rope_tables(
    dims: int,
    theta: float,
    max_len: int,
    *,
    device: torch.device | str | None = None,
    scaling: dict | None = None,
    dtype: torch.dtype = torch.float32,
    long: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [max_len, dims] in ``dtype`` (float32; float64 for a float64 model), computed
    in float64 once per model (``scaling`` and ``long``: see :func:`scaled_frequencies`)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dims, 2, dtype=torch.float64, device=device) / dims)
    inv_freq = scaled_frequencies(inv_freq, scaling, theta, long)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    gain = scaling.get("attention_factor", 1.0) if scaling is not None else 1.0  # (YaRN's, LongRoPE's)
    return (angles.cos() * gain).to(dtype), (angles.sin() * gain).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the angles in ``cos``/``sin``, d <= D channels:
    [T, d], [B, T, d] (per-sequence positions) or [B or 1, H, T, d] (per-head frequencies)."""
    d = cos.shape[-1]
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    rot, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
    x1, x2 = upcast(rot).chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (upcast(rot) * cos + rotated * sin).to(x.dtype)
    return out if rest is None else torch.cat([out, rest], dim=-1)


def apply_rope_tables_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope``'s contract written pair by pair: channel i and i + d/2 rotate by the angle of
    column i of the tables (whose two halves repeat each other)."""
    d = cos.shape[-1]
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    out = upcast(x).clone()
    for i in range(d // 2):
        a, b = upcast(x[..., i]), upcast(x[..., i + d // 2])
        c, s = cos[..., i], sin[..., i]
        out[..., i], out[..., i + d // 2] = a * c - b * s, b * c + a * s
    return out.to(x.dtype)


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, dims: int, theta: float) -> torch.Tensor:
    """Plain complex-number form of RoPE at integer ``positions`` [T], for tests.

    Channel i of the first half pairs with channel i + dims/2 and the pair is
    multiplied by exp(i * position * theta^(-2i/dims)).
    """
    half = dims // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dims)
    phase = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions[:, None].double() * freqs)
    z = torch.complex(x[..., :half].double(), x[..., half:dims].double()) * phase
    return torch.cat([z.real, z.imag, x[..., dims:].double()], dim=-1).to(x.dtype)
