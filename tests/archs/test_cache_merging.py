"""MiniCache (cross-layer merging): two layers' keys and values held once as SLERP-merged directions and each
layer's magnitudes, the positions furthest apart kept unmerged, read back as a float64 transcription of the
merge says, step by step; counted exactly (with every layout: test_cache_policy); refused where nothing merges."""

import math

import pytest
import torch

from kvlab import build_model
from kvlab.layers.cache_policy import CachePolicy, MergedPair
from tests.archs.test_decode import VARIANTS

MINICACHE = {"kind": "minicache", "start_layer": 0, "interpolation": 0.6, "retain": 0.25}
STEPS = [7, 1, 1, 3, 1, 1, 1, 2]  # a prompt, decoding, and a chunk of several tokens after it


def _slerp(x: list[float], y: list[float], t: float) -> tuple[list[float], float, float, float]:
    """MiniCache's merge of one pair of vectors, in float64 from the definitions: (the SLERP of their unit
    vectors, |x|, |y|, their angular distance in [0, 1])."""
    nx, ny = math.sqrt(sum(a * a for a in x)), math.sqrt(sum(b * b for b in y))
    a, b = [c / nx for c in x], [c / ny for c in y]
    omega = math.acos(max(-1.0, min(1.0, sum(p * q for p, q in zip(a, b, strict=True)))))
    if math.sin(omega) < 1e-6:  # parallel: the limit of SLERP's weights, 1 - t and t, then normalized
        e = [(1 - t) * p + t * q for p, q in zip(a, b, strict=True)]
        n = math.sqrt(sum(c * c for c in e))
        e = [c / n for c in e]
    else:
        wa, wb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
        e = [wa * p + wb * q for p, q in zip(a, b, strict=True)]
    return e, nx, ny, omega / math.pi


class _Reference:
    """One K/V head's vectors of a pair, merged position by position; after n positions the floor(retain * n)
    furthest apart of those kept before and the step's stay as computed."""

    def __init__(self, t: float, retain: float):
        self.t, self.retain = t, retain
        self.merged, self.kept = [], {}  # position -> (e, |lower|, |upper|); position -> (lower, upper, distance)

    def read(self, which: int) -> list[list[float]]:
        out = []
        for p, (e, *norms) in enumerate(self.merged):
            out.append(self.kept[p][which] if p in self.kept else [c * norms[which] for c in e])
        return out

    def merge(self, lower: list[list[float]], upper: list[list[float]]) -> None:
        candidates = dict(self.kept)
        for x, y in zip(lower, upper, strict=True):
            e, nx, ny, d = _slerp(x, y, self.t)
            candidates[len(self.merged)] = (x, y, d)
            self.merged.append((e, nx, ny))
        keep = math.floor(self.retain * len(self.merged) + 1e-9)
        ranked = sorted(candidates, key=lambda p: (-candidates[p][2], p))[:keep]
        self.kept = {p: candidates[p] for p in ranked}


def _feed(pair: MergedPair, k: list[torch.Tensor], v: list[torch.Tensor], steps: list[int], check=None):
    """Feed the pair's lower layer (k[0], v[0]) then its upper (k[1], v[1]) step by step; ``check(which, start,
    view)`` after every write."""
    start = 0
    for n in steps:
        for which, slot in enumerate((pair.lower, pair.upper)):
            view = slot.update(k[which][:, :, start : start + n], v[which][:, :, start : start + n], start)
            if check is not None:
                check(which, start, n, view)
        start += n


@pytest.mark.parametrize("parallel", [False, True], ids=["general", "parallel"])
def test_a_merged_pair_reads_back_as_a_float64_transcription_of_the_merge_says(parallel):
    policy = CachePolicy.from_spec(MINICACHE)
    B, Hk, Hv, Dk, Dv, T = 2, 2, 3, 8, 6, sum(STEPS)
    pair = MergedPair(B, Hk, Hv, T, Dk, Dv, policy=policy, dtype=torch.float64, device="cpu")
    k = [torch.randn(B, Hk, T, Dk, dtype=torch.float64) for _ in range(2)]
    v = [torch.randn(B, Hv, T, Dv, dtype=torch.float64) for _ in range(2)]
    if parallel:  # the upper layer's vectors along the lower's: merged without loss (SLERP's limit at angle 0)
        k[1], v[1] = 2.5 * k[0], 0.5 * v[0]
    refs = {(name, b, h): _Reference(policy.interpolation, policy.retain)
            for name, H in (("k", Hk), ("v", Hv)) for b in range(B) for h in range(H)}  # fmt: skip

    def check(which, start, n, view):
        for name, held, new in (("k", view.k, k[which]), ("v", view.v, v[which])):
            assert held.shape[2] == start + n and view.end == start + n
            torch.testing.assert_close(held[:, :, start:], new[:, :, start : start + n], rtol=0, atol=0)
            for b in range(B):
                for h in range(held.shape[1]):
                    expected = torch.tensor(refs[name, b, h].read(which), dtype=torch.float64).view(
                        start, held.shape[-1]
                    )
                    torch.testing.assert_close(held[b, h, :start], expected, rtol=0, atol=1e-12)
                    if which == 1:  # the upper layer's step merges it
                        lower = (k if name == "k" else v)[0][b, h, start : start + n].tolist()
                        refs[name, b, h].merge(lower, new[b, h, start : start + n].tolist())
        if which == 1:
            assert pair.k.count == pair.v.count == math.floor(policy.retain * (start + n))

    _feed(pair, k, v, STEPS, check)
    if parallel:
        for which in (0, 1):
            torch.testing.assert_close(pair.lower.view(T).k if which == 0 else pair.upper.view(T).k, k[which])
    # the lower layer's slot counts nothing; the upper's the pair: directions, magnitudes and the kept positions
    kept = math.floor(policy.retain * T)
    assert pair.lower.nbytes(T) == 0
    assert pair.upper.nbytes(T) == B * sum(H * (T * (D + 2) * 8 + kept * (2 * D * 8 + 8))
                                           for H, D in ((Hk, Dk), (Hv, Dv)))  # fmt: skip
    # beam search: rows reordered, each reads back the other's
    before = [pair.lower.view(T), pair.upper.view(T)]
    pair.lower.reorder(torch.tensor([1, 0]))
    pair.upper.reorder(torch.tensor([1, 0]))
    for slot, view in zip((pair.lower, pair.upper), before, strict=True):
        torch.testing.assert_close(slot.view(T).k, view.k.flip(0), rtol=0, atol=0)
        torch.testing.assert_close(slot.view(T).v, view.v.flip(0), rtol=0, atol=0)


def test_minicache_pairs_layers_from_the_middle_and_decodes_close_to_the_full_cache():
    """The default pairs layers 2 and 3 of four; a prompt attends as computed, decoding after it close to it;
    generate decodes eagerly through it; the bytes are the footprint's at every step."""
    model = build_model(VARIANTS["gqa"]).eval()
    fp = model.kv_footprint(torch.float32, policy="minicache")
    assert [r.bytes_per_token for r in fp.per_layer][:2] == [fp.per_layer[0].bytes_per_token] * 2
    assert fp.per_layer[2].bytes_per_token == 0 and fp.per_layer[3].bytes_per_token > 0
    assert fp.policy == "minicache from the middle layer (t 0.6, retain 0.05)"
    ids = torch.randint(0, 97, (2, 24))
    cache = model.new_cache(2, 24, dtype=torch.float32, policy="minicache")
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids[:, :16], cache=cache), full[:, :16])
        for t in range(16, 24):
            out = model(ids[:, t : t + 1], cache=cache)
            assert cache.nbytes() == fp.total_bytes(t + 1, batch_size=2)
        assert 0 < (out[:, -1] - full[:, -1]).abs().max() < 1.0
        generated = model.generate(ids[:, :5], max_new_tokens=4, cache_policy="minicache")
    assert generated.shape == (2, 9) and torch.equal(generated[:, :5], ids[:, :5])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "minicache", "interpolation": 1.5}, "interpolation=1.5 must be a number from 0 to 1"),
        ({"kind": "minicache", "retain": 1}, "retain=1 must be a fraction from 0 up to 1"),
        ({"kind": "minicache", "start_layer": -1}, "start_layer=-1 must be a layer index"),
        ({"kind": "int4", "retain": 0.1}, "retain is a setting of minicache, not of int4"),
    ],
)
def test_bad_merging_settings_are_refused_naming_what_is_valid(spec, message):
    with pytest.raises(ValueError, match=message):
        CachePolicy.from_spec(spec)


@pytest.mark.parametrize(
    "name, spec, message",
    [
        ("window", "minicache", "no two layers from layer 2 on cache every token's keys and values alike"),
        ("gqa", MINICACHE | {"start_layer": 4}, "start_layer=4 is past the last layer"),
        ("lckv", MINICACHE, "reads the K/V of the later layer"),
    ],
)
def test_models_with_nothing_to_merge_are_refused(name, spec, message):
    model = build_model(VARIANTS[name])
    for make in (lambda: model.new_cache(1, 8, policy=spec), lambda: model.kv_footprint(policy=spec)):
        with pytest.raises(ValueError, match=message):
            make()


def test_the_static_decode_step_refuses_minicache():
    model = build_model(VARIANTS["gqa"]).eval()
    cache = model.new_cache(1, 8, policy=MINICACHE)
    with torch.no_grad(), pytest.raises(ValueError, match="minicache: .* decodes eagerly"):
        model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache, torch.tensor(0))
