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


@pytest.mark.parametrize("policy", [None, "sinks"])  # a batch in one; row by row (sinks take no pads)
def test_a_generator_per_row_samples_each_row_as_alone(policy):
    """Sampled rows of one (padded) batch, each from its own generator, draw what they draw alone; one generator
    shared by the rows gives other draws (it is drawn from in turn)."""
    torch.manual_seed(0)
    model = build_model(VARIANTS["gqa"]).eval()
    prompts = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46]]
    settings = dict(max_new_tokens=12, temperature=1.5, top_k=40, compile=False, cache_policy=policy)
    if policy == "sinks":
        settings["cache_policy"] = {"kind": "sinks", "sinks": 1, "window": 8}
    seeds = [1, 2, 3]
    batched = model.generate(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **settings)
    for row, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        alone = model.generate([prompt], generator=torch.Generator().manual_seed(seed), **settings)
        assert torch.equal(batched[row, -len(prompt) - 12 :], alone[0]), row
    shared = model.generate(prompts, generator=torch.Generator().manual_seed(1), **settings)
    assert not torch.equal(shared[1:], batched[1:])
    with pytest.raises(ValueError, match="generator: 2 items for a batch of 3 rows"):
        model.generate(prompts, generator=[torch.Generator()] * 2, **settings)


def test_sampling_filters_as_transformers_warpers_do():
    """Temperature, then top-k, then top-p (nucleus), against ``transformers``' logits warpers in float64."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from kvlab.archs.model import sampling_logits

    logits = torch.randn(6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in ((0.7, None, 0.9), (1.3, 10, 0.5), (1.0, 5, None), (2.0, None, 0.05)):
        theirs = TemperatureLogitsWarper(temperature)(None, logits)
        theirs = TopKLogitsWarper(top_k)(None, theirs) if top_k else theirs
        theirs = TopPLogitsWarper(top_p)(None, theirs) if top_p else theirs
        ours = sampling_logits(logits, temperature, top_k, top_p)
        assert torch.equal(ours.isinf(), theirs.isinf()), (temperature, top_k, top_p)
        torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))
        assert 1 <= int(ours.isfinite().sum(-1).min()) and int(ours.isfinite().sum(-1).max()) < 50
    model = build_model(VARIANTS["gqa"]).eval()
    prompt = torch.randint(0, 97, (2, 4))
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_p=1e-9), model.generate(prompt, 6))
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \(0, 1\]"):
        model.generate(prompt, 6, temperature=1.0, top_p=1.5)


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
