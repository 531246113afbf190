"""Export to Hugging Face: what we write loads in a fresh process with `transformers` alone and matches us."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from kvlab import build_model
from kvlab.archs.convert import convert_model
from kvlab.archs.hf import load_hf, remote_code_files, save_hf
from tests.archs.test_decode import VARIANTS
from tests.conftest import PRESETS, preset_dict, tiny

transformers = pytest.importorskip("transformers")

ATTENTION = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}


def _windows(spec):
    """Every attention window in a model dict (a model is at least as long as its windows)."""
    if isinstance(spec, dict):
        yield from ([spec["window"]] if spec.get("window") else [])
        for v in spec.values():
            yield from _windows(v)
    elif isinstance(spec, list):
        for v in spec:
            yield from _windows(v)


def _small(preset: dict) -> dict:
    """A preset with a tiny vocabulary (its layers and widths kept: they make the architecture)."""
    small = preset | {"vocab_size": 97, "max_seq_len": max([64, *_windows(preset)])}
    if (preset.get("kv_sharing") or {}).get("kind") == "lckv":  # pass n settles token n: 14 passes are exact for
        small["passes"] = {"no_grad": 12, "grad": 2}  # the 13 tokens given, so the forward matches decoding
    return small


NATIVE = {
    **{name: _small(preset_dict(name)) for name in PRESETS},
    "llama_bias_tied": tiny(mixer={**ATTENTION, "qkv_bias": True, "o_bias": True}, tie_embeddings=True),
    "mistral_window": tiny(mixer={**ATTENTION, "window": 6}),
    "qwen2_bias": tiny(mixer={**ATTENTION, "qkv_bias": True}),
    "qwen2_window": tiny(mixer={**ATTENTION, "qkv_bias": True, "window": 6}),  # windows on every layer
    "qwen3_qk_norm_bias": tiny(mixer={**ATTENTION, "qk_norm": True, "qkv_bias": True, "o_bias": True}),
    "sharded": tiny(),
    "mla_q_lora": tiny(
        mixer={"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 24, "q_lora_rank": 32}
    ),
    "mla_moe": tiny(  # DeepSeek-V3 with MoE after a dense first layer, routed as it routes
        n_layers=3,
        mixer={"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 24},
        mlp_pattern="DEE",
        mlps={
            "D": {"kind": "swiglu", "hidden": 96},
            "E": {
                "kind": "moe",
                "hidden": 16,
                "n_experts": 8,
                "top_k": 2,
                "n_shared": 1,
                "score": "sigmoid",
                "score_bias": True,
                "norm_topk": True,
                "routed_scale": 2.5,
                "n_groups": 4,
                "topk_groups": 2,
            },
        },
    ),
    "sharp": tiny(),  # weights scaled up: peaked distributions, so beam search reorders its beams
}
# No native transformers class: exported as model_type kvlab with remote code.
REMOTE = {
    "cla_tied": tiny(kv_sharing={"kind": "cla", "every": 2}, tie_embeddings=True),
    "kv_source": tiny(kv_source=[0, 0, 0, 3]),
    "uneven_groups": tiny(mixer={**ATTENTION, "n_kv_heads": 3, "kv_groups": [0, 2, 1, 2]}),
    "partial_rope": tiny(mixer={**ATTENTION, "rope_dims": 8, "qkv_bias": True}),  # (without biases: Phi-3's)
    "gqkva": tiny(mixer={**ATTENTION, "n_q_heads": 2}),
    "dgqa": tiny(mixer={**ATTENTION, "query_allocation": "dgqa"}),  # its allocation buffer travels too
    "matryoshka": tiny(mixer={**ATTENTION, "kv_ranks": [4, 8, 16], "kv_rank": [8, 4]}),
    "decoupled_heads": tiny(mixer={**ATTENTION, "n_kv_heads": 1, "n_v_heads": 4, "v_groups": [3, 2, 1, 0]}),
    "gelu_layernorm": tiny(mlp={"kind": "gelu", "hidden": 96}, norm={"kind": "layernorm"}),
    "mla_mha2mla_form": VARIANTS["mla_mha2mla_form"],
    "infini_hybrid": tiny(
        mixer=None, pattern="IA", mixers={"I": {"kind": "infini", "n_heads": 4, "segment_len": 5}, "A": ATTENTION}
    ),  # fmt: skip
    "hybrid_mla_gqa": tiny(mixer=None, pattern="MA", mixers={"M": preset_dict("mla")["mixer"], "A": ATTENTION}),
    "hybrid_window": tiny(  # ring-buffer layers, wrapped around during generation
        mixer=None,
        pattern="WWG",
        mixers={"W": {**ATTENTION, "n_kv_heads": 1, "window": 3}, "G": ATTENTION},
    ),
    "sharp_forced": tiny(),  # "sharp" again, with remote_code=True though it has a native class
    # mixers the pattern leaves out: loading validates them, so their families ship too
    "unused_mixer_named": tiny(
        mixer=None,
        pattern="RRW",
        n_layers=3,
        mixers={
            "R": {"kind": "rwkv6", "head_dim": 32, "chunk_size": 5},
            "I": {"kind": "infini", "n_heads": 4, "segment_len": 4},
            "W": {**ATTENTION, "window": 5},
        },
    ),  # fmt: skip
}
EXPORTED = {**NATIVE, **REMOTE}
PRESET_TYPES = {"mha": "llama", "gqa": "llama", "mqa": "llama", "mla": "deepseek_v3", "cla": "kvlab", "mlkv": "kvlab",
                "infini": "kvlab", "yoco_swa": "kvlab", "svformer": "kvlab", "lckv": "kvlab", "retnet": "kvlab",
                "resformer": "kvlab", "yoco_gret": "kvlab", "mamba2": "kvlab", "jamba": "jamba",
                "jamba_m2": "granitemoehybrid",
                "samba": "kvlab", "samba_m2": "kvlab",
                "rwkv6": "kvlab", "rwkv7": "kvlab", "gau": "kvlab", "kdgqa": "kvlab", "dha": "kvlab", "clla": "kvlab",
                "matryoshka": "kvlab", "sa": "kvlab", "block_transformer": "kvlab", "cepe": "kvlab",
                "xc_cache": "kvlab", "hymba": "kvlab", "parallel_heads": "kvlab", "rwkv6_shared_mla": "kvlab",
                "recurformer": "kvlab", "mixcon": "kvlab", "local_global": "ministral",
                "gpt_oss": "gpt_oss", "qwen3_next": "qwen3_next", "kimi_linear": "kimi_linear",
                "gated_deltanet": "kvlab", "griffin": "recurrent_gemma", "lfm2": "lfm2",
                "nemotron_h": "nemotron_h", "minimax_01": "kvlab", "exaone4": "exaone4"}  # fmt: skip
EXPECTED_TYPE = {**PRESET_TYPES, "mistral_window": "mistral", "qwen2_bias": "qwen2", "qwen2_window": "qwen2",
                 "qwen3_qk_norm_bias": "qwen3",
                 "mla_q_lora": "deepseek_v3", "mla_moe": "deepseek_v3", **dict.fromkeys(REMOTE, "kvlab")}  # fmt: skip

# Run in a fresh interpreter in which kvlab cannot be imported.
LOADER = """
import json, os, sys
sys.modules["kvlab"] = None
import torch, transformers
for name, directory in json.loads(sys.argv[1]).items():
    remote = json.load(open(directory + "/config.json"))["model_type"] == "kvlab"
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote).eval()
    ids = torch.load(directory + "/ids.pt")
    fed = []  # the token counts generate feeds kvlab's model: the prompt, then one token a step from the cache
    if remote:
        inner = model.model.forward
        model.model.forward = lambda ids, *args, **kwargs: (fed.append(ids.shape[1]), inner(ids, *args, **kwargs))[1]
    with torch.no_grad():
        result = model(ids, use_cache=True)
        fed.clear()
        generated = model.generate(ids[:1, :5], max_new_tokens=16, do_sample=False, min_new_tokens=16)
        greedy_fed = fed[:]
        beams = model.generate(ids[:1, :5], max_new_tokens=8, min_new_tokens=8, num_beams=4, do_sample=False,
                               num_return_sequences=4, output_scores=True, return_dict_in_generate=True)
    cache = result.get("cache", result.get("past_key_values"))  # transformers 5, 4; RecurrentGemma's: none
    float64 = None
    if not remote:  # again in float64, where float32's rounding no longer hides another constant (an eps, a scale)
        try:  # transformers' grouped expert products take no float64
            m64 = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64,
                                                                    experts_implementation="eager")
        except TypeError:  # transformers 4
            m64 = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float64)
        with torch.no_grad():
            float64 = m64.eval()(ids).logits
    padded = {}
    if os.path.exists(directory + "/padded.pt"):  # left-padded rows with their attention mask, as batching clients
        rows = torch.load(directory + "/padded.pt")
        with torch.no_grad():
            padded["logits"] = model(rows["ids"], attention_mask=rows["mask"], use_cache=False).logits
            padded["generated"] = model.generate(rows["ids"], attention_mask=rows["mask"], max_new_tokens=6,
                                                 min_new_tokens=6, do_sample=False, pad_token_id=0)
    policy = {}
    if remote:  # generate through a cache policy, passed as kvlab's generate takes it
        try:
            with torch.no_grad():
                out = model.generate(ids[:1, :5], max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                     cache_policy="int8", return_dict_in_generate=True)
            held = out["cache"] if "cache" in out.keys() else out["past_key_values"]
            policy = {"generated": out.sequences[0, 5:], "kind": held.cache.policy.kind}
        except ValueError as e:
            policy = {"refused": str(e)}
    context = {}
    if os.path.exists(directory + "/context.pt"):  # a context encoder's model: the context as a keyword
        ctx = torch.load(directory + "/context.pt")
        with torch.no_grad():
            context["logits"] = model(ids, context_input_ids=ctx).logits
            context["generated"] = model.generate(ids[:1, :5], context_input_ids=ctx[:1], max_new_tokens=8,
                                                  min_new_tokens=8, do_sample=False)[0, 5:]
    torch.save({"logits": result.logits, "generated": generated[0, 5:], "beams": beams.sequences[:, 5:],
                "beam_scores": beams.sequences_scores,
                "cache_shape": None if remote or cache is None else next(
                    tuple(layer.keys.shape) for layer in cache.layers if getattr(layer, "keys", None) is not None),
                "cache_bytes": cache.cache.nbytes() if remote else None,
                "class": type(model).__name__, "context": context, "policy": policy, "fed": greedy_fed,
                "padded": padded, "float64": float64},
               directory + "/theirs.pt")
assert not [m for m in sys.modules if m.startswith("kvlab") and sys.modules[m] is not None]
"""


PADDED_ROWS = (7, 4, 2)

# what the tests beside the per-model one read
ALWAYS_EXPORTED = {"sharp", "sharp_forced", "sharded"}


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """The models of the selected tests (``-k`` picks a few) and those ``ALWAYS_EXPORTED``, exported and loaded
    in one fresh process."""
    selected = set(ALWAYS_EXPORTED)
    for item in request.session.items:  # the session's tests after -m and -k
        if item.module is request.module and hasattr(item, "callspec"):
            selected.add(item.callspec.params.get("name"))
    root = tmp_path_factory.mktemp("hf_export")
    models, dirs = {}, {}
    for name, spec in EXPORTED.items():
        if name not in selected:
            continue
        torch.manual_seed(0)
        model = build_model(spec).eval()
        with torch.no_grad():  # biases away from zero, so they are checked too
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
                p.mul_(8 if name.startswith("sharp") else 1)
            for buffer_name, b in model.named_buffers():  # MHA2MLA's picked RoPE frequencies travel too
                if buffer_name.endswith("pair_index"):
                    b.copy_(torch.stack([torch.randperm(8)[: b.shape[1]] for _ in range(b.shape[0])]))
                if buffer_name.endswith(".allocation"):  # DGQA's learned allocation, away from equal groups
                    b.copy_(torch.tensor([3, 1]))
        out = root / name
        save_hf(model, out, max_shard_bytes=20_000 if name == "sharded" else 5 * 2**30,
                remote_code=True if name.endswith("forced") else None)  # fmt: skip
        torch.save(torch.randint(0, 97, (2, 13)), out / "ids.pt")
        if model.takes_pads():  # rows of 7, 4 and 2 tokens, left-padded
            ids, mask = model.left_padded([torch.randint(0, 97, (n,)) for n in PADDED_ROWS])
            torch.save({"ids": ids, "mask": mask}, out / "padded.pt")
        if model.config.context is not None:
            torch.save(torch.randint(0, 97, (2, 11)), out / "context.pt")
        models[name], dirs[name] = model, str(out)
    env = {**os.environ, "HF_MODULES_CACHE": str(root / "hf_modules")}  # transformers copies remote code there
    subprocess.run([sys.executable, "-c", LOADER, json.dumps(dirs)], check=True, cwd=root, env=env, timeout=600)
    return models, dirs


@pytest.mark.parametrize("name", list(EXPORTED))
def test_export_loads_and_matches_logits_and_generation(exported, name):
    models, dirs = exported
    model, theirs = models[name], torch.load(f"{dirs[name]}/theirs.pt")
    config = json.loads(open(f"{dirs[name]}/config.json").read())
    assert config["model_type"] == EXPECTED_TYPE.get(name, "llama")
    assert ("auto_map" in config) == (config["model_type"] == "kvlab")
    ids = torch.load(f"{dirs[name]}/ids.pt")
    with torch.no_grad():  # float32 agreement, relative to the logits' scale (the sharp model's reach ~40)
        ours_logits = model(ids)
        assert (theirs["logits"] - ours_logits).abs().max() <= 1e-4 + 2e-5 * ours_logits.abs().max()
        # a native class: transformers' own float32 parts (RoPE angles, norms, routers, Jamba's scan) leave it 3e-7
        # from ours (the sharp models' large weights, chosen to reorder beams, amplify that rounding)
        if theirs["float64"] is not None and not name.startswith("sharp"):
            ours_logits = copy.deepcopy(model).double()(ids)
            # (their gated delta rules: in float32 whatever the dtype)
            # (and RecurrentGemma's norms and scan)
            bound = 1e-5 if config["model_type"] in ("qwen3_next", "kimi_linear", "recurrent_gemma") else 1e-6
            assert (theirs["float64"] - ours_logits).abs().max() <= bound * max(1, ours_logits.abs().max())
    ours = model.generate(ids[:1, :5], max_new_tokens=16)[0, 5:]
    assert torch.equal(theirs["generated"], ours)
    if theirs["context"]:  # given a context (context_input_ids), as kvlab's own forward and generate with one
        ctx = torch.load(f"{dirs[name]}/context.pt")
        with torch.no_grad():
            assert (theirs["context"]["logits"] - model(ids, context=ctx)).abs().max() <= 1e-4
        assert torch.equal(theirs["context"]["generated"], model.generate(ids[:1, :5], 8, context=ctx[:1])[0, 5:])
    # left-padded rows: each gets what it gets alone (native classes as well as ours; not RecurrentGemma's, whose
    # recurrent blocks read a row's pads as tokens: ours are checked alone in tests/archs/test_padding.py)
    if model.takes_pads() and config["model_type"] != "recurrent_gemma":
        padded = torch.load(f"{dirs[name]}/padded.pt")
        for row, n in enumerate(PADDED_ROWS):
            alone = padded["ids"][row : row + 1, -n:]
            with torch.no_grad():
                ours_logits = model(alone)[0]
            assert (
                theirs["padded"]["logits"][row, -n:] - ours_logits
            ).abs().max() <= 1e-4 + 2e-5 * ours_logits.abs().max()
            assert torch.equal(theirs["padded"]["generated"][row, -6:], model.generate(alone, 6)[0, -6:])
    if config["model_type"] == "kvlab":  # generate() ran on our own cache, with our footprint
        assert theirs["class"] == "KvlabForCausalLM"
        assert theirs["fed"] == [5] + [1] * 15  # decoded from the cache, not the whole prefix again
        assert theirs["cache_bytes"] == model.kv_footprint(torch.float32).total_bytes(13, batch_size=2)
        if "refused" in theirs["policy"]:  # int8 refused (a latent held as codes already): by kvlab alike
            with pytest.raises(ValueError):
                model.new_cache(1, 13, policy="int8")
        else:  # generate(cache_policy=...) reaches the cache the remote code makes: kvlab's own tokens
            assert theirs["policy"]["kind"] == "int8"
            assert torch.equal(
                theirs["policy"]["generated"], model.generate(ids[:1, :5], 8, cache_policy="int8")[0, 5:]
            )
    elif theirs["cache_shape"] is None:  # RecurrentGemma's class holds its states and K/V in its modules
        assert config["model_type"] == "recurrent_gemma"
    elif (m := next(m for m in model.config.layer_mixers if m.kind in ("mla", "attention"))).kind == "mla":
        assert theirs["cache_shape"][1::2] == (1, m.kv_lora_rank)  # transformers caches the latent too, one "head"
    else:  # transformers' cache is the GQA one (Jamba's attention layer: its only K/V)
        assert theirs["cache_shape"][1::2] == (m.n_kv_heads, m.head_dim)  # [B, heads, positions, head_dim]


def test_every_preset_has_an_expected_export_type():
    assert set(PRESET_TYPES) == set(PRESETS)


def test_remote_code_beam_search_matches_native(exported):
    """The same weights through LlamaForCausalLM's cache and through our cache adapter (beams reordered)."""
    _, dirs = exported
    native, remote = (torch.load(f"{dirs[name]}/theirs.pt") for name in ("sharp", "sharp_forced"))
    assert torch.equal(native["beams"], remote["beams"])
    assert torch.allclose(native["beam_scores"], remote["beam_scores"], atol=1e-5)


def test_sharded_export_has_an_index(exported):
    _, dirs = exported
    index = json.loads(open(f"{dirs['sharded']}/model.safetensors.index.json").read())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("remote_code", [False, True], ids=["native", "remote"])
def test_export_import_export_is_the_identity(tmp_path, remote_code):
    from safetensors.torch import load_file

    spec = tiny(tie_embeddings=True, kv_sharing={"kind": "cla", "every": 2} if remote_code else None)
    model = build_model(spec)
    save_hf(model, tmp_path / "a", remote_code=remote_code)
    again = load_hf(tmp_path / "a")
    assert again.config == model.config
    save_hf(again, tmp_path / "b", remote_code=remote_code)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and not any(k.endswith("lm_head.weight") for k in a)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_jamba_exports_natively_and_reads_back(tmp_path):
    """JambaForCausalLM both ways (the export test matches its logits and generation): the same layers, and
    export, import, export writes identical bytes."""
    model = build_model(_small(preset_dict("jamba")))
    save_hf(model, tmp_path / "a", remote_code=False)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["architectures"] == ["JambaForCausalLM"]
    again = load_hf(tmp_path / "a")
    assert again.config.plan == model.config.plan  # mlp_pattern comes back written out per layer
    save_hf(again, tmp_path / "b", remote_code=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    for routing in ({"n_groups": 4, "topk_groups": 2}, {"score_bias": True}):  # (the first had exported as Jamba)
        grouped = _small(preset_dict("jamba"))
        grouped["mlps"] = {**grouped["mlps"], "E": {**grouped["mlps"]["E"], **routing}}
        with pytest.raises(ValueError, match="routing other than Jamba's"):
            save_hf(build_model(grouped), tmp_path / "d", remote_code=False)
    scaled = _small(preset_dict("jamba"))  # (its attention's rope_dims=0 had hidden every other attention setting)
    scaled["mixers"] = {**scaled["mixers"], "A": {**scaled["mixers"]["A"], "softmax_scale": 0.5}}
    with pytest.raises(ValueError, match=r"softmax_scale=0.5 \(1/sqrt\(head_dim\) is needed\)"):
        save_hf(build_model(scaled), tmp_path / "e", remote_code=False)
    with pytest.raises(ValueError, match="RoPE in attention"):  # jamba_m2 is no Jamba: remote code only
        save_hf(build_model(_small(preset_dict("jamba_m2") | {"mixers": {
            "M": {"kind": "mamba", "inner_norms": True, "norm_eps": 1e-5}, "A": {"kind": "attention"}}})),
            tmp_path / "c", remote_code=False)  # fmt: skip


NEOX = {"norm": {"kind": "layernorm"}, "parallel_residual": True, "mlp": {"kind": "gelu", "bias": True,
        "approximate": "none"}, "mixer": {**ATTENTION, "n_kv_heads": 4, "rope_dims": 4, "qkv_bias": True,
        "o_bias": True}}  # fmt: skip


def _native_round_trip(spec: dict, tmp_path, architecture: str, bound: float):
    """``spec``'s model in float64, its biases and norm weights moved off their initial values (so a misplaced one
    shows), exported natively: transformers loads ``architecture``, whose logits are ours within ``bound`` (ours
    decoding from the cache to 1e-10) and whose greedy tokens are ours; export, import, export writes identical
    bytes. Returns the model."""
    torch.manual_seed(0)
    model = build_model(tiny(**spec)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sink_logits")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    save_hf(model, tmp_path / "a", remote_code=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(  # (grouped expert products take no float64)
        tmp_path / "a", dtype=torch.float64, experts_implementation="eager"
    ).eval()
    assert type(theirs).__name__ == architecture
    ids = torch.randint(0, 97, (2, 13))
    cache = model.new_cache(2, 20, dtype=torch.float64)
    with torch.no_grad():
        whole = model(ids)
        stepped = torch.cat([model(ids[:, :7], cache=cache)] + [model(ids[:, t : t + 1], cache=cache)
                                                                 for t in range(7, 13)], dim=1)  # fmt: skip
        assert (theirs(ids).logits - whole).abs().max() <= bound and (stepped - whole).abs().max() <= 1e-10
    prompt = ids[:, :5]  # (a mask of ones: transformers would take a 0 in the prompt for a pad)
    greedy = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(model.generate(prompt, max_new_tokens=6), greedy)
    again = load_hf(tmp_path / "a", dtype=torch.float64)
    assert again.config.plan == model.config.plan
    save_hf(again, tmp_path / "b", remote_code=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    return model


def test_gpt_neox_exports_natively_and_reads_back(tmp_path):
    """A GPT-NeoX-shaped model (Pythia's block) exports to GPTNeoXForCausalLM (``_native_round_trip``, logits to
    float64's rounding); what GPT-NeoX lacks is named."""
    model = _native_round_trip(NEOX, tmp_path, "GPTNeoXForCausalLM", 1e-10)
    assert load_hf(tmp_path / "a").config == model.config
    with pytest.raises(ValueError, match=r"n_kv_heads=2 below n_heads=4 \(GPT-NeoX's attention is MHA\)"):
        save_hf(build_model(tiny(**NEOX | {"mixer": {**NEOX["mixer"], "n_kv_heads": 2}})), tmp_path / "c",
                remote_code=False)  # fmt: skip
    capped = NEOX | {"mixer": {**NEOX["mixer"], "softcap": 5.0}}  # (partial RoPE had hidden the attention's others)
    with pytest.raises(ValueError, match=r"soft-capped scores \(softcap=5.0"):
        save_hf(build_model(tiny(**capped)), tmp_path / "f", remote_code=False)
    with pytest.raises(ValueError, match="norm 'rmsnorm' \\(GPT-NeoX's are LayerNorms\\)"):  # Llama's norms
        save_hf(build_model(tiny(parallel_residual=True)), tmp_path / "d", remote_code=False)
    mla = {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 32}
    with pytest.raises(ValueError, match=r"parallel_residual \(the MLP after the mixer is needed\)"):
        save_hf(build_model(tiny(parallel_residual=True, mixer=mla)), tmp_path / "e", remote_code=False)


GEMMA_ATTENTION = {**ATTENTION, "qk_norm": True, "qk_norm_eps": 1e-6, "qk_norm_unit_offset": True}
GEMMA = {"norm": {"kind": "rmsnorm", "eps": 1e-6, "unit_offset": True}, "post_norms": True, "embed_scale": 8.0,
         "mlp": {"kind": "geglu", "hidden": 96}, "tie_embeddings": True, "mixer": None, "pattern": "LLG",
         "mixers": {"L": {**GEMMA_ATTENTION, "window": 5, "rope_theta": 500.0}, "G": GEMMA_ATTENTION}}  # fmt: skip


@pytest.mark.parametrize("scalar", [None, 21])  # Gemma's query_pre_attn_scalar: head_dim, or its own (27B's)
def test_gemma3_exports_natively_and_reads_back(tmp_path, scalar):
    """A Gemma-3-shaped model (windowed and full layers, each kind with its RoPE base, sandwich norms weighing by
    1 + w, GeGLU, scaled embeddings) exports to Gemma3ForCausalLM (``_native_round_trip``; transformers' norms
    compute in float32 whatever the input); what Gemma lacks is named."""
    scale = {"softmax_scale": None if scalar is None else scalar**-0.5}
    spec = {**GEMMA, "mixers": {k: {**v, **scale} for k, v in GEMMA["mixers"].items()}}
    _native_round_trip(spec, tmp_path, "Gemma3ForCausalLM", 1e-5)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["query_pre_attn_scalar"] == (scalar or 16)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["layer_types"] == [
        "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]  # fmt: skip
    plain = {**GEMMA, "mixers": {k: {**v, "qk_norm_unit_offset": False} for k, v in GEMMA["mixers"].items()}}
    with pytest.raises(ValueError, match=r"attention without qk_norm \(unit_offset"):
        save_hf(build_model(tiny(**plain)), tmp_path / "c", remote_code=False)


OLMO_ATTENTION = {**ATTENTION, "qk_norm": True, "qk_norm_over": "projection"}
PER_LAYER = {  # layers that differ by a window or by RoPE, and OLMo's: (spec, class, its layer_types)
    "qwen2": ({"pattern": "FWWW", "mixers": {"F": {**ATTENTION, "qkv_bias": True}, "W": {**ATTENTION, "qkv_bias": True,
              "window": 5}}}, "Qwen2ForCausalLM", "FSSS"),
    "qwen3": ({"pattern": "WF", "mixers": {"F": {**ATTENTION, "qk_norm": True}, "W": {**ATTENTION, "qk_norm": True,
              "window": 5}}, "norm": {"kind": "rmsnorm", "eps": 1e-5}}, "Qwen3ForCausalLM", "SFSF"),
    "smollm3": ({"pattern": "RRRN", "mixers": {"R": ATTENTION, "N": {**ATTENTION, "rope_dims": 0, "window": 6}}},
                "SmolLM3ForCausalLM", "FFFS"),
    "ministral": ({"pattern": "WWF", "mixers": {"F": ATTENTION, "W": {**ATTENTION, "window": 5}}},
                  "MinistralForCausalLM", "SSFS"),
    # OLMo 2's block (post norms alone, q/k norms over the projections); OLMo 3's windows, RoPE per kind
    # (heads narrower than d_model / n_heads: the class reads head_dim where config.json gives it)
    "olmo2": ({"pre_norms": False, "post_norms": True, "mixer": {**OLMO_ATTENTION, "head_dim": 8}},
              "Olmo2ForCausalLM", None),
    "olmo3": ({"pre_norms": False, "post_norms": True, "pattern": "LLLG", "mixers": {
        "L": {**OLMO_ATTENTION, "window": 5, "rope_theta": 700.0}, "G": OLMO_ATTENTION}}, "Olmo3ForCausalLM", "SSSF"),
    # Granite's multipliers (its attention_multiplier our softmax_scale)
    "granite": ({"embed_scale": 12.0, "residual_scale": 0.22, "logit_scale": 0.125,
                 "mixer": {**ATTENTION, "softmax_scale": 1 / 128}}, "GraniteForCausalLM", None),
    # Gemma 3 with no windowed layer (transformers builds its windowed mask all the same: it needs a window)
    "gemma3-full": ({**GEMMA, "pattern": "G", "mixers": {"G": GEMMA["mixers"]["G"]}}, "Gemma3ForCausalLM", "FFFF"),
    # Gemma 2: no query and key norms, one RoPE, scores and logits soft-capped (low caps: they bend these values)
    "gemma2": ({**GEMMA, "logit_softcap": 0.5, "mixers": {"L": {**ATTENTION, "window": 5, "softcap": 0.1},
                "G": {**ATTENTION, "softcap": 0.1}}}, "Gemma2ForCausalLM", "SSFS"),
    # Gemma 1: Llama's block with Gemma's norms, GeGLU and scaled embeddings
    "gemma": ({**GEMMA, "post_norms": False, "pattern": None, "mixers": None, "mixer": ATTENTION}, "GemmaForCausalLM",
              None),
}  # fmt: skip


MOE = {"kind": "moe", "hidden": 32, "n_experts": 4, "top_k": 2}
GPT_OSS_ATTENTION = {**ATTENTION, "qkv_bias": True, "o_bias": True, "learned_sinks": True, "rope_scaling": {
    "kind": "yarn", "factor": 16.0, "original_max_seq_len": 4, "beta_fast": 32.0, "beta_slow": 1.0,
    "attention_factor": 1.2, "truncate": False}}  # fmt: skip
QWEN2_MOE = {"kind": "moe", "hidden": 32, "n_experts": 4, "top_k": 2, "n_shared": 2, "shared_gate": True}
EXPERTS = {  # Mixtral (Mistral's attention, experts renormalised in every layer); Qwen3-MoE (qk_norm, a dense layer)
    "mixtral": ({"mixer": {**ATTENTION, "window": 5}, "mlp": {**MOE, "norm_topk": True}}, "MixtralForCausalLM"),
    "qwen3-moe": ({"mixer": {**ATTENTION, "qk_norm": True, "qkv_bias": True, "o_bias": True},
                   "norm": {"kind": "rmsnorm", "eps": 1e-5}, "mlp_pattern": "EDEE",
                   "mlps": {"E": MOE, "D": {"kind": "swiglu", "hidden": 48}}}, "Qwen3MoeForCausalLM"),
    "olmoe": ({"mixer": {**ATTENTION, "qk_norm": True, "qk_norm_over": "projection", "qk_norm_eps": 1e-5},
               "norm": {"kind": "rmsnorm", "eps": 1e-5}, "mlp": MOE}, "OlmoeForCausalLM"),
    # Qwen2-MoE: Qwen2's attention with windows on some layers, a shared expert gated per token, a dense layer
    "qwen2-moe": ({"mixer": None, "pattern": "WFWF", "mixers": {"W": {**ATTENTION, "qkv_bias": True, "window": 5},
                                                 "F": {**ATTENTION, "qkv_bias": True}},
                   "mlp_pattern": "EEDE", "mlps": {"E": QWEN2_MOE, "D": {"kind": "swiglu", "hidden": 48}}},
                  "Qwen2MoeForCausalLM"),
    # gpt-oss: biases on every projection, learned sinks, windows on every other layer, YaRN untruncated; experts
    # with biases and the clamped SwiGLU (clamped at 0.5 here: small weights' products reach it), renormalised
    "gpt-oss": ({"mixer": None, "pattern": "WFWF", "mixers": {"W": {**GPT_OSS_ATTENTION, "window": 5},
                                                             "F": GPT_OSS_ATTENTION},
                 "mlp": {**MOE, "norm_topk": True, "bias": True, "swiglu_limit": 0.5}}, "GptOssForCausalLM"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EXPERTS))
def test_experts_export_as_mixtral_qwen3_moe_qwen2_moe_olmoe_or_gpt_oss(tmp_path, case):
    """A mixture of SwiGLU experts routed by softmax and top-k beside Mistral's, Qwen3's or OLMo's attention exports
    to MixtralForCausalLM, Qwen3MoeForCausalLM or OlmoeForCausalLM, with a gated shared expert beside Qwen2's to
    Qwen2MoeForCausalLM, gpt-oss's (biases, clamped) beside attention with learned sinks to GptOssForCausalLM
    (``_native_round_trip``: logits, tokens, the config read back); what none routes as is named."""
    spec, architecture = EXPERTS[case]
    _native_round_trip(spec, tmp_path, architecture, 1e-6)
    if case == "mixtral":
        plain = {**spec, "mlp": {**MOE, "norm_topk": False}}
        with pytest.raises(ValueError, match=r"norm_topk=False without qk_norm \(Mixtral"):
            save_hf(build_model(tiny(**plain)), tmp_path / "c", remote_code=False)
        deepseek = {**spec, "mlp": {**MOE, "norm_topk": True, "score": "sigmoid"}}
        with pytest.raises(ValueError, match="MoE routing other than Mixtral's, Qwen3-MoE's and Qwen2-MoE's"):
            save_hf(build_model(tiny(**deepseek)), tmp_path / "d", remote_code=False)
        for gpt_oss_part in ({"bias": True}, {"swiglu_limit": 7.0}):  # (Mixtral's experts would drop them silently)
            experts = {**spec, "mlp": {**MOE, "norm_topk": True, **gpt_oss_part}}
            with pytest.raises(ValueError, match=r"MoE routing other than Mixtral's.*plain SwiGLU experts"):
                save_hf(build_model(tiny(**experts)), tmp_path / "d", remote_code=False)
        no_rope = {**spec, "mixer": {**spec["mixer"], "rope_dims": 0}}  # (SmolLM3's NoPE layers have no MoE class)
        with pytest.raises(ValueError, match="partial RoPE \\(Mixtral, Qwen3-MoE and Qwen2-MoE have one attention"):
            save_hf(build_model(tiny(**no_rope)), tmp_path / "e", remote_code=False)
    elif case == "qwen3-moe":
        assert json.loads((tmp_path / "a" / "config.json").read_text())["mlp_only_layers"] == [1]
    elif case == "qwen2-moe":
        config = json.loads((tmp_path / "a" / "config.json").read_text())
        assert (config["shared_expert_intermediate_size"], config["layer_types"][:2]) == (
            64, ["sliding_attention", "full_attention"])  # fmt: skip
        normed = {**spec, "mixers": {k: {**v, "qk_norm": True} for k, v in spec["mixers"].items()}}
        with pytest.raises(ValueError, match=r"shared experts gated \(Qwen2-MoE's\) with qk_norm=True"):
            save_hf(build_model(tiny(**normed)), tmp_path / "c", remote_code=False)
        mla = {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 32}
        with pytest.raises(ValueError, match=r"MoE routing other than DeepSeek-V2's .* shared_gate=True"):
            save_hf(build_model(tiny(mixer=mla, mlp=QWEN2_MOE)), tmp_path / "d", remote_code=False)
    elif case == "gpt-oss":
        config = json.loads((tmp_path / "a" / "config.json").read_text())
        assert config["rope_parameters"]["truncate"] is False and config["swiglu_limit"] == 0.5
        for change, message in [
            ({"mlp": {**MOE, "norm_topk": True, "bias": True}}, r"experts other than gpt-oss's .* swiglu_limit=None"),
            ({"mlp": {"kind": "swiglu", "hidden": 48}}, r"MLPs other than one MoE in every layer \(gpt-oss's\)"),
            (
                {"mixers": {"W": {**GPT_OSS_ATTENTION, "window": 5, "softcap": 1.0}, "F": GPT_OSS_ATTENTION}},
                "attention layers that differ beyond their window",
            ),
        ]:
            with pytest.raises(ValueError, match=message):
                save_hf(build_model(tiny(**spec | change)), tmp_path / "c", remote_code=False)
        olmoe = EXPERTS["olmoe"][0]  # (another class's model, its attention with sinks)
        with pytest.raises(ValueError, match=r"learned sink logits \(learned_sinks: gpt-oss's\)"):
            save_hf(build_model(tiny(**olmoe | {"mixer": {**olmoe["mixer"], "learned_sinks": True}})), tmp_path / "c",
                    remote_code=False)  # fmt: skip


def test_partial_rope_exports_as_phi3(tmp_path):
    """Attention with RoPE on three quarters of each head (Phi-4-mini's) and LongRoPE exports to Phi3ForCausalLM,
    its projections fused (``_native_round_trip``: every call here past the original 4 positions); partial RoPE
    that Phi-3 cannot take is named."""
    longrope = {
        "kind": "longrope",
        "short_factor": [1.0, 1.2, 1.5, 2.0, 2.2, 3.0],
        "long_factor": [2.0, 3.0, 5.0, 7.0, 9.0, 11.0],
        "original_max_seq_len": 4,
        "attention_factor": 1.2,
    }
    spec = {"mixer": {**ATTENTION, "rope_dims": 12, "window": 7, "rope_scaling": longrope}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "Phi3ForCausalLM", 1e-6)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["partial_rotary_factor"], config["original_max_position_embeddings"]) == (0.75, 4)
    biased = {"mixer": {**spec["mixer"], "qkv_bias": True}}
    with pytest.raises(ValueError, match=r"partial RoPE \(Phi-3's\) with qkv_bias=True"):
        save_hf(build_model(tiny(**biased)), tmp_path / "c", remote_code=False)
    uneven = {"mixer": {**ATTENTION, "head_dim": 44, "rope_dims": 30}}  # (30 / 44 * 44 is 29.999...)
    with pytest.raises(ValueError, match=r"rope_dims=30 of head_dim=44, which partial_rotary_factor"):
        save_hf(build_model(tiny(**uneven)), tmp_path / "d", remote_code=False)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_mamba_alone_exports_as_mamba_or_mamba2(tmp_path, kind):
    """Mamba or Mamba-2 in every layer, no MLP, exports to MambaForCausalLM or Mamba2ForCausalLM
    (``_native_round_trip``; their scan runs in float32 whatever the dtype); what they lack is named."""
    mixer = (
        {"kind": "mamba", "state_dim": 8}
        if kind == "mamba"
        else {"kind": "mamba2", "state_dim": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8, "norm_eps": 1e-5}
    )
    spec = {"mixer": mixer, "mlp": {"kind": "none"}, "norm": {"kind": "rmsnorm", "eps": 1e-5}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "MambaForCausalLM" if kind == "mamba" else "Mamba2ForCausalLM", 1e-5)
    with pytest.raises(ValueError, match=r"MLPs \(swiglu; its blocks have none"):
        save_hf(build_model(tiny(**{**spec, "mlp": {"kind": "swiglu"}})), tmp_path / "c", remote_code=False)


def test_mamba2_and_attention_export_as_bamba(tmp_path):
    """Mamba-2 layers and attention with RoPE on half of each head, a SwiGLU in every layer, export to
    BambaForCausalLM (``_native_round_trip``); what Bamba lacks is named."""
    mamba2 = {"kind": "mamba2", "state_dim": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8, "norm_eps": 1e-5}
    spec = {"mixer": None, "pattern": "MAMM", "mixers": {"M": mamba2, "A": {**ATTENTION, "rope_dims": 8}},
            "norm": {"kind": "rmsnorm", "eps": 1e-5}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "BambaForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["attn_layer_indices"] == [1]
    scaled = {**spec, "mixers": {**spec["mixers"], "A": {**ATTENTION, "rope_dims": 8, "rope_scaling": {
        "kind": "linear", "factor": 2.0}}}}  # fmt: skip
    with pytest.raises(ValueError, match=r"rope_dims=8 of head_dim=16 or rope_scaling .* \(Bamba's RoPE"):
        save_hf(build_model(tiny(**scaled)), tmp_path / "c", remote_code=False)


@pytest.mark.parametrize("case", ["moe-nope", "dense-rope", "attention-alone-moe", "attention-alone-nope"])
def test_mamba2_and_attention_with_granites_parts_export_as_granite_4_h(tmp_path, case):
    """Mamba-2 layers and attention in Granite's block with its multipliers export to GraniteMoeHybridForCausalLM
    (``_native_round_trip``): attention without RoPE beside experts and their ungated shared ones (Granite 4.0-H's
    released form), or with RoPE on every channel beside a SwiGLU (its dense form, which Bamba's RoPE on half a
    head is not); and attention alone beside such experts, or without RoPE (Granite 4.0's models without Mamba, which
    no other class takes: GraniteForCausalLM's RoPE is on every channel, and a model without it went there silently
    until 2026-12-07); what it lacks is named."""
    mamba2 = {"kind": "mamba2", "state_dim": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8, "norm_eps": 1e-5}
    attention = {**ATTENTION, "rope_dims": 0 if case.endswith("nope") else 16, "softmax_scale": 0.1}
    mlp = {**MOE, "norm_topk": True, "n_shared": 2} if case == "moe-nope" else {"kind": "swiglu", "hidden": 48}
    spec = {"mixer": None, "pattern": "MAMM", "mixers": {"M": mamba2, "A": attention}, "mlp": mlp,
            "norm": {"kind": "rmsnorm", "eps": 1e-5}, "embed_scale": 4.0, "residual_scale": 0.5,
            "logit_scale": 0.25}  # fmt: skip
    if case == "attention-alone-moe":
        spec |= {
            "pattern": None,
            "mixers": None,
            "mixer": {**attention, "rope_dims": 16},
            "mlp": {**MOE, "norm_topk": True, "n_shared": 1},
        }
    if case == "attention-alone-nope":
        spec |= {"pattern": None, "mixers": None, "mixer": attention, "mlp": {"kind": "swiglu", "hidden": 48}}
    _native_round_trip(spec, tmp_path, "GraniteMoeHybridForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["position_embedding_type"], config["logits_scaling"]) == (
        "nope" if case.endswith("nope") else "rope", 4.0)  # fmt: skip
    assert ("linear_attention" in config["layer_types"]) == (not case.startswith("attention-alone"))
    if case == "moe-nope":
        gated = {**spec, "mlp": {**mlp, "shared_gate": True}}
        with pytest.raises(ValueError, match=r"experts other than Granite 4.0-H's in every layer"):
            save_hf(build_model(tiny(**gated)), tmp_path / "c", remote_code=False)
        windowed = {**spec, "mixers": {"M": mamba2, "A": {**attention, "window": 5}}}
        with pytest.raises(ValueError, match=r"attention with window=5.*\(Granite 4.0-H's"):
            save_hf(build_model(tiny(**windowed)), tmp_path / "c", remote_code=False)


def test_gated_deltanet_beside_gated_attention_exports_as_qwen3_next(tmp_path):
    """Gated DeltaNet layers beside gated attention (zero-centred query/key norms, RoPE on a quarter of each head,
    biases), experts with a gated shared expert and a SwiGLU in one layer, in Qwen3-Next's block (zero-centred
    RMSNorms) export to Qwen3NextForCausalLM (``_native_round_trip``: its gated delta rule runs in float32 whatever
    the dtype); what it lacks is named; gated DeltaNet alone, which its class cannot generate from, is not claimed."""
    linear = {"kind": "gated_deltanet", "n_heads": 4, "n_qk_heads": 2, "head_dim": 16, "value_head_dim": 8,
              "norm_eps": 1e-6}  # fmt: skip
    attention = {**ATTENTION, "head_dim": 16, "rope_dims": 4, "qk_norm": True, "qk_norm_unit_offset": True,
                 "qk_norm_eps": 1e-6, "output_gate": True, "qkv_bias": True, "o_bias": True}  # fmt: skip
    spec = {"mixer": None, "pattern": "DDAD", "mixers": {"D": linear, "A": attention},
            "mlp_pattern": "EDEE", "mlps": {"D": {"kind": "swiglu", "hidden": 48},
                                            "E": {**MOE, "norm_topk": True, "n_shared": 2, "shared_gate": True}},
            "norm": {"kind": "rmsnorm", "eps": 1e-6, "unit_offset": True}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "Qwen3NextForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["layer_types"][1:3] == ["linear_attention", "full_attention"]
    assert (config["mlp_only_layers"], config["rope_parameters"]["partial_rotary_factor"]) == ([1], 0.25)
    for broken, match in (({"A": {**attention, "output_gate": False}}, r"attention with output_gate=False"),
                          ({"D": {**linear, "output_gate": False}}, r"gated DeltaNet with output_gate=False"),
                          ({"D": {**linear, "norm_eps": 1e-5}}, r"norm_eps=1e-05 \(Qwen3-Next's"),
                          ({"A": {**attention, "window": 5}}, r"window=5, .*\(Qwen3-Next's")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, "mixers": {**spec["mixers"], **broken}})), tmp_path / "c",
                    remote_code=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"mixer kind 'gated_deltanet'"):
        save_hf(build_model(tiny(**{**spec, "pattern": "D"})), tmp_path / "c", remote_code=False)


def test_griffin_and_hawk_export_as_recurrent_gemma(tmp_path):
    """Griffin's recurrent blocks (RG-LRU) beside local MQA with RoPE on half of each head, in Gemma's block with
    RecurrentGemma's parts (a biased GeGLU, a bias on the attention's output, capped logits), export to
    RecurrentGemmaForCausalLM (``_native_round_trip``: its norms and scan run in float32 whatever the dtype); what
    it lacks is named; the recurrent blocks alone (Hawk), which its class cannot decode, are not claimed; a Llama
    with a biased SwiGLU is refused."""
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": 1, "head_dim": 16, "rope_dims": 8, "window": 4,
                 "o_bias": True}  # fmt: skip
    spec = {"mixer": None, "pattern": "RRAR", "mixers": {"R": {"kind": "rglru", "width": 48}, "A": attention},
            "norm": {"kind": "rmsnorm", "eps": 1e-6, "unit_offset": True}, "embed_scale": 8.0, "logit_softcap": 30.0,
            "mlp": {"kind": "geglu", "hidden": 48, "bias": True}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "RecurrentGemmaForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["block_types"], config["lru_width"], config["intermediate_size"]) == (
        ["recurrent", "recurrent", "attention", "recurrent"], 48, 96)  # fmt: skip
    with pytest.raises(ValueError, match=r"mixer kind 'rglru'"):
        save_hf(build_model(tiny(**{**spec, "pattern": "RRRR"})), tmp_path / "c", remote_code=False)
    for broken, match in (({"mlp": {"kind": "geglu", "hidden": 48}}, r"MLPs other than one GeGLU with biases"),
                          ({"embed_scale": None}, r"embed_scale=None, .*\(RecurrentGemma's"),
                          ({"mixers": {**spec["mixers"], "A": {**attention, "window": None}}},
                           r"attention with window=None")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, **broken})), tmp_path / "c", remote_code=False)
    with pytest.raises(ValueError, match=r"biases on the gated MLPs"):
        save_hf(build_model(tiny(mlp={"kind": "swiglu", "hidden": 48, "bias": True})), tmp_path / "c",
                remote_code=False)  # fmt: skip


def test_gated_short_convolutions_beside_attention_export_as_lfm2(tmp_path):
    """LFM2's gated short convolutions (with biases) beside GQA with per-head query/key norms export to
    Lfm2ForCausalLM (``_native_round_trip``: its RMSNorms run in float32 whatever the dtype); what it lacks is
    named; the convolutions alone, which its class cannot run a cache for, are not claimed."""
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qk_norm_eps": 1e-5}
    spec = {"mixer": None, "pattern": "CCAC", "mixers": {"C": {"kind": "short_conv", "bias": True}, "A": attention},
            "norm": {"kind": "rmsnorm", "eps": 1e-5}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "Lfm2ForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["layer_types"], config["conv_bias"], config["block_auto_adjust_ff_dim"]) == (
        ["conv", "conv", "full_attention", "conv"], True, False)  # fmt: skip
    for broken, match in (({"A": {**attention, "qk_norm": False}}, r"attention with qk_norm=False"),
                          ({"A": {**attention, "window": 5}}, r"window=5, .*\(LFM2's")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, "mixers": {**spec["mixers"], **broken}})), tmp_path / "c",
                    remote_code=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"mixer kind 'short_conv'"):
        save_hf(build_model(tiny(**{**spec, "pattern": "C"})), tmp_path / "c", remote_code=False)


def test_mamba2_beside_attention_with_squared_relu_mlps_exports_as_nemotron_h(tmp_path):
    """Mamba-2 (2 groups, 1.5 d_model wide: Nemotron Nano 2's width is no multiple of it) beside attention without
    positional encoding, a squared-ReLU MLP in some blocks and none
    in another, export to NemotronHForCausalLM, each block its mixer's layer and its MLP's (``_native_round_trip``:
    its norms and scan run in float32); what it lacks is named; Mamba-2 alone with such MLPs is not claimed (its
    class cannot run a cache without attention), nor by Mamba2ForCausalLM or Bamba's; an MLP layer after another
    is refused on import."""
    from kvlab.archs.hf_families import _nemotron_h_from_hf

    mamba2 = {"kind": "mamba2", "head_dim": 16, "state_dim": 8, "n_groups": 2, "chunk_size": 8, "inner": 96}
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "rope_dims": 0}
    spec = {"mixer": None, "pattern": "MMAM", "mixers": {"M": mamba2, "A": attention}, "mlp_pattern": "DNDD",
            "mlps": {"D": {"kind": "relu2", "hidden": 96}, "N": {"kind": "none"}}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "NemotronHForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["layers_block_type"] == ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp",
                                           "linear_attention", "mlp"]  # fmt: skip
    for broken, match in (({"mixers": {"M": mamba2, "A": {**attention, "rope_dims": 16}}}, r"rope_dims=16"),
                          ({"mlp_pattern": "DNDE", "mlps": {**spec["mlps"], "E": {"kind": "relu2", "hidden": 48}}},
                           r"MLPs other than one squared-ReLU MLP")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, **broken})), tmp_path / "c", remote_code=False)
    with pytest.raises(ValueError, match=r"mixer kind 'mamba2'"):
        save_hf(build_model(tiny(**{**spec, "pattern": "M"})), tmp_path / "c", remote_code=False)
    with pytest.raises(ValueError, match=r"layer 2 is an MLP layer after another"):
        _nemotron_h_from_hf({"vocab_size": 97, "hidden_size": 64, "layers_block_type": ["linear_attention", "mlp",
                                                                                         "mlp"]})  # fmt: skip


def test_kda_beside_mla_without_rope_exports_as_kimi_linear(tmp_path):
    """KDA (gated DeltaNet with a decay per key channel and a low-rank sigmoid gate) beside MLA without RoPE, a SwiGLU
    then DeepSeek-V3's experts, export to KimiLinearForCausalLM (``_native_round_trip``: its KDA runs in float32
    whatever the dtype); what it lacks is named."""
    kda = {"kind": "gated_deltanet", "n_heads": 4, "head_dim": 16, "decay": "channel", "gate_rank": 16,
           "gate_activation": "sigmoid", "norm_eps": 1e-5}  # fmt: skip
    mla = {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 32, "rope": False}
    moe = {**MOE, "n_shared": 1, "score": "sigmoid", "score_bias": True, "norm_topk": True, "routed_scale": 2.5,
           "n_groups": 2, "topk_groups": 1}  # fmt: skip
    spec = {"mixer": None, "pattern": "KA", "mixers": {"K": kda, "A": mla}, "mlp_pattern": "DEEE",
            "mlps": {"D": {"kind": "swiglu", "hidden": 48}, "E": moe}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "KimiLinearForCausalLM", 1e-5)
    for broken, match in (
        ({"A": {**mla, "rope": True}}, r"MLA with rope=True"),
        ({"K": {**kda, "decay": "head", "gate_rank": None}}, r"gated DeltaNet other than Kimi's"),
    ):
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, "mixers": {**spec["mixers"], **broken}})), tmp_path / "c",
                    remote_code=False)  # fmt: skip


def test_mla_with_deepseek_v2s_experts_exports_natively(tmp_path):
    """MLA with experts routed as DeepSeek-V2's class routes them (softmax, the top k of all, scaled, a shared
    expert) exports to DeepseekV2ForCausalLM, its RoPE rows put back in neighbouring pairs (``_native_round_trip``;
    that class rotates and routes in float32 whatever the model's dtype)."""
    moe = {"kind": "moe", "hidden": 32, "n_experts": 4, "top_k": 2, "n_shared": 1, "routed_scale": 1.5}
    mla = {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 32}
    spec = {"mixer": mla, "mlp_pattern": "DEEE", "mlps": {"D": {"kind": "swiglu", "hidden": 48}, "E": moe}}
    _native_round_trip(spec, tmp_path, "DeepseekV2ForCausalLM", 1e-5)
    grouped = {**moe, "n_experts": 8, "n_groups": 4, "topk_groups": 2, "group_rank": "max"}  # V2's group-limited
    _native_round_trip({**spec, "mlps": {**spec["mlps"], "E": grouped}}, tmp_path / "grouped", "DeepseekV2ForCausalLM",
                       1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="MoE routing other than DeepSeek-V2's or V3's"):
        save_hf(build_model(tiny(**{**spec, "mlps": {**spec["mlps"], "E": {**moe, "norm_topk": True}}})),
                tmp_path / "c", remote_code=False)  # fmt: skip


def test_mla_with_deepseeks_yarn_exports_natively(tmp_path):
    """MLA with YaRN on its RoPE channels and DeepSeek's mscale_all_dim fold of it into the softmax scale exports to
    DeepseekV3ForCausalLM (``_native_round_trip``: positions past the 4 the scaling was trained for)."""
    yarn = {"kind": "yarn", "factor": 4.0, "original_max_seq_len": 4, "beta_fast": 32.0, "beta_slow": 1.0,
            "attention_factor": 1.1}  # fmt: skip
    mla = {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 32, "rope_scaling": yarn,
           "mscale_all_dim": 0.7}  # fmt: skip
    _native_round_trip({"mixer": mla}, tmp_path, "DeepseekV3ForCausalLM", 1e-6)
    rope = json.loads((tmp_path / "a" / "config.json").read_text())["rope_parameters"]
    assert (rope["rope_type"], rope["mscale_all_dim"], rope["attention_factor"]) == ("yarn", 0.7, 1.1)
    with pytest.raises(ValueError, match="mscale_all_dim=0.7 folds YaRN into the softmax scale; it needs rope_scaling"):
        build_model(tiny(mixer={**mla, "rope_scaling": None}))


@pytest.mark.parametrize("softcap", [None, 0.05])
def test_the_logit_scale_and_cap_reach_the_fused_loss(softcap):
    """``logit_scale`` (Granite's logits_scaling) scales the final states on their way into the head, and
    ``logit_softcap`` (Gemma 2's) caps the logits: the fused head + loss is the cross-entropy of the logits
    ``forward`` returns, and its gradients are theirs."""
    torch.manual_seed(0)
    model = build_model(tiny(logit_scale=0.125, residual_scale=0.5, embed_scale=3.0, logit_softcap=softcap)).double()
    ids = torch.randint(0, 97, (2, 9))
    logits = model(ids)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    got = model(ids, labels=ids)
    torch.testing.assert_close(got, want)
    for g, e in zip(torch.autograd.grad(got, model.lm_head.weight), torch.autograd.grad(want, model.lm_head.weight),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(g, e)
    plain = build_model(tiny(residual_scale=0.5, embed_scale=3.0)).double()
    plain.load_state_dict(model.state_dict())
    scaled = plain(ids) * 0.125
    torch.testing.assert_close(scaled if softcap is None else softcap * torch.tanh(scaled / softcap), logits)


@pytest.mark.parametrize("case", list(PER_LAYER))
def test_layers_that_differ_by_window_or_rope_export_natively(tmp_path, case):
    """Windows on some layers (Qwen2, Qwen3: layer_types), layers without RoPE (SmolLM3's no_rope_layers): the
    class's logits and greedy tokens are ours (``_native_round_trip``; transformers' RoPE angles in float32)."""
    spec, architecture, types = PER_LAYER[case]
    _native_round_trip({"mixer": None, **spec}, tmp_path, architecture, 1e-5 if "gemma" in case else 1e-6)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    if types is not None:
        assert ["S" if t == "sliding_attention" else "F" for t in config["layer_types"]] == list(types)
    if case == "smollm3":
        assert config["no_rope_layers"] == [1, 1, 1, 0]
    if case == "gemma2":
        assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (0.1, 0.5)
        wrong = {**spec, "mixers": {k: {**v, "softcap": 0.2 if k == "L" else 0.1} for k, v in spec["mixers"].items()}}
        with pytest.raises(ValueError, match="the windowed and full layers' heads, biases, norms, scales or caps"):
            save_hf(build_model(tiny(**wrong)), tmp_path / "c", remote_code=False)
        windowed_gemma1 = {**spec, "post_norms": False}
        with pytest.raises(ValueError, match=r"windows=True, logit_softcap=0.5 \(the first Gemma's"):
            save_hf(build_model(tiny(**windowed_gemma1)), tmp_path / "d", remote_code=False)
    if case == "granite":  # (its own softmax scale had hidden every attention setting checked after it)
        capped = {**spec, "mixer": {**spec["mixer"], "softcap": 0.5}}
        with pytest.raises(ValueError, match=r"soft-capped scores \(softcap=0.5"):
            save_hf(build_model(tiny(**capped)), tmp_path / "c", remote_code=False)
    if case == "qwen2":
        two = {"W": {**ATTENTION, "qkv_bias": True, "window": 5}, "X": {**ATTENTION, "qkv_bias": True, "window": 6}}
        with pytest.raises(ValueError, match=r"windows of different sizes \(\[5, 6\]"):
            save_hf(build_model(tiny(mixer=None, pattern="WX", mixers=two)), tmp_path / "c", remote_code=False)


def test_dtype_casts_weights_but_not_integer_buffers(tmp_path):
    from safetensors.torch import load_file

    model = build_model(VARIANTS["mla_mha2mla_form"])  # its picked RoPE frequencies are a saved integer buffer
    save_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    state = load_file(tmp_path / "hf" / "model.safetensors")
    assert state["model.layers.0.mixer.rotary.pair_index"].dtype == torch.long
    assert state["model.layers.0.mixer.q_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_wgqa_exports_folded(tmp_path):
    model = build_model(tiny(mixer={"kind": "attention", "n_heads": 4}))
    weighted = convert_model(model, {"to": "gqa", "n_kv_heads": 2, "method": "weighted"}).eval()
    with torch.no_grad():
        weighted.layers[0].mixer.k_merge.copy_(torch.tensor([0.9, 0.3, -0.2, 0.5]))
    save_hf(weighted, tmp_path / "hf")
    back = load_hf(tmp_path / "hf").eval()
    ids = torch.randint(0, 97, (2, 9))
    assert back.config.mixer.n_kv_heads == 2 and back.config.mixer.kv_merge == 1
    with torch.no_grad():
        assert (back(ids) - weighted(ids)).abs().max() <= 1e-5


def test_model_card_describes_the_architecture_footprint_and_metrics(tmp_path):
    from huggingface_hub import ModelCard

    model = build_model(tiny(mixer={**ATTENTION, "window": 8}, kv_sharing={"kind": "cla", "every": 2}))
    save_hf(model, tmp_path / "hf", metrics={"val_loss": 2.25, "lm_eval": {"task": {"acc": 0.5}}, "model": {}})
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    assert card.data.library_name == "transformers" and {"kvlab", "attention"} <= set(card.data.tags)
    assert model.config.describe_plan() in card.text and "trust_remote_code=True" in card.text
    fp = model.kv_footprint(torch.bfloat16)
    for r in fp.per_layer:  # the footprint, layer by layer
        window = "-" if r.max_tokens is None else r.max_tokens  # (a reader holds nothing: no window)
        assert f"| {r.layer} | attention | {r.bytes_per_token:,} | 0 | {window} | {r.kv_source} |" in card.text
    assert "| val_loss | 2.25 |" in card.text and "| lm_eval.task.acc | 0.5 |" in card.text
    umask = os.umask(0)
    os.umask(umask)
    # as any file the user writes (safetensors alone would write the weights 0600)
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()}
    assert modes == {oct(0o666 & ~umask)}


def test_tokenizer_is_written_for_auto_tokenizer(tmp_path):
    from kvlab.recipes.data import EOS, train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 300)
    save_hf(build_model(tiny()), tmp_path / "hf", tokenizer=tok)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.eos_token == EOS and loaded("return x")["input_ids"] == tok.encode("return x").ids
    # what batching clients read: EOS, which separates documents in training, also begins and pads them
    assert loaded.pad_token == loaded.bos_token == EOS and loaded.model_max_length == 64
    batch = loaded(["return x", "def f(x):\n    return"], padding=True)  # left-padded: what kvlab's models take
    assert batch["attention_mask"][0][0] == 0 and batch["attention_mask"][0][-1] == 1
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == generation.bos_token_id == generation.pad_token_id == tok.token_to_id(EOS)
    # the model itself has no pad id: transformers would make EOS's embedding its padding_idx, which trains no more
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.pad_token_id is None and model.model.embed_tokens.padding_idx is None


@pytest.mark.parametrize(
    "spec,reason",
    [
        (tiny(kv_sharing={"kind": "cla", "every": 2}), "cross-layer sharing of K/V"),
        (tiny(attention_source=[0, 0, 2, 3]), "cross-layer sharing of attention weights"),
        (
            tiny(mixer={**ATTENTION, "rope_dims": 8, "o_bias": True}),
            "partial RoPE (Phi-3's) with qkv_bias=False, o_bias=True",
        ),
        (tiny(mlp={"kind": "gelu", "hidden": 96}), "mlp 'gelu'"),
        (tiny(meta_tokens=2), "meta tokens before every sequence (meta_tokens=2)"),
        (tiny(mixer={**ATTENTION, "window": 4, "sinks": 2}), "sink positions beside the window (sinks=2)"),
        (tiny(mixer={**ATTENTION, "v_head_dim": 32}), "value heads wider than the key heads (v_head_dim=32"),
    ],
    ids=["cla", "sa", "partial_rope", "gelu", "meta_tokens", "sinks", "v_head_dim"],
)
def test_native_only_export_says_why_and_writes_nothing(tmp_path, spec, reason):
    with pytest.raises(ValueError, match="no native transformers class") as excinfo:
        save_hf(build_model(spec), tmp_path / "hf", remote_code=False)
    assert reason in str(excinfo.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "source,error",
    [
        ("from kvlab import archs\n", "imports a module"),
        ("import kvlab.archs\n", "cannot be made relative"),
        ('"""Use it so:\n\nfrom kvlab import build_model\n"""\n', "would make the export import kvlab"),
    ],
    ids=["module_from_package", "plain_import", "docstring"],
)
def test_remote_code_refuses_imports_it_cannot_ship(tmp_path, monkeypatch, source, error):
    module = f"remote_probe_{abs(hash(source))}"  # one name per case: imports are cached
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=error):
        remote_code_files(module)


def test_remote_code_files_import_only_each_other():
    files = remote_code_files()
    assert "modeling_kvlab.py" in files and "kvlab_layers_attention.py" in files  # mixers come with the registry
    for name, text in files.items():
        for module in re.findall(r"^\s*from \.(\w+) import", text, flags=re.MULTILINE):
            assert f"{module}.py" in files, f"{name} imports .{module}, which is not shipped"


@pytest.mark.parametrize("name", ["cla", "hymba", "block_transformer"])
def test_an_export_ships_only_the_mixer_families_its_model_uses(name):
    """A CLA model carries attention, not Mamba or RWKV; Hymba its parallel layer and Mamba; only a Block
    Transformer the Block Transformer. What is shipped imports only what is shipped (the loading test runs it)."""
    from kvlab.archs.hf import unused_modules

    config = build_model(_small(preset_dict(name))).config
    files = remote_code_files(leave_out=unused_modules(config))
    used = {"cla": {"attention"}, "hymba": {"attention", "parallel", "mamba"}, "block_transformer": {"attention"}}
    families = {"attention", "gau", "infini", "mamba", "mla", "parallel", "retention", "rwkv"}
    assert {f for f in families if f"kvlab_layers_{f}.py" in files} == used[name]
    assert ("kvlab_archs_block_transformer.py" in files) == (name == "block_transformer")
    for file, text in files.items():
        for module in re.findall(r"^\s*from \.(\w+) import", text, flags=re.MULTILINE):
            assert f"{module}.py" in files, f"{file} imports .{module}, which is not shipped"


def test_with_kvlab_imported_auto_classes_load_an_export_without_remote_code(tmp_path):
    """``import kvlab`` registers with the Auto classes once transformers' are imported (not before: importing
    them costs seconds); the installed kvlab's classes then load an export."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    # here both are imported (whichever first): registered
    assert CONFIG_MAPPING["kvlab"] is KvlabConfig
    assert AutoModelForCausalLM._model_mapping[KvlabConfig] is KvlabForCausalLM
    model = build_model(tiny(kv_sharing={"kind": "cla", "every": 2})).eval()
    save_hf(model, tmp_path / "export")
    ids = torch.randint(0, 97, (1, 9))
    torch.save(ids, tmp_path / "ids.pt")
    script = """
import sys, torch
import kvlab
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/export")  # no trust_remote_code
assert type(model).__module__ == "kvlab.archs.hf_modeling", type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[1] + "/ids.pt")).logits, sys.argv[1] + "/logits.pt")
"""
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300)
    with torch.no_grad():
        assert torch.allclose(torch.load(tmp_path / "logits.pt"), model(ids), atol=1e-5)


def test_remote_code_loss_is_over_the_steps_tokens_as_transformers_trainer_asks():
    """transformers' Trainer sees the forward's **kwargs, passes num_items_in_batch (the labelled tokens of the
    whole step: every micro-batch, every process) and then neither divides by the accumulation steps nor
    averages processes: the micro-batches' losses must add up to the step's mean."""
    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    model = build_model(tiny()).double().eval()
    hf = KvlabForCausalLM(KvlabConfig(kvlab=model.config.to_dict())).double().eval()
    hf.model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (4, 9))
    labels = ids.clone()  # transformers' labels: the inputs, shifted by the model
    labels[0, 3:] = labels[2, 6:] = -100  # micro-batches with unequal numbers of labelled tokens
    with torch.no_grad():
        whole = model(ids[:, :-1], labels=labels[:, 1:])
        assert torch.allclose(hf(ids, labels=labels, use_cache=False).loss, whole, rtol=1e-12)
        n = (labels[:, 1:] != -100).sum()
        parts = [hf(ids[i : i + 2], labels=labels[i : i + 2], use_cache=False, num_items_in_batch=n).loss
                 for i in (0, 2)]  # fmt: skip
    assert torch.allclose(sum(parts), whole, rtol=1e-12)


def test_remote_codes_gradient_checkpointing_is_kvlabs_activation_checkpointing():
    """transformers' Trainer(gradient_checkpointing=True) calls gradient_checkpointing_enable: it turns on kvlab's
    own, and the step's loss and gradients stay those of the plain step (float64)."""
    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    model = build_model(tiny(kv_sharing={"kind": "cla", "every": 2})).double()
    hf = KvlabForCausalLM(KvlabConfig(kvlab=model.config.to_dict())).double().train()
    hf.model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    steps = []
    for on in (False, True):
        if on:  # transformers 5's name, and its old one
            (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()
        assert hf.model.activation_checkpointing is on and hf.gradient_checkpointing is on
        hf.zero_grad()
        loss = hf(ids, labels=ids, use_cache=False).loss
        loss.backward()
        steps.append((loss.detach(), [p.grad.clone() for p in hf.parameters()]))
    (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
    assert not hf.model.activation_checkpointing
    hf.gradient_checkpointing = True  # as code that sets the flag itself does
    assert hf.model.activation_checkpointing
    (plain, plain_grads), (checkpointed, grads) = steps
    assert torch.allclose(checkpointed, plain, rtol=1e-13)
    assert all(torch.allclose(g, h, rtol=1e-10, atol=1e-13) for g, h in zip(grads, plain_grads, strict=True))


@pytest.mark.parametrize("tied", [False, True])
def test_remote_code_resizes_its_vocabulary_and_saves_the_new_size(tmp_path, tied):
    """resize_token_embeddings (new tokens for fine-tuning) keeps kvlab's own config in step: the new ids are
    taken, and the saved model loads again at its new size; a model with other vocabulary-sized embeddings (the
    Block Transformer's lookup embedder) is refused, naming them."""
    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    model = build_model(tiny(tie_embeddings=tied))
    hf = KvlabForCausalLM(KvlabConfig(kvlab=model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    hf.resize_token_embeddings(120, mean_resizing=False)
    assert hf.model.config.vocab_size == hf.config.kvlab["vocab_size"] == 120
    assert (
        hf.model.lm_head.weight.shape == (120, 64) and (hf.model.lm_head.weight is hf.model.embed_tokens.weight) == tied
    )
    ids = torch.tensor([[1, 110, 5]])
    with torch.no_grad():
        logits = hf(ids, use_cache=False).logits
        assert logits.shape == (1, 3, 120)
        hf.save_pretrained(tmp_path)
        again = KvlabForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(again(ids, use_cache=False).logits, logits)
    blocks = build_model(_small(preset_dict("block_transformer")))
    with pytest.raises(NotImplementedError, match="block_embed"):
        KvlabForCausalLM(KvlabConfig(kvlab=blocks.config.to_dict())).resize_token_embeddings(120)


def test_remote_code_refuses_assisted_generation_by_name():
    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    hf = KvlabForCausalLM(KvlabConfig(kvlab=build_model(tiny()).config.to_dict())).eval()
    ids = torch.tensor([[1, 2, 3]])
    for kwargs in ({"assistant_model": hf}, {"prompt_lookup_num_tokens": 3}):
        with pytest.raises(ValueError, match="assisted generation .* is not supported"):
            hf.generate(ids, max_new_tokens=2, **kwargs)
    assert hf.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_remote_code_generation_fills_the_cache_again_past_longropes_context():
    """At the first token past LongRoPE's original context (8 positions), `transformers`' generate on kvlab's
    remote code fills the cache again from the whole sequence, as kvlab's generate (and Phi-3's) does: the
    tokens it feeds the model each step, and the same greedy tokens."""
    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    longrope = {"kind": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8, "original_max_seq_len": 8,
                "attention_factor": 1.3}  # fmt: skip
    model = build_model(tiny(kv_sharing={"kind": "cla", "every": 2}, mixer={**ATTENTION, "rope_scaling": longrope}))
    hf = KvlabForCausalLM(KvlabConfig(kvlab=model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    fed, inner = [], hf.model.forward
    hf.model.forward = lambda ids, *args, **kwargs: (fed.append(ids.shape[1]), inner(ids, *args, **kwargs))[1]
    prompt = torch.randint(1, 97, (3, 5))
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                      do_sample=False, pad_token_id=0)  # fmt: skip
    assert fed == [5, 1, 1, 1, 9, 1, 1, 1]  # the prompt, positions 5 to 7, then 0 to 8 again, and on
    assert torch.equal(out, model.eval().generate(prompt, max_new_tokens=8, compile=False))


def test_remote_code_keeps_the_logits_asked_for():
    from kvlab.archs.hf_modeling import KvlabConfig, KvlabForCausalLM

    model = build_model(tiny()).eval()
    hf = KvlabForCausalLM(KvlabConfig(kvlab=model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        full = model(ids)
        for keep, expected in (
            (0, full),
            (1, full[:, -1:]),
            (3, full[:, -3:]),
            (torch.tensor([0, 4]), full[:, [0, 4]]),
        ):
            out = hf(ids, logits_to_keep=keep, use_cache=False).logits
            assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5), keep


def test_lightning_beside_attention_with_experts_exports_as_minimax(tmp_path):
    """MiniMax-01's layers (lightning attention, GQA, experts in every layer) in its block (the normalised residual
    times alpha, the sublayer's output times beta) export to MiniMaxForCausalLM (``_native_round_trip``: its RMSNorms
    run in float32 whatever the dtype); what it lacks is named: partial RoPE (MiniMax's released code rotates half of
    each head, its class every channel), a dense MLP, a plain residual; and a plain residual goes to no other class.
    On import, alphas (or betas) that differ between the sublayer kinds are refused."""
    from kvlab.archs.hf_families import _minimax_from_hf

    moe = {"kind": "moe", "hidden": 32, "n_experts": 4, "top_k": 2, "norm_topk": True}
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}
    spec = {"mixer": None, "pattern": "LLAL", "n_layers": 4, "mlp": moe, "normed_residual": True,
            "residual_alpha": 2.5, "residual_scale": 0.7,
            "mixers": {"L": {"kind": "lightning", "n_heads": 4, "chunk_size": 4}, "A": attention}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "MiniMaxForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["layer_types"], config["mlp_alpha_factor"], config["linear_attn_beta_factor"]) == (
        ["linear_attention", "linear_attention", "full_attention", "linear_attention"], 2.5, 0.7)  # fmt: skip
    for broken, match in (({"mixers": {**spec["mixers"], "A": {**attention, "rope_dims": 8}}}, r"partial RoPE"),
                          ({"mlp": {"kind": "swiglu", "hidden": 32}}, r"MLPs other than one MoE"),
                          ({"normed_residual": False, "residual_alpha": None}, r"normed_residual=False")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, **broken})), tmp_path / "c", remote_code=False)
    with pytest.raises(ValueError, match=r"residuals taken after the norms \(normed_residual"):
        save_hf(build_model(tiny(normed_residual=True)), tmp_path / "c", remote_code=False)
    with pytest.raises(ValueError, match=r"mlp_alpha_factor = \[1, 2.5\] .* differ; kvlab's block holds one alpha"):
        _minimax_from_hf({"vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "mlp_alpha_factor": 2.5})  # fmt: skip


def test_attention_and_mamba2_added_export_as_falcon_h1(tmp_path):
    """Attention and Mamba-2 (2 groups, its width given outright: Falcon-H1's mamba_d_ssm) side by side, their outputs
    added, in every layer, with an embedding scale and a logit scale, export to FalconH1ForCausalLM
    (``_native_round_trip``: its norms and scan run in float32), every other multiplier written as 1; what it lacks is
    named; a Mamba-2 of its own width goes to no class that takes expand * hidden_size."""
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}
    mamba2 = {"kind": "mamba2", "head_dim": 16, "state_dim": 8, "n_groups": 2, "chunk_size": 8, "inner": 96}
    spec = {"mixer": {"kind": "parallel", "combine": "sum", "mixers": [attention, mamba2]}, "n_layers": 2,
            "embed_scale": 3.0, "logit_scale": 0.5}  # fmt: skip
    _native_round_trip(spec, tmp_path, "FalconH1ForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["mamba_d_ssm"], config["mamba_n_heads"], config["embedding_multiplier"], config["key_multiplier"],
            config["ssm_multipliers"]) == (96, 6, 3.0, 1.0, [1.0] * 5)  # fmt: skip
    for broken, match in (({"combine": "mean"}, r"mixer kind 'parallel'"),
                          ({"mixers": [{**attention, "window": 5}, mamba2]}, r"window=5 \(Falcon-H1's")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, "mixer": {**spec["mixer"], **broken}})), tmp_path / "c",
                    remote_code=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"Mamba-2 with inner=96 given outright"):
        save_hf(build_model(tiny(mixer=mamba2, mlp={"kind": "none"})), tmp_path / "c", remote_code=False)


def test_gated_deltanet_and_attention_in_their_own_blocks_export_as_olmo_hybrid(tmp_path):
    """Gated DeltaNet with negative eigenvalues in Llama's block beside OLMo 3's attention (query and key norms over
    the projections) in OLMo 2's block (norm_pattern PPOP) export to OlmoHybridForCausalLM (``_native_round_trip``);
    what it lacks is named; norms placed per layer go to no other class, and Qwen3-Next's does not claim them."""
    gdn = {"kind": "gated_deltanet", "n_heads": 4, "head_dim": 12, "value_head_dim": 24, "negative_eigenvalues": True}
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qk_norm_over": "projection"}
    spec = {"mixer": None, "pattern": "DDAD", "n_layers": 4, "mixers": {"D": gdn, "A": attention},
            "norm_pattern": "PPOP", "norm": {"kind": "rmsnorm", "eps": 1e-5}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "OlmoHybridForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["layer_types"][1:3], config["linear_allow_neg_eigval"]) == (
        ["linear_attention", "full_attention"], True)  # fmt: skip
    for broken, match in (({"norm_pattern": "PPPP"}, r"norm_pattern='PPPP' against its layers"),
                          ({"mixers": {"D": {**gdn, "n_qk_heads": 2}, "A": attention}},
                           r"2 query/key heads for 4")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            save_hf(build_model(tiny(**{**spec, **broken})), tmp_path / "c", remote_code=False)
    with pytest.raises(ValueError, match=r"norms placed per layer \(norm_pattern='PO'"):
        save_hf(build_model(tiny(norm_pattern="PO")), tmp_path / "c", remote_code=False)


def test_post_norms_and_per_head_query_key_norms_export_as_exaone4(tmp_path):
    """OLMo 2's block with RMSNorms of each query and key head: windowed layers with RoPE beside full layers without
    positions (3 to 1), and full layers alone with RoPE, export to Exaone4ForCausalLM (``_native_round_trip``); what
    it lacks is named; norms over the whole projections stay OLMo's."""
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True}
    spec = {"mixer": None, "pattern": "LLLG", "n_layers": 4, "pre_norms": False, "post_norms": True,
            "mixers": {"L": {**attention, "window": 5}, "G": {**attention, "rope_dims": 0}}}  # fmt: skip
    _native_round_trip(spec, tmp_path, "Exaone4ForCausalLM", 1e-5)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["sliding_window"], config["layer_types"][2:]) == (5, ["sliding_attention", "full_attention"])
    _native_round_trip({"pre_norms": False, "post_norms": True, "mixer": attention}, tmp_path / "full",
                       "Exaone4ForCausalLM", 1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"full layers with RoPE \(rope_dims=16\) beside windowed ones"):
        save_hf(build_model(tiny(**{**spec, "mixers": {**spec["mixers"], "G": attention}})), tmp_path / "c",
                remote_code=False)  # fmt: skip
    olmo = {**attention, "qk_norm_over": "projection"}
    save_hf(build_model(tiny(pre_norms=False, post_norms=True, mixer=olmo)), tmp_path / "olmo", remote_code=False)
    assert json.loads((tmp_path / "olmo" / "config.json").read_text())["model_type"] == "olmo2"
