"""Left-padded rows (``attention_mask``): every row gets the logits and tokens it gets alone, unpadded, through
a forward without a cache, a cached prefill, decoding after it (eager and the static decode step) and
generate; models that cannot take pads say so, and generate then goes row by row."""

import pytest
import torch

from kvlab import build_model
from kvlab.kernels.causal_conv import causal_conv1d_reference, skipping_pads, token_shift
from tests.archs.test_decode import VARIANTS
from tests.conftest import PRESETS, preset_dict, tiny

ROWS = (9, 4, 6)  # each row's tokens; the longest sets the padded width
NEW = 4  # tokens decoded after the prompt


def _preset(name: str) -> dict:
    spec = preset_dict(name)
    if (spec.get("kv_sharing") or {}).get("kind") == "lckv":  # as many parallel passes as tokens: exact
        spec["passes"] = {"no_grad": 10, "grad": 2}
    return spec


def _refuses(spec: dict) -> bool:
    return not build_model(spec | {"vocab_size": 97}).takes_pads()


SPECS = {f"preset:{n}": _preset(n) for n in PRESETS} | {f"variant:{n}": s for n, s in VARIANTS.items()}
TAKING = [n for n, s in SPECS.items() if not _refuses(s)]
REFUSING = [n for n, s in SPECS.items() if _refuses(s)]


def _padded(model, vocab: int):
    rows = [torch.randint(0, vocab, (n,)) for n in ROWS]
    ids, mask = model.left_padded(rows, pad_id=1)
    return rows, ids, mask


@pytest.mark.parametrize("name", TAKING)
def test_padded_rows_match_each_row_alone(name):
    model = build_model(SPECS[name]).eval()
    vocab = model.config.vocab_size
    rows, ids, mask = _padded(model, vocab)
    width, new = ids.shape[1], torch.randint(0, vocab, (len(ROWS), NEW))
    with torch.no_grad():
        uncached = model(ids, attention_mask=mask)
        cache = model.new_cache(len(ROWS), width + NEW)
        prefill = model(ids, cache=cache, attention_mask=mask)
        steps = [model(new[:, t : t + 1], cache=cache) for t in range(NEW)]
        for b, row in enumerate(rows):
            alone = model.new_cache(1, len(row) + NEW)
            want = model(row[None], cache=alone)[0]
            want_steps = [model(new[b : b + 1, t : t + 1], cache=alone)[0, 0] for t in range(NEW)]
            # float32 summation order over the presets' widths: up to about 1e-5 on some machines' BLAS
            assert (uncached[b, -len(row) :] - model(row[None])[0]).abs().max() <= 3e-5
            assert (prefill[b, -len(row) :] - want).abs().max() <= 3e-5
            for t in range(NEW):
                assert (steps[t][b, 0] - want_steps[t]).abs().max() <= 3e-5, t


@pytest.mark.parametrize("window", [4, 6])
def test_a_ring_buffer_that_wraps_with_pads_still_inside_it_decodes_each_row_as_alone(window):
    """A window's ring holds positions in slot order once it wraps; a row's pads that are still inside the
    window must be masked at the slots that hold them (they were masked by place, as if the slots were in
    order: 2-token rows padded to 9 decoded other tokens than alone)."""
    model = build_model(tiny(n_layers=2, mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 1,
                                                "window": window})).double().eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [torch.randint(0, 97, (n,)) for n in (9, 2, 6)]
    ids, mask = model.left_padded(rows)
    new = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        model(ids, cache=cache, attention_mask=mask)
        steps = torch.cat([model(new[:, t : t + 1], cache=cache) for t in range(6)], dim=1)
        for b, row in enumerate(rows):
            alone = model.new_cache(1, 16)
            model(row[None], cache=alone)
            want = torch.cat([model(new[b : b + 1, t : t + 1], cache=alone) for t in range(6)], dim=1)
            torch.testing.assert_close(steps[b], want[0], rtol=0, atol=1e-12, msg=f"row {b}")
    together = model.generate(rows, 6, compile=False)
    for b, row in enumerate(rows):
        assert torch.equal(together[b, -6:], model.generate(row[None], 6, compile=False)[0, -6:])


@pytest.mark.parametrize("name", ["variant:gqa", "variant:window", "variant:mla", "variant:hymba", "preset:rwkv7"])
def test_static_decode_step_after_a_padded_prefill(name):
    """The compiled step's form (a tensor position, whole buffers masked) reads the pads from the cache."""
    model = build_model(SPECS[name]).eval()
    rows, ids, mask = _padded(model, model.config.vocab_size)
    new = torch.randint(0, model.config.vocab_size, (len(ROWS), NEW))
    with torch.no_grad():
        eager, static = (model.new_cache(len(ROWS), 32) for _ in range(2))
        model(ids, cache=eager, attention_mask=mask)
        model(ids, cache=static, attention_mask=mask)
        for t in range(NEW):
            want = model(new[:, t : t + 1], cache=eager)[:, 0]
            got = model.decode_step(new[:, t : t + 1], static, torch.tensor(static.start))
            static.seen += 1
            assert (got - want).abs().max() <= 1e-5, t


def test_generate_takes_prompts_of_any_length():
    model = build_model(SPECS["preset:samba"]).eval()
    rows = [torch.randint(0, 4096, (n,)) for n in ROWS]
    out = model.generate(rows, max_new_tokens=5)
    ids, mask = model.left_padded(rows, pad_id=0)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, attention_mask=mask))
    assert torch.equal(out[:, : ids.shape[1]], ids)  # the prompts, left-padded as given
    for b, row in enumerate(rows):
        assert torch.equal(out[b, ids.shape[1] :], model.generate(row[None], max_new_tokens=5)[0, len(row) :])


@pytest.mark.parametrize("name", REFUSING)
def test_models_that_take_no_pads_say_so_and_generate_row_by_row(name):
    model = build_model(SPECS[name]).eval()
    rows, ids, mask = _padded(model, model.config.vocab_size)
    with pytest.raises(ValueError, match="takes no padded rows"):
        model(ids, attention_mask=mask)
    out = model.generate(ids, max_new_tokens=3, attention_mask=mask)
    for b, row in enumerate(rows):
        assert torch.equal(out[b, -3:], model.generate(row[None], max_new_tokens=3)[0, -3:])


def test_sinks_over_pads_are_refused():
    """A sink is a row's first position, a pad in a padded row: only meta tokens can be sinks there (Hymba)."""
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "window": 4, "sinks": 2})).eval()
    rows, ids, mask = _padded(model, 97)
    with pytest.raises(ValueError, match="sinks=2 are a row's first positions"):
        model(ids, attention_mask=mask)
    assert not model.takes_pads()  # so generate goes row by row (it raised the forward's error)
    together = model.generate(rows, 3, compile=False)
    for b, row in enumerate(rows):
        assert torch.equal(together[b, -3:], model.generate(row[None], 3, compile=False)[0, -3:])


def test_a_window_that_keeps_meta_tokens_only_by_distance_refuses_pads_and_generates_row_by_row():
    """Pads stand between the meta tokens and a row's tokens: a window without the meta tokens as sinks would see
    them leave sooner than alone (a 2-token row padded to 9 got other logits), so such a model refuses pads."""
    model = build_model(tiny(n_layers=2, meta_tokens=1, mixer={"kind": "attention", "n_heads": 4, "window": 4}))
    rows, ids, mask = _padded(model.eval(), 97)
    with pytest.raises(ValueError, match="window=4 keeps 0 of the meta_tokens=1 as sinks"):
        model(ids, attention_mask=mask)
    assert not model.takes_pads()
    together = model.generate(rows, 3, compile=False)
    for b, row in enumerate(rows):
        assert torch.equal(together[b, -3:], model.generate(row[None], 3, compile=False)[0, -3:])


def test_an_all_ones_mask_is_no_padding():
    model = build_model(SPECS["variant:gqa"]).eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), model(ids))
        model(ids, cache=cache, attention_mask=torch.ones_like(ids))
    assert cache.pads is None


def test_later_steps_take_the_whole_mask_or_their_own():
    """transformers' generate gives the mask of every token so far; a step's own mask holds only 1s."""
    model = build_model(SPECS["variant:gqa"]).eval()
    rows, ids, mask = _padded(model, 97)
    token = torch.randint(0, 97, (3, 1))
    with torch.no_grad():
        a, b, c = (model.new_cache(3, 16) for _ in range(3))
        for cache in (a, b, c):
            model(ids, cache=cache, attention_mask=mask)
        want = model(token, cache=a)
        whole = model(token, cache=b, attention_mask=torch.cat([mask, torch.ones_like(token)], dim=1))
        own = model(token, cache=c, attention_mask=torch.ones_like(token))
    assert torch.equal(whole, want) and torch.equal(own, want)


def test_bad_masks_are_named():
    model = build_model(SPECS["variant:gqa"]).eval()
    rows, ids, mask = _padded(model, 97)
    cases = [
        (mask.flip(1), "rows must be left-padded"),
        (mask[:, :-1], r"expected a \[batch, tokens\] tensor of shape \[3, 9\], got \[3, 8\]"),
        (torch.cat([mask[:1] * 0, mask[1:]]), "a row holds only pads"),
    ]
    for bad, error in cases:
        with pytest.raises(ValueError, match=error):
            model(ids, attention_mask=bad)
    cache = model.new_cache(3, 16)
    model(ids, cache=cache, attention_mask=mask)
    token = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="pads go before a row's first token"):
        model(token, cache=cache, attention_mask=torch.zeros_like(token))
    with pytest.raises(ValueError, match="its pads differ from those of the tokens the cache has seen"):
        model(token, cache=cache, attention_mask=torch.ones(3, ids.shape[1] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot be combined with positions or doc_ids"):
        model(ids, attention_mask=mask, doc_ids=torch.zeros_like(ids))


def test_beam_search_reorders_the_pads_with_the_rows():
    model = build_model(SPECS["variant:gqa"]).eval()
    _, ids, mask = _padded(model, 97)
    cache = model.new_cache(3, 16)
    with torch.no_grad():
        model(ids, cache=cache, attention_mask=mask)
    pads = cache.pads.clone()
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.pads.tolist() == [pads[2], pads[2], pads[0]]
    cache.reset()
    assert cache.pads is None


@pytest.mark.parametrize("width", [1, 3])
def test_skipping_pads_sees_only_real_inputs(width):
    """A convolution (token shift: width 1) over a row with pads inside equals it over the row without them,
    continuing ``prev``; the new prev holds the last real inputs."""
    x, prev = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, width, 5, dtype=torch.float64)
    real = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    weight, bias = torch.randn(5, width + 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y, new_prev = skipping_pads(causal_conv1d_reference, x, prev, real, width, weight=weight, bias=bias)
    for b in range(2):
        alone, alone_prev = causal_conv1d_reference(x[b : b + 1, real[b]], weight, bias, prev=prev[b : b + 1])
        assert torch.allclose(y[b, real[b]], alone[0]) and torch.allclose(new_prev[b], alone_prev[0])
    shifted, last = skipping_pads(token_shift, x, prev[:, -1], real, 1)
    for b in range(2):
        alone, alone_last = token_shift(x[b : b + 1, real[b]], prev=prev[b : b + 1, -1])
        assert torch.equal(shifted[b, real[b]], alone[0]) and torch.equal(last[b], alone_last[0])
