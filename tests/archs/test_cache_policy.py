"""Cache policies (int8, int4, fp8, KIVI, StreamingLLM's sinks; H2O and MiniCache in the footprint's every
layout): K/V held as codes or evicted, read back as a float64 transcription of the paper says, counted bit-exactly
by the footprint, composed with every attention layout (grouping, windows, sinks, cross-layer readers, hybrids'
attention branches)."""

import re
from unittest import mock

import pytest
import torch

from kvlab import build_model
from kvlab.archs.decode import decode_step_for
from kvlab.kernels.attention import windowed_attention_with_sinks as windowed
from kvlab.kernels.rope import apply_rope
from kvlab.layers.attention import Attention
from kvlab.layers.cache_policy import CachePolicy, KiviKV, PolicyKV
from kvlab.layers.kv_cache import RingKV, SinkRingKV, StaticKV
from kvlab.layers.rope import Rotary
from tests.archs.test_decode import VARIANTS
from tests.conftest import tiny

POLICIES = ["int8", "int4", {"kind": "int4", "group": 8}, "fp8"]
KIVI = {"kind": "kivi", "bits": 2, "group": 4, "residual": 8}  # small groups and residual, to cross them often
SINKS = {"kind": "sinks", "sinks": 2, "window": 5}  # evicting from the 8th token on
SINKS_INT4 = SINKS | {"codec": "int4", "group": 8}  # and the kept positions as 4-bit codes


def _round_trip(x: torch.Tensor, policy: CachePolicy) -> torch.Tensor:
    """A float64 transcription of what a policy gives back for vectors x [..., D]."""
    x = x.double()
    if policy.kind == "fp8":  # e4m3: saturating at +-448, then the nearest of its values (torch's cast rounds so)
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).double()
    levels = 2**policy.bits - 1
    group = policy.group or x.shape[-1]
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / levels
    codes = torch.where(scale > 0, ((g - lo) / scale).round().clamp(0, levels), 0)
    return (codes * scale + lo).reshape(x.shape)


def _by_position(view, ring_step: bool = False):
    """(positions, keys, values) of a view, in order of position. Without ``k_pos`` a view holds the S positions
    up to ``end``: in order, or (``ring_step``: a ring buffer's one-token step) position p in slot p % S."""
    S = view.k.shape[2]
    pos = view.k_pos
    if pos is None:
        pos = torch.arange(view.end - S, view.end)
        pos = (view.end - 1) - (view.end - 1 - torch.arange(S)) % S if S and ring_step else pos
    order = pos.argsort()
    return pos[order], view.k[:, :, order], view.v[:, :, order]


@pytest.mark.parametrize("spec", POLICIES, ids=str)
@pytest.mark.parametrize("layout", ["static", "ring", "sinks"])
def test_a_slot_gives_back_the_round_trip_of_what_it_held_and_the_new_tokens_as_computed(spec, layout):
    policy = CachePolicy.from_spec(spec)
    B, H, D = 2, 3, 16
    plain = {"static": StaticKV(B, H, 24, D, D, dtype=torch.float64, device="cpu"),
             "ring": RingKV(B, H, 6, D, D, dtype=torch.float64, device="cpu"),
             "sinks": SinkRingKV(B, H, 2, 5, D, D, dtype=torch.float64, device="cpu")}[layout]  # fmt: skip
    # the layer's rotary given, as the model gives it: a codec leaves a layer's own sinks (Hymba's) where they are
    slot = PolicyKV.like(plain, policy, "cpu", rotary=Rotary(D, 10000.0, 64))
    window = {"static": 0, "ring": 6, "sinks": 5}[layout]
    torch.manual_seed(0)
    start = 0
    for t in [5, 1, 1, 4, 1, 1, 3]:
        k, v = torch.randn(B, H, t, D, dtype=torch.float64) * 3, torch.randn(B, H, t, D, dtype=torch.float64)
        ours, ref = (
            _by_position(slot.update(k, v, start)),
            _by_position(plain.update(k, v, start), layout == "ring" and t == 1),
        )
        # the positions the full-precision slot holds, but the one a window has just left, which no query reaches
        reached = (ref[0] < getattr(plain, "sinks", 0)) | (ref[0] > start - window) if window else ref[0] >= 0
        ref = tuple(x[:, :, reached] if x.dim() > 1 else x[reached] for x in ref)
        assert torch.equal(ours[0], ref[0])
        old = ref[0] < start  # held from earlier steps: their codes; this step's: as computed
        for got, want in zip(ours[1:], ref[1:], strict=True):
            torch.testing.assert_close(got[:, :, old], _round_trip(want[:, :, old], policy), rtol=0, atol=1e-12)
            torch.testing.assert_close(got[:, :, ~old], want[:, :, ~old], rtol=0, atol=0)
        start += t
        assert slot.nbytes(start) == slot.bytes_per_position * plain.nbytes(start) // plain.bytes_per_position


def test_policy_bytes_count_codes_scales_and_zero_points():
    fp32 = torch.float32
    assert CachePolicy.from_spec("int8").bytes_per_vector(64, fp32) == 64 + 2 * 4  # one scale and zero point
    assert CachePolicy.from_spec("int4").bytes_per_vector(64, torch.bfloat16) == 32 + 2 * 2
    assert CachePolicy.from_spec({"kind": "int4", "group": 16}).bytes_per_vector(64, fp32) == 32 + 4 * 2 * 4
    assert CachePolicy.from_spec("fp8").bytes_per_vector(64, fp32) == 64
    model = build_model(VARIANTS["gqa"])  # 4 layers, 2 K/V heads of 16 channels, keys and values
    assert model.kv_footprint(torch.bfloat16, policy="int4").bytes_per_token == 4 * 2 * 2 * (8 + 4)
    assert "K/V int4" in model.kv_footprint(torch.bfloat16, policy="int4").table()


def test_streaming_llm_attends_to_the_sinks_and_the_window_at_their_positions_in_the_cache():
    """The paper's definition, in float64: keys cached before RoPE, the kept ones (the first 2, the last 5) at
    their indices in the cache, the query at the next one; kvlab caches keys after RoPE at their positions in
    the text, turns the sinks' by the tokens evicted, and must give every kept key the same score."""
    B, H, D, theta = 1, 2, 8, 10000.0
    rotary = Rotary(D, theta, 64)
    slot = PolicyKV.like(StaticKV(B, H, 64, D, D, dtype=torch.float64, device="cpu"),
                         CachePolicy.from_spec(SINKS), "cpu", rotary=rotary)  # fmt: skip
    torch.manual_seed(0)
    raw = torch.randn(B, H, 30, D, dtype=torch.float64)  # keys before RoPE
    cos, sin = rotary(0, 31)
    prompt = apply_rope(raw[:, :, :9], cos[:9], sin[:9])  # cached after RoPE, at their positions in the text
    slot.update(prompt, raw[:, :, :9], 0)  # a prompt of 9 (attends as computed), then token by token
    for t in range(9, 30):
        key = apply_rope(raw[:, :, t : t + 1], cos[t : t + 1], sin[t : t + 1])
        view = slot.update(key, raw[:, :, t : t + 1], t)
        q = torch.randn(B, H, 1, D, dtype=torch.float64)
        ours = apply_rope(q, cos[t : t + 1], sin[t : t + 1]) @ view.k.transpose(2, 3)  # the query at its own position
        kept = [0, 1, *range(t - 4, t + 1)]  # the sinks, and the window with the new token
        assert view.v.shape[2] == len(kept)
        torch.testing.assert_close(view.v[:, :, view.k_pos.argsort()], raw[:, :, kept], rtol=0, atol=0)
        cache_cos, cache_sin = rotary(0, len(kept))  # the paper: positions within the cache
        keys = apply_rope(raw[:, :, kept], cache_cos, cache_sin)
        query = apply_rope(q, cache_cos[-1:], cache_sin[-1:])
        torch.testing.assert_close(ours[..., view.k_pos.argsort()], query @ keys.transpose(2, 3), rtol=1e-5, atol=1e-5)
        assert view.k_pos.max() == t and sorted(view.k_pos.tolist()) == list(range(t - len(kept) + 1, t + 1))
        # What a layer reading this one's K/V (LCKV's) sees before the next token, eager and in the static step:
        # the same kept keys at the same cache positions, its query at the next one. (Its view kept the sinks
        # unturned at their text positions, and LCKV's readers took the keys for positions 0..S-1.)
        query = apply_rope(q, *(c[-1:] for c in rotary(0, len(kept) + 1)))
        for held in (slot.view(t + 1), slot.view(torch.tensor(t + 1))):
            ours = apply_rope(q, cos[t + 1 : t + 2], sin[t + 1 : t + 2]) @ held.k.transpose(2, 3)
            torch.testing.assert_close(ours[..., held.k_pos.argsort()], query @ keys.transpose(2, 3), rtol=1e-5,
                                       atol=1e-5)  # fmt: skip


def test_sinks_evict_only_past_their_cache_and_decode_exactly_before():
    model = build_model(VARIANTS["gqa"]).eval()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        plain, streaming = model.new_cache(2, 24), model.new_cache(2, 24, policy=SINKS | {"window": 10})
        outs = [[model(ids[:, :4], cache=c)] for c in (plain, streaming)]
        for t in range(4, 24):
            for out, c in zip(outs, (plain, streaming), strict=True):
                out.append(model(ids[:, t : t + 1], cache=c))
        full, evicting = (torch.cat(o, dim=1) for o in outs)
    torch.testing.assert_close(evicting[:, :12], full[:, :12])  # 12 tokens fit in 2 sinks + 10: nothing moved
    assert not torch.allclose(evicting[:, 12:], full[:, 12:])  # then the middle is gone
    assert streaming.nbytes() == model.kv_footprint(torch.float32, policy=SINKS | {"window": 10}).total_bytes(24, 2)
    assert streaming.nbytes() * 24 == plain.nbytes() * 12


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_holds_keys_per_channel_and_values_per_token_behind_a_full_precision_residual(bits):
    policy = CachePolicy.from_spec(KIVI | {"bits": bits})
    B, H, D, G, R = 2, 3, 8, 4, 8
    slot = KiviKV.like(StaticKV(B, H, 40, D, D, dtype=torch.float64, device="cpu"), policy, "cpu")
    torch.manual_seed(0)
    keys, values = torch.empty(B, H, 0, D, dtype=torch.float64), torch.empty(B, H, 0, D, dtype=torch.float64)
    start = 0
    for t in [5, 1, 1, 9, 1, 3, 1, 7, 8, 1]:
        k, v = torch.randn(B, H, t, D, dtype=torch.float64) * 3, torch.randn(B, H, t, D, dtype=torch.float64)
        view = slot.update(k, v, start)
        assert view.k_pos is None and view.end == start + t
        # the transcription: keys of the whole residuals before `start` per channel, in groups of G tokens;
        # values older than the last R per token, in groups of G channels; the rest as computed
        q_k, q_v = start // R * R, max(start - R, 0)
        want_k = torch.cat(
            [_round_trip(keys[:, :, :q_k].transpose(2, 3), policy).transpose(2, 3), keys[:, :, q_k:], k], 2
        )
        want_v = torch.cat([_round_trip(values[:, :, :q_v], policy), values[:, :, q_v:], v], 2)
        torch.testing.assert_close(view.k, want_k, rtol=0, atol=1e-12)
        torch.testing.assert_close(view.v, want_v, rtol=0, atol=1e-12)
        keys, values, start = torch.cat([keys, k], 2), torch.cat([values, v], 2), start + t
        # bytes by hand: codes of bits per element, a scale and a zero point per group, the rest 8 bytes each
        q_k, q_v = start // R * R, max(start - R, 0)
        by_hand = B * H * (q_k * D * bits // 8 + D * (q_k // G) * 2 * 8 + (start - q_k) * D * 8)
        by_hand += B * H * (q_v * D * bits // 8 + q_v * (D // G) * 2 * 8 + (start - q_v) * D * 8)
        assert slot.nbytes(start) == by_hand
    held = slot.view(start)  # what a later layer reads (LCKV): every position, the same way
    q_k, q_v = start // R * R, max(start - R, 0)
    torch.testing.assert_close(held.k[:, :, q_k:], keys[:, :, q_k:], rtol=0, atol=0)
    torch.testing.assert_close(held.v[:, :, :q_v], _round_trip(values[:, :, :q_v], policy), rtol=0, atol=1e-12)


H2O = {"kind": "h2o", "budget": 6, "window": 2}  # evicting from the 7th token on (SnapKV: test_cache_eviction)
REFUSALS = "latent|window|MatryoshkaKV|DHA|KDGQA|later layer|value_residual|nothing to hold|nothing to merge"
MINICACHE = {"kind": "minicache", "start_layer": 0, "retain": 0.25}  # every pair merged, a position kept in four


@pytest.mark.parametrize(
    "spec", ["int4", KIVI, SINKS, SINKS_INT4, H2O, MINICACHE], ids=str
)  # fp8: as int4 but for the codec (tested above)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cache_bytes_equal_the_policys_footprint_for_every_layout(name, spec):
    model = build_model(VARIANTS[name]).eval()
    try:
        fp = model.kv_footprint(torch.float32, policy=spec)
    except ValueError as e:  # MLA's latent, KIVI in a window, MatryoshkaKV's sinks, ...: refused by both alike
        assert re.search(REFUSALS, str(e)), str(e)
        with pytest.raises(ValueError, match=REFUSALS):
            model.new_cache(2, 20, dtype=torch.float32, policy=spec)
        return
    cache = model.new_cache(batch_size=2, max_len=20, dtype=torch.float32, policy=spec)
    assert cache.nbytes() == fp.total_bytes(0, batch_size=2)
    ids = torch.randint(0, 97, (2, 20))
    seen = 0
    with torch.no_grad():
        full = model(ids)
        for size in [6, 1, 1, 5, 1, 6]:
            out = model(ids[:, seen : seen + size], cache=cache)
            if seen == 0:  # a prompt in one step attends as computed: the forward's logits
                torch.testing.assert_close(out, full[:, :size])
            seen += size
            assert cache.nbytes() == fp.total_bytes(seen, batch_size=2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", [None, "int8"], ids=str)
def test_a_window_with_sinks_over_a_policy_goes_block_by_block_as_over_one_mask(spec):
    """Hymba's windows over a long prompt's second piece (its sink ring wrapped; held as codes or not): block by
    block, keys listed in the order of their positions, as through one mask over every key."""
    model = build_model(VARIANTS["hymba"]).eval()  # windows of 4 with 3 sinks
    ids = torch.randint(0, 97, (2, 30))
    runs, seen = [], []
    for blocks in (True, False):
        take = Attention._sinks_block_by_block if blocks else (lambda self, q, view, state: False)
        with torch.no_grad(), mock.patch.object(Attention, "_sinks_block_by_block", take):
            cache = model.new_cache(2, 30, policy=spec)
            model(ids[:, :13], cache=cache)
            with mock.patch("kvlab.layers.attention.windowed_attention_with_sinks", wraps=windowed) as spy:
                runs.append(model(ids[:, 13:], cache=cache))
            seen += [call.args[4] for call in spy.call_args_list]
    assert seen and all(bool((pos[1:] > pos[:-1]).all()) for pos in seen)  # the block path ran, in order
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)


def _decode_eager_and_static(model, ids, spec, prompt: int):
    """Prefill ``prompt`` tokens into two caches held through ``spec``, then decode the rest of ``ids`` one token a
    step eagerly and through the static decode step, checking each step's logits agree; the prefill's logits,
    the last step's, the eager cache and the static one."""
    T = ids.shape[1]
    eager, static = (model.new_cache(ids.shape[0], T, policy=spec) for _ in range(2))
    prefill = model(ids[:, :prompt], cache=eager)
    model(ids[:, :prompt], cache=static)
    for t in range(prompt, T):
        a = model(ids[:, t : t + 1], cache=eager)[:, -1]
        b = model.decode_step(ids[:, t : t + 1], static, torch.tensor(static.start))
        static.seen += 1
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    return prefill, a, eager, static


def test_decoding_through_a_policy_costs_little_and_the_static_step_agrees_with_the_eager_one():
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 6})).eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = model(ids)
        errors = {}
        for spec in ["int8", "int4"]:
            _, last, _, _ = _decode_eager_and_static(model, ids, spec, 8)
            errors[spec] = (last - full[:, -1]).abs().max().item()
    assert 0 < errors["int8"] < errors["int4"] < 0.1  # lossy, more so at 4 bits, still close


@pytest.mark.parametrize("spec", [SINKS, SINKS_INT4], ids=str)
def test_the_static_step_moves_the_sinks_as_the_eager_one(spec):
    model = build_model(VARIANTS["gqa"]).eval()  # every layer caches every token: the sinks policy applies
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        _decode_eager_and_static(model, ids, spec, 3)  # evicting from t = 7 on


def test_sinks_with_a_codec_hold_the_kept_positions_as_its_codes():
    """StreamingLLM's positions (the same as without a codec), their values the codec's round trip of what the
    uncoded policy holds, the step's own as computed; bytes: the codec's per kept position."""
    B, H, D = 2, 3, 16
    plain, coded = (PolicyKV.like(StaticKV(B, H, 24, D, D, dtype=torch.float64, device="cpu"),
                                  CachePolicy.from_spec(spec), "cpu", rotary=Rotary(D, 10000.0, 64))
                    for spec in (SINKS, SINKS_INT4))  # fmt: skip
    int4 = CachePolicy.from_spec({"kind": "int4", "group": 8})
    torch.manual_seed(0)
    start = 0
    for t in [5, 1, 1, 4, 1, 1, 3]:
        k, v = torch.randn(B, H, t, D, dtype=torch.float64) * 3, torch.randn(B, H, t, D, dtype=torch.float64)
        ours, ref = coded.update(k, v, start), plain.update(k, v, start)
        assert torch.equal(ours.k_pos, ref.k_pos) if ref.k_pos is not None else ours.k_pos is None
        old = (ref.k_pos if ref.k_pos is not None else torch.arange(ref.v.shape[2])) < start
        torch.testing.assert_close(ours.v[:, :, old], _round_trip(ref.v[:, :, old], int4), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.v[:, :, ~old], ref.v[:, :, ~old], rtol=0, atol=0)
        start += t
        assert coded.nbytes(start) * plain.bytes_per_position == plain.nbytes(start) * coded.bytes_per_position
    assert coded.bytes_per_position == 2 * B * H * int4.bytes_per_vector(D, torch.float64)
    assert CachePolicy.from_spec(SINKS_INT4).describe() == "sinks 2 + window 5, int4 (group 8)"


def test_generate_takes_a_policy():
    model = build_model(VARIANTS["gqa"]).eval()
    ids = torch.randint(0, 97, (2, 5))
    out = model.generate(ids, max_new_tokens=4, compile=False, cache_policy="int8")
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids)
    out = model.generate(ids, max_new_tokens=12, compile=False, cache_policy=KIVI)  # crosses the residual
    assert out.shape == (2, 17) and torch.equal(out[:, :5], ids)


def _padded_then_each_alone(model, policy, rows, new):
    """Logits of left-padded ``rows`` prefilled then decoding ``new`` [B, n] through ``policy``, and each row's
    alone."""
    ids, mask = model.left_padded(rows, pad_id=1)
    with torch.no_grad():
        cache = model.new_cache(len(rows), ids.shape[1] + new.shape[1], policy=policy)
        got = [model(ids, cache=cache, attention_mask=mask)[:, -1]]
        got += [model(new[:, t : t + 1], cache=cache)[:, 0] for t in range(new.shape[1])]
        alone = []
        for b, row in enumerate(rows):
            cache = model.new_cache(1, len(row) + new.shape[1], policy=policy)
            want = [model(row[None], cache=cache)[0, -1]]
            want += [model(new[b : b + 1, t : t + 1], cache=cache)[0, 0] for t in range(new.shape[1])]
            alone.append(torch.stack(want))
    return torch.stack(got, 1), torch.stack(alone)


WINDOW = {"kind": "sinks", "sinks": 0, "window": 5}


@pytest.mark.parametrize(
    "name, policy",
    [("cla2", "int4"), ("cla2", "fp8"), ("cla2", WINDOW), ("cla2", {"kind": "h2o", "budget": 8}), ("lckv", WINDOW)],
    ids=["cla2-int4", "cla2-fp8", "cla2-window", "cla2-h2o", "lckv-window"],
)
def test_padded_rows_through_a_policy_get_what_they_get_alone(name, policy):
    """Codes per token and head, a window without sinks (rows end together) and choices per row take pads. LCKV's
    readers of the top layer's window read its positions (they took the S kept keys for positions 0..S-1: a
    padded row's pads were not hidden, 0.19 off in the logits, and every row read its keys at wrong positions)."""
    model = build_model(VARIANTS[name]).eval()
    rows = [torch.randint(0, 97, (n,)) for n in (11, 4)]
    got, alone = _padded_then_each_alone(model, policy, rows, torch.randint(0, 97, (2, 6)))
    assert (got - alone).abs().max() <= 3e-5


@pytest.mark.parametrize("policy", [SINKS, SINKS_INT4, KIVI, {"kind": "minicache", "start_layer": 2}])
def test_policies_counting_from_the_caches_first_position_refuse_pads_and_generate_goes_row_by_row(policy):
    """StreamingLLM's sinks, KIVI's groups and MiniCache's retention count from the cache's first position, a pad
    in a padded row (a shorter row kept pads as its sinks: 0.14 off in the logits): a padded forward is refused,
    naming the policy and why, and ``generate`` gives each row what it generates alone."""
    model = build_model(VARIANTS["gqa"]).eval()
    rows = [torch.randint(0, 97, (n,)) for n in (11, 4)]
    ids, mask = model.left_padded(rows, pad_id=1)
    described = re.escape(CachePolicy.from_spec(policy).describe())
    with pytest.raises(ValueError, match=rf"attention_mask: cache policy {described} takes no padded rows \(.*pads"):
        model(ids, cache=model.new_cache(2, 24, policy=policy), attention_mask=mask)
    out = model.generate(rows, max_new_tokens=12, compile=False, cache_policy=policy)  # evicts, fills groups
    for b, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=12, compile=False, cache_policy=policy)
        assert torch.equal(out[b, ids.shape[1] - len(row) :], alone[0])


@pytest.mark.parametrize("length", [20, 30], ids=["residual-multiple", "ragged"])
def test_kivis_static_step_agrees_with_the_eager_one(length):
    """Keys flushed from the residual at every multiple of it, values leaving it one a step, from a prompt
    shorter than the residual and across it, up to a cache whose last keys never fill a residual (30 = 3 x 8 + 6);
    the same codes held after."""
    model = build_model(VARIANTS["gqa"]).eval()
    ids = torch.randint(0, 97, (2, length))
    with torch.no_grad():
        for prompt in (3, 11):
            _, _, eager, static = _decode_eager_and_static(model, ids, KIVI, prompt)
            slots = [(a, b) for a, b in zip(eager.slots, static.slots, strict=True) if isinstance(a, KiviKV)]
            assert slots
            for a, b in slots:  # the same codes; the key residual's stale places aside (never read)
                for x, y in zip(a._tensors(), b._tensors(), strict=True):
                    if x is not a.k_residual:
                        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="static step takes one token"):
        model.decode_step(ids[:, :2], model.new_cache(2, 16, policy=KIVI), torch.tensor(0))


def test_kivis_held_view_in_the_static_form_is_the_eager_one():
    """What LCKV's readers of a later layer see when decoding: every position held before ``end``, read from the
    codes or the residuals, the same in the compiled step's form (a tensor ``end``; it had none, and the compiled
    step fell back to eager)."""
    B, H, D = 2, 2, 8
    slot = KiviKV(B, H, H, 30, D, D, policy=CachePolicy.from_spec(KIVI), dtype=torch.float32, device="cpu")
    keys, values = torch.randn(B, H, 30, D), torch.randn(B, H, 30, D)
    slot.update(keys[:, :, :5], values[:, :, :5], 0)
    for end in range(5, 30):
        eager, static = slot.view(end), slot.view(torch.tensor(end))
        held = static.k_pos < end
        assert held.sum() == end and torch.equal(static.k_pos[held], torch.arange(end))
        torch.testing.assert_close(static.k[:, :, held], eager.k, rtol=0, atol=0)
        torch.testing.assert_close(static.v[:, :, held], eager.v, rtol=0, atol=0)
        slot.update(keys[:, :, end : end + 1], values[:, :, end : end + 1], end)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("int3", "kind='int3' is not one of none, int8, int4, fp8, kivi, sinks"),
        ({"kind": "int4", "bit": 4}, "unknown key 'bit'; valid keys are kind, group, bits, residual, sinks, window"),
        ({"kind": "int4", "bits": 4}, "bits is a setting of kivi, not of int4"),
        ({"kind": "fp8", "group": 8}, "group is a setting of int8, int4, kivi, sinks, not of fp8"),
        ({"kind": "sinks", "window": 0}, "sinks=4 and window=0 must be counts of tokens"),
        ({"kind": "kivi", "bits": 3}, "bits=3 is not one of 2, 4"),
        ({"kind": "kivi", "group": 32, "residual": 48}, "residual=48 must be a positive multiple of group=32"),
        ({"kind": "int4", "group": 0}, "group=0 is not valid"),
        ({"kind": "int4", "codec": "int8"}, "codec is a setting of sinks, not of int4"),
        ({"kind": "sinks", "codec": "int2"}, "codec='int2' is not one of int8, int4, fp8"),
        ({"kind": "sinks", "codec": "fp8", "group": 8}, "group is a setting of its codec int8 or int4"),
        (3, "give a name"),
    ],
)
def test_bad_policies_are_refused_naming_what_is_valid(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CachePolicy.from_spec(spec)


def test_a_group_that_does_not_divide_the_head_is_refused_naming_the_layer():
    model = build_model(VARIANTS["gqa"])  # heads of 16 channels
    with pytest.raises(ValueError, match="layer 0's keys caches vectors of 16 channels"):
        model.new_cache(1, 8, policy={"kind": "int4", "group": 5})


@pytest.mark.slow
# a ring buffer, every slot read whole and masked; KIVI's residual flushed twice (new tokens past 2 x 8); LCKV's
# readers of a later layer's sinks and window, or KIVI's codes (their held views had no static form: the step fell
# back to eager)
@pytest.mark.parametrize("name, spec", [("window", "int4"), ("gqa", KIVI), ("lckv", SINKS), ("lckv", KIVI)],
                         ids=["int4-ring", "kivi", "lckv-sinks", "lckv-kivi"])  # fmt: skip
def test_the_compiled_decode_step_reads_a_quantized_cache_as_the_eager_one(name, spec):
    model = build_model(VARIANTS[name]).eval()
    ids = torch.randint(0, 97, (2, 6))
    compiled = model.generate(ids, max_new_tokens=14, compile=True, cache_policy=spec)
    assert decode_step_for(model, True).compiled
    assert torch.equal(compiled, model.generate(ids, max_new_tokens=14, compile=False, cache_policy=spec))


@pytest.mark.parametrize("spec", ["int8", {"kind": "int4", "group": 8}], ids=str)
def test_mlas_latent_is_held_as_codes_and_its_rope_keys_and_the_steps_own_as_computed(spec):
    from kvlab.layers.cache_policy import PolicyLatentKV

    policy = CachePolicy.from_spec(spec)
    slot = PolicyLatentKV(2, 12, 16, 4, policy.bits, policy.group or 16, dtype=torch.float64, device="cpu")
    latents = torch.randn(2, 12, 20, dtype=torch.float64)
    start = 0
    for t in [5, 1, 4, 2]:
        held = slot.update(latents[:, start : start + t], start)
        before = latents[:, :start]
        torch.testing.assert_close(held[:, :start, :16], _round_trip(before[..., :16], policy), rtol=0, atol=1e-12)
        assert torch.equal(held[:, :start, 16:], before[..., 16:])  # the RoPE keys as computed
        assert torch.equal(held[:, start:], latents[:, start : start + t])  # the step's own as computed
        start += t
    model = build_model(VARIANTS["mla"]).eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = model(ids)
        prefill, last, eager, _ = _decode_eager_and_static(model, ids, spec, 8)
    torch.testing.assert_close(prefill, full[:, :8])  # a prompt attends as computed
    assert 0 < (last - full[:, -1]).abs().max() < 0.1
    assert eager.nbytes() == model.kv_footprint(torch.float32, policy=spec).total_bytes(16, batch_size=2)
