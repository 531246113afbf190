import pytest
import torch

from kvlab import build_model
from tests.archs.test_decode import VARIANTS


def _greedy_without_cache(model, ids, n):
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", ["gqa", "window", "cla2"])
def test_greedy_generate_matches_uncached_argmax(name):
    model = build_model(VARIANTS[name]).eval()
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, max_new_tokens=12)
    assert out.shape == (2, 18)
    assert torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        assert torch.equal(out, _greedy_without_cache(model, prompt, 12))


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = build_model(VARIANTS["gqa"]).eval()
    prompt = torch.randint(0, 97, (2, 4))
    free = model.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 6])  # the third token row 0 generates
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(out[0, :7], free[0, :7])
    assert (out[0, 7:] == eos).all()
    if (free[1, 4:] != eos).all():  # row 1 never emits eos, so it runs to the end
        assert out.shape[1] == 14 and torch.equal(out[1], free[1])


def test_sampling_is_reproducible_and_respects_top_k():
    model = build_model(VARIANTS["gqa"]).eval()
    prompt = torch.randint(0, 97, (1, 4))
    a = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top1 = model.generate(prompt, 8, temperature=1.0, top_k=1)
    assert torch.equal(top1, model.generate(prompt, 8))


def test_generate_refuses_past_max_seq_len():
    model = build_model(VARIANTS["gqa"])
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)


@pytest.mark.parametrize("name", ["gqa", "window", "yoco_swa", "mamba2", "hymba"])
def test_a_long_prompt_is_prefilled_in_pieces_with_the_same_tokens(name, monkeypatch):
    """Past ``prefill_chunk`` tokens (default ``PREFILL_CHUNK``) the prompt goes in pieces, each on the cache the ones
    before filled; one call with ``prefill_chunk=0``, or with a cache policy, which would see earlier pieces as kept."""
    import kvlab.archs.model as model_module

    torch.manual_seed(0)
    model = build_model(VARIANTS[name]).eval()
    prompt = torch.randint(0, 97, (2, 13))
    calls = []
    model.embed_tokens.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    whole = model.generate(prompt, 5, prefill_chunk=0, compile=False)
    assert calls[0] == 13
    calls.clear()
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 4)
    assert torch.equal(model.generate(prompt, 5, compile=False), whole)
    assert calls[:5] == [4, 4, 4, 1, 1]  # the pieces, then the first decode step
    with pytest.raises(ValueError, match="prefill_chunk"):
        model.generate(prompt, 5, prefill_chunk=-1)
    if name != "mamba2":  # a policy needs per-token keys and values to hold
        calls.clear()
        model.generate(prompt, 5, compile=False, cache_policy="int8")
        assert calls[0] == 13


def test_lckv_parallel_prefill_passes_take_the_prompt_in_one_call(monkeypatch):
    """LCKV's prompt in parallel passes iterates over the whole prompt at once; pieces would converge piece by piece
    (at the preset's 7 passes they differ), so ``prefill`` keeps one call; sequential passes may go in pieces."""
    import kvlab.archs.model as model_module

    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 4)
    for prefill, first in (("parallel", 13), ("sequential", 4)):
        spec = {**VARIANTS["lckv"], "kv_sharing": {"kind": "lckv", "warmup": 1},
                "passes": {"no_grad": 2, "grad": 1, "prefill": prefill}}  # fmt: skip
        model = build_model(spec).eval()
        calls = []  # the model's own calls (a sequential prefill embeds token by token within each)
        model.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(args[0].shape[1]))
        model.prefill(torch.randint(0, 97, (1, 13)), model.new_cache(1, 16))
        assert calls[0] == first
