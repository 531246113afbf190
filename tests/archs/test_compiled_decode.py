"""The compiled decode step: the static-shape step equals decoding by the cache's counter, it compiles into
one graph that serves every position, its tokens are eager's, and it falls back to eager, saying so."""

import gc
import logging
import os
import shutil
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from kvlab import build_model
from kvlab.archs import decode
from kvlab.archs.decode import DecodeStep, cache_length, cache_tensors, compile_wanted, decode_step_for
from tests.archs.test_decode import VARIANTS
from tests.conftest import PRESETS, preset_dict, tiny

# Presets whose models decode eagerly by design (static_decode = False): their cached decoding is checked in
# test_decode; here, that the compiled path falls back to it
STATIC_PRESETS = [name for name in PRESETS if "blocks" not in preset_dict(name)]

# One of each mixer family and cache kind: static and ring K/V, latents, chunk and segment buffers, recurrent
# states, parallel branches, cross-layer and later-layer reads.
# The suite traces the first five; the rest under -m slow (the static step itself is checked for all above).
# Inductor's CPU code is C++: without a compiler generate() falls back to eager (tested below), these cannot run.
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="Inductor needs a C++ compiler on CPU",
)

FAMILIES = [
    "hybrid_window",
    "mla_cla",
    "gau_flash",
    "infini",
    "hymba",
    "kdgqa_cla",
    "clla",
    "mamba_moe",
    "gemma2_softcaps",
] + [
    pytest.param(name, marks=pytest.mark.slow)
    for name in ("rwkv7", "lckv", "mamba", "yoco_gret", "matryoshka", "dgqa", "hymba_heads", "gpt_oss")
]


def _static_decode(model, ids, prefill: int, max_len: int):
    """Logits of ids after a prefill of ``prefill`` tokens, then model.decode_step for each further token."""
    cache = model.new_cache(ids.shape[0], max_len)
    steps = [model(ids[:, :prefill], cache=cache)] if prefill else []
    for t in range(prefill, ids.shape[1]):
        steps.append(model.decode_step(ids[:, t : t + 1], cache, torch.tensor(cache.start))[:, None])
        cache.seen += 1
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_static_step_matches_forward(name):
    """By index and mask over whole buffers longer than the context (unwritten places present), windows
    and chunks wrapping, from an empty cache (prefill 0) and after a prefill."""
    model = build_model(VARIANTS[name]).eval()
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        full = model(ids)
        # a sequence's first step puts the meta tokens before its tokens: the eager prefill does (generate's)
        for prefill in (1, 6) if model.config.meta_tokens else (0, 6):
            assert (_static_decode(model, ids, prefill, max_len=32) - full).abs().max() <= 1e-5, prefill


@pytest.mark.parametrize("name", STATIC_PRESETS)
def test_static_step_matches_forward_presets(name):
    spec = preset_dict(name)
    if (spec.get("kv_sharing") or {}).get("kind") == "lckv":  # as many parallel passes as tokens: exact
        spec["passes"] = {"no_grad": 10, "grad": 2}
    model = build_model(spec).eval()
    ids = torch.randint(0, 4096, (2, 10))
    with torch.no_grad():
        assert (_static_decode(model, ids, 4, max_len=16) - model(ids)).abs().max() <= 1e-5


def test_cache_tensors_finds_every_buffer():
    """What a CUDA-graph step marks static: every buffer the cache allocates (its own count of bytes), in every
    cache kind, and nothing twice."""
    for name, config in VARIANTS.items():
        cache = build_model(config).new_cache(2, 16)
        tensors = cache_tensors(cache)
        assert len({t.data_ptr() for t in tensors if t.numel()}) == len([t for t in tensors if t.numel()]), name
        assert sum(t.nbytes for t in tensors) >= cache.allocated_bytes() > 0, name


def _generate_with(step: DecodeStep, model, ids, new: int):
    """generate()'s loop with a given step (greedy)."""
    cache = model.new_cache(ids.shape[0], cache_length(ids.shape[1] + new, model.config.max_seq_len))
    with torch.no_grad():
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        out, all_logits = [], [logits]
        for _ in range(new):
            token = logits.argmax(-1)
            out.append(token[:, None])
            logits = step(token[:, None], cache)
            all_logits.append(logits)
    return torch.cat(out, dim=1), torch.stack(all_logits, 1)


@pytest.fixture
def direct_calls(monkeypatch):
    """Counts the steps that called a compiled graph directly, past TorchDynamo (``_DirectCall``)."""
    calls = []
    through = decode._DirectCall.__call__

    def counted(self, token, cache):
        calls.append(token.shape)
        return through(self, token, cache)

    monkeypatch.setattr(decode._DirectCall, "__call__", counted)
    return calls


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_traces_into_one_graph(name, direct_calls):
    """Dynamo captures the whole step without a break (fullgraph) and keeps one graph as positions move:
    traced with its eager backend here (seconds); Inductor's code is tested below on one model. Every step
    after a cache's first calls the graph directly, and gives the same tokens and logits."""
    model = build_model(VARIANTS[name]).eval()
    ids = torch.randint(0, 97, (2, 5))
    traced = DecodeStep(model, True, backend="eager")
    frames = counters["stats"]["unique_graphs"]
    tokens, logits = _generate_with(traced, model, ids, 12)
    assert traced.compiled and traced.fallback_reason is None
    assert counters["stats"]["unique_graphs"] - frames == 1
    assert len(direct_calls) == 11
    gc.collect()
    assert len(traced._direct) == 0 and traced._recorder.last is None  # nothing kept once the cache is gone
    expected_tokens, expected = _generate_with(DecodeStep(model, False), model, ids, 12)
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected).abs().max() <= 1e-5


def test_generating_under_inference_mode_stays_compiled(direct_calls):
    """Callers that wrap generation in torch.inference_mode (as many do) get the compiled step too: its tensors
    keep no version counter, which the step's recording of what a graph writes had read (it fell back to eager
    with "Inference tensors do not track version counter"); every step after the first calls the graph directly."""
    model = build_model(VARIANTS["gqa"]).eval()
    ids = torch.randint(0, 97, (2, 5))
    traced = DecodeStep(model, True, backend="eager")
    with torch.inference_mode():
        tokens, logits = _generate_with(traced, model, ids, 8)
    assert traced.compiled and traced.fallback_reason is None and len(direct_calls) == 7
    expected_tokens, expected = _generate_with(DecodeStep(model, False), model, ids, 8)
    assert torch.equal(tokens, expected_tokens) and (logits - expected).abs().max() <= 1e-5


def test_a_cache_whose_step_cannot_be_retraced_decodes_eagerly_instead_of_raising(monkeypatch):
    """A model whose step compiled for one cache meets another layout at the same shapes (a cache policy's): if
    Dynamo cannot retrace the step for it (here made to fail; KIVI's keys before their first group did, a
    division by zero groups), the retrace fails before running and the step decodes eagerly, saying why, where the
    failure had reached the caller."""
    from kvlab.layers.cache_policy import PolicyKV

    model = build_model(tiny(max_seq_len=256)).eval()
    ids = torch.randint(0, 97, (2, 12))
    traced = DecodeStep(model, True, backend="eager")
    update = PolicyKV.update

    def untraceable(self, *args):
        if torch.compiler.is_compiling():
            raise NotImplementedError("no trace of this layout")
        return update(self, *args)

    monkeypatch.setattr(PolicyKV, "update", untraceable)

    def generate(policy):
        cache = model.new_cache(2, 32, policy=policy)
        with torch.no_grad():
            token, out = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1), []
            for _ in range(6):
                out.append(token)
                token = traced(token[:, None], cache).argmax(-1)
        return torch.stack(out, 1)

    generate(None)
    assert traced.compiled
    tokens = generate("int8")
    assert not traced.compiled and "Observed exception" in traced.fallback_reason  # (Dynamo's word for a raise)
    assert torch.equal(tokens, model.generate(ids, 6, compile=False, cache_policy="int8")[:, 12:])


def test_kivis_step_compiles_before_its_first_key_group():
    """KIVI at its default settings (keys quantized in groups of 32 tokens behind a 128-token residual) on a cache
    shorter than its residual: no key group is ever held, and the compiled step (which dequantizes the held keys
    whole) took zero groups' width by zero (a ZeroDivisionError in tracing: decoding fell back to eager)."""
    model = build_model(tiny(max_seq_len=256, mixer={"kind": "attention", "n_heads": 2, "n_kv_heads": 1})).eval()
    ids = torch.randint(0, 97, (2, 12))
    traced = DecodeStep(model, True, backend="eager")
    cache = model.new_cache(2, 32, policy="kivi")
    with torch.no_grad():
        token, out = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1), []
        for _ in range(6):
            out.append(token)
            token = traced(token[:, None], cache).argmax(-1)
    assert traced.compiled and traced.fallback_reason is None
    assert torch.equal(torch.stack(out, 1), model.generate(ids, 6, compile=False, cache_policy="kivi")[:, 12:])


@needs_cxx
def test_inductor_step_gives_eager_tokens_without_recompiling(direct_calls):
    """64 steps through one compiled graph (torch's compile counters; all but the first called directly),
    the tokens and logits of eager."""
    model = build_model(tiny(max_seq_len=128)).eval()
    ids = torch.randint(0, 97, (2, 8))
    compiled = DecodeStep(model, True)
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    tokens, logits = _generate_with(compiled, model, ids, 64)
    assert compiled.compiled, compiled.fallback_reason
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert len(direct_calls) == 63
    assert sum(counters["recompiles"].values()) == recompiles
    assert list(compiled.compile_seconds) == [(2, 128, torch.float32, "cpu", False, "logits")]  # no padded rows
    expected_tokens, expected = _generate_with(DecodeStep(model, False), model, ids, 64)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # generate() itself takes a compiled step, greedy: its graph makes the choice (a graph of its own, called
    # directly after its first step), the same tokens
    steps = len(direct_calls)
    assert torch.equal(model.generate(ids, 64, compile=True), torch.cat([ids, tokens], dim=1))
    assert len(direct_calls) - steps == 62  # 63 steps after the prefill's token, the first through Dynamo
    greedy = decode_step_for(model, True)
    assert greedy.compiled and list(greedy.compile_seconds) == [(2, 128, torch.float32, "cpu", False, "tokens")]
    # weights are the graph's inputs, not constants: after an update (training goes on) it decodes with them
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    updated, _ = _generate_with(compiled, model, ids, 64)  # the same bucket: the same graph
    assert torch.equal(updated, _generate_with(DecodeStep(model, False), model, ids, 64)[0])
    assert not torch.equal(updated, tokens)
    assert list(compiled.compile_seconds) == [(2, 128, torch.float32, "cpu", False, "logits")]
    # without a gradient a direct step calls Inductor's code itself, past AOTAutograd's wrappers, and marks the
    # cache's tensors written as they do (a new version each, as on the first step, which goes through them), the
    # same logits as the eager step
    cache, reference = model.new_cache(2, 128), model.new_cache(2, 128)
    written = []
    with torch.no_grad():
        model(ids, cache=cache), model(ids, cache=reference)
        for n in range(3):
            before = [t._version for t in decode.cache_tensors(cache)]
            logits = compiled(ids[:, n : n + 1], cache)
            torch.testing.assert_close(logits, model(ids[:, n : n + 1], cache=reference)[:, -1], atol=1e-5, rtol=1e-5)
            written.append([t._version - v for t, v in zip(decode.cache_tensors(cache), before, strict=True)])
    assert any(written[0]) and written[0] == written[1] == written[2]
    assert compiled._direct[cache][False].boxed


def test_a_matryoshka_step_reads_its_bases_held_and_follows_their_updates(direct_calls):
    """MatryoshkaKV's bases depend on its parameters alone: the compiled step reads them held (no Cayley solve in
    its graph), solved again at a cache's first step (a write through ``.data``, which no version counts, is seen
    by the next generation) and after an in-place update of the rotations within a generation: checked against the
    cached forward with grad on, which solves them in every call, as the eager forward without grad does."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = build_model(VARIANTS["matryoshka"]).eval()
    rotations = [p for name, p in model.named_parameters() if name.endswith("_rotation")]

    def rotate(scale):  # away from the identity, so that the bases matter
        with torch.no_grad():
            for p in rotations:
                p.add_(torch.randn_like(p), alpha=scale)

    rotate(0.3)
    step = DecodeStep(model, True, backend=backend)
    ids = torch.randint(0, 97, (2, 5))
    compiled, held, solved = (model.new_cache(2, 32) for _ in range(3))
    with torch.no_grad():
        for cache in (compiled, held, solved):
            model(ids, cache=cache)
    for n in range(4):
        if n == 2:
            rotate(0.1)
        token = torch.randint(0, 97, (2, 1))
        with torch.enable_grad():
            expected = model(token, cache=solved)[:, -1].detach()
        with torch.no_grad():
            for logits in (step(token, compiled), model(token, cache=held)[:, -1]):
                assert (logits - expected).abs().max() <= 1e-5, n
    assert len(direct_calls) == 2  # the step after the update went through Dynamo, which took the new bases
    assert graphs and not any("linalg" in str(node.target) for g in graphs for node in g.graph.nodes)
    with torch.no_grad():
        for p in rotations:
            p.data.mul_(-1)  # unversioned: seen at the next generation's first step
        compiled, solved = model.new_cache(2, 32), model.new_cache(2, 32)
        model(ids, cache=compiled), model(ids, cache=solved)
        logits = step(ids[:, -1:], compiled)
    with torch.enable_grad():
        assert (logits - model(ids[:, -1:], cache=solved)[:, -1].detach()).abs().max() <= 1e-5


@needs_cxx
def test_inductor_step_at_batch_1_copies_no_row_before_its_products():
    """At batch 1 Inductor passes its matrix multiplies single rows viewed from larger buffers; with the stride of
    0 it reads off their size-1 dimension ATen copies each row first (``_dense_unit_strides`` gives them a dense
    one). The step makes no copy, and decodes eager's tokens."""
    from torch.profiler import profile

    model = build_model(tiny(max_seq_len=64)).eval()
    ids = torch.randint(0, 97, (1, 6))
    compiled = DecodeStep(model, True)
    compiled._recorder.options["fx_graph_cache"] = False  # compiled here, not an artifact of an earlier run
    tokens, logits = _generate_with(compiled, model, ids, 4)
    assert compiled.compiled, compiled.fallback_reason
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        model(ids, cache=cache)
        compiled(ids[:, -1:], cache)
        with profile() as prof:
            compiled(ids[:, -1:], cache)
    assert not [e.key for e in prof.key_averages() if e.key in ("aten::clone", "aten::contiguous")]
    expected_tokens, expected = _generate_with(DecodeStep(model, False), model, ids, 4)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_direct_steps_go_back_through_dynamo_when_what_it_checks_changes(direct_calls):
    """A step whose grad mode, token dtype or rows' pads differ from the cache's first step's is checked by
    Dynamo's guards again (it retraces where they fail), with eager's logits."""
    model = build_model(tiny()).eval()
    step = DecodeStep(model, True, backend="eager")
    ids = torch.randint(0, 97, (2, 6))
    cache, reference = model.new_cache(2, 32), model.new_cache(2, 32)
    with torch.no_grad():
        model(ids, cache=cache), model(ids, cache=reference)
        token = ids[:, -1:]
        # the cache's first step, then one like it (direct); grad on (Dynamo), again (direct); grad off (Dynamo)
        for grad, direct in ((False, 0), (False, 1), (True, 0), (True, 1), (False, 0)):
            with torch.set_grad_enabled(grad):
                calls = len(direct_calls)
                logits = step(token, cache)
                expected = model(token, cache=reference)[:, -1]
            assert (logits - expected).abs().max() <= 1e-5
            assert len(direct_calls) - calls == direct
        calls = len(direct_calls)  # int32 ids: a graph of their own
        assert (step(token.int(), cache) - model(token, cache=reference)[:, -1]).abs().max() <= 1e-5
        assert len(direct_calls) == calls and step._direct[cache][False].token_meta[1] == torch.int32
        cache.pads = torch.zeros(2, dtype=torch.long)  # a caller's change between steps: Dynamo sees it
        calls = len(direct_calls)
        step(token, cache)
        assert len(direct_calls) == calls and step._direct[cache][False].pads is cache.pads


def test_compilation_is_logged_with_its_shape_and_seconds(caplog):
    """One line per graph compiled, naming its shape (formatted: a wrong count of arguments would be a logging
    error, not a line)."""
    model = build_model(tiny()).eval()
    step = DecodeStep(model, True, backend="eager")
    cache = model.new_cache(2, 32)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="kvlab.archs.decode"):
        model(torch.randint(0, 97, (2, 4)), cache=cache)
        step(torch.randint(0, 97, (2, 1)), cache)
    lines = [r.getMessage() for r in caplog.records if r.name == "kvlab.archs.decode"]
    assert len(lines) == 1 and lines[0].startswith("compiled the decode step for batch 2, cache length 32 ")
    assert "padded rows: False, logits) in " in lines[0] and lines[0].endswith(" s")


def test_a_step_that_changes_the_cache_is_never_bypassed(direct_calls):
    """Dynamo replays a step's changes to the cache's attributes after its graph: such a step keeps going through
    Dynamo, so that every step makes them."""
    model = build_model(tiny()).eval()
    traced = model.decode_step

    def counting_step(token, cache, start):
        cache.counted += 1
        return traced(token, cache, start)

    model.decode_step = counting_step
    step = DecodeStep(model, True, backend="eager")
    cache = model.new_cache(1, 32)
    cache.counted = 0
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 4)), cache=cache)
        for _ in range(5):
            step(torch.randint(0, 97, (1, 1)), cache)
    assert cache.counted == 5 and not direct_calls and step._direct[cache] == {False: False}  # (the logits' graph)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (benchmarks/gpu.sh)")
@pytest.mark.parametrize("name", ["hybrid_window", "mla_cla", "mamba_moe", "matryoshka", "gau_flash"])
def test_cuda_graph_step_gives_eager_tokens(name):
    """On a GPU the compiled step replays a CUDA graph that writes the cache in place: the tokens and logits of
    eager decoding, also for a second generation, whose new cache the graph is re-recorded for."""
    model = build_model(VARIANTS[name]).eval().cuda()
    ids = torch.randint(0, 97, (2, 8), device="cuda")
    compiled = DecodeStep(model, True)
    expected_tokens, expected = _generate_with(DecodeStep(model, False), model, ids, 40)
    for _ in range(2):
        tokens, logits = _generate_with(compiled, model, ids, 40)
        assert compiled.compiled, compiled.fallback_reason
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_failed_compilation_falls_back_to_eager_and_says_why(monkeypatch, caplog):
    model = build_model(tiny()).eval()
    ids = torch.randint(0, 97, (1, 6))
    expected = model.generate(ids, 10, compile=False)

    def broken(self, *args):
        def fails(*args):
            raise RuntimeError("no C++ compiler found")

        return fails

    monkeypatch.setattr(DecodeStep, "_compile", broken)
    with caplog.at_level(logging.WARNING, logger="kvlab.archs.decode"):
        out = model.generate(ids, 10, compile=True)
    assert torch.equal(out, expected)
    step = decode_step_for(model, True)
    assert not step.compiled and "no C++ compiler found" in step.fallback_reason
    assert any("decoding eager" in r.message and "no C++ compiler" in r.message for r in caplog.records)


def test_a_model_that_decoded_is_freed_with_its_steps():
    """The steps are kept on the model, not in a map from it that their own reference would keep alive."""
    model = build_model(tiny()).eval()
    model.generate(torch.randint(0, 97, (1, 4)), 3, compile=False)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_compile_switch_and_buckets(monkeypatch):
    assert compile_wanted(True) and not compile_wanted(False)
    monkeypatch.setenv("KVLAB_COMPILE", "1")
    assert compile_wanted(None)
    monkeypatch.setenv("KVLAB_COMPILE", "0")
    assert not compile_wanted(None)
    monkeypatch.setenv("KVLAB_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="KVLAB_COMPILE='sometimes'"):
        compile_wanted(None)
    with pytest.raises(ValueError, match="compile='yes'"):
        compile_wanted("yes")
    assert [cache_length(n, 1 << 20) for n in (1, 64, 65, 200, 256, 257, 1500, 2048, 16416)] == [
        64, 64, 128, 256, 256, 320, 1536, 2048, 18432
    ]  # fmt: skip
    assert cache_length(100, 96) == 96  # never past max_seq_len


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("name", STATIC_PRESETS)
def test_compiled_generate_matches_eager_presets(name):
    """Every preset through Inductor: the tokens of eager decoding (greedy, fixed seed)."""
    spec = preset_dict(name)
    spec["max_seq_len"] = 128
    model = build_model(spec).eval()
    ids = torch.randint(0, 4096, (2, 16))
    compiled = model.generate(ids, 24, compile=True)
    assert decode_step_for(model, True).compiled, decode_step_for(model, True).fallback_reason
    assert torch.equal(compiled, model.generate(ids, 24, compile=False))
