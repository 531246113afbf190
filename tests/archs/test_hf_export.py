"""Export to Hugging Face: what we write loads in a fresh process with `transformers` alone and matches us."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kvlab import build_model
from kvlab.archs.convert import convert_model
from kvlab.archs.hf import load_hf, save_hf
from tests.conftest import PRESETS, preset_dict, tiny

transformers = pytest.importorskip("transformers")

ATTENTION = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}
EXPORTABLE = {
    **{name: preset_dict(name) | {"n_layers": 2, "vocab_size": 97, "max_seq_len": 64} for name in PRESETS},
    "llama_bias_tied": tiny(mixer={**ATTENTION, "qkv_bias": True, "o_bias": True}, tie_embeddings=True),
    "mistral_window": tiny(mixer={**ATTENTION, "window": 6}),
    "qwen2_bias": tiny(mixer={**ATTENTION, "qkv_bias": True}),
    "sharded": tiny(),
}
EXPECTED_TYPE = {"mistral_window": "mistral", "qwen2_bias": "qwen2"}

# Run in a fresh interpreter that imports only transformers and torch.
LOADER = """
import json, sys, torch, transformers
for name, directory in json.loads(sys.argv[1]).items():
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.load(directory + "/ids.pt")
    with torch.no_grad():
        result = model(ids, use_cache=True)
        generated = model.generate(ids[:1, :5], max_new_tokens=16, do_sample=False, min_new_tokens=16)
    keys = result.past_key_values.layers[0].keys
    torch.save({"logits": result.logits, "generated": generated[0, 5:], "kv_heads": keys.shape[1],
                "class": type(model).__name__}, directory + "/theirs.pt")
assert not any(m.startswith("kvlab") for m in sys.modules)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_export")
    models, dirs = {}, {}
    for name, spec in EXPORTABLE.items():
        torch.manual_seed(0)
        model = build_model(spec).eval()
        with torch.no_grad():  # biases away from zero, so they are checked too
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        out = root / name
        save_hf(model, out, max_shard_bytes=20_000 if name == "sharded" else 5 * 2**30)
        torch.save(torch.randint(0, 97, (2, 13)), out / "ids.pt")
        models[name], dirs[name] = model, str(out)
    subprocess.run([sys.executable, "-c", LOADER, json.dumps(dirs)], check=True, cwd=root, timeout=600)
    return models, dirs


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_loads_natively_and_matches_logits_and_generation(exported, name):
    models, dirs = exported
    model, theirs = models[name], torch.load(f"{dirs[name]}/theirs.pt")
    config = json.loads(open(f"{dirs[name]}/config.json").read())
    assert config["model_type"] == EXPECTED_TYPE.get(name, "llama") and "auto_map" not in config
    ids = torch.load(f"{dirs[name]}/ids.pt")
    with torch.no_grad():
        assert (theirs["logits"] - model(ids)).abs().max() <= 1e-4
    ours = model.generate(ids[:1, :5], max_new_tokens=16)[0, 5:]
    assert torch.equal(theirs["generated"], ours)
    assert theirs["kv_heads"] == model.config.layer_mixers[0].n_kv_heads  # transformers' cache is the GQA one


def test_sharded_export_has_an_index(exported):
    _, dirs = exported
    index = json.loads(open(f"{dirs['sharded']}/model.safetensors.index.json").read())
    assert len(set(index["weight_map"].values())) > 1


def test_export_import_export_is_the_identity(tmp_path):
    from safetensors.torch import load_file

    model = build_model(tiny(tie_embeddings=True))
    save_hf(model, tmp_path / "a")
    again = load_hf(tmp_path / "a")
    save_hf(again, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


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


def test_tokenizer_is_written_for_auto_tokenizer(tmp_path):
    from kvlab.recipes.data import EOS, train_tokenizer

    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, 300)
    save_hf(build_model(tiny()), tmp_path / "hf", tokenizer=tok)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.eos_token == EOS and loaded("return x")["input_ids"] == tok.encode("return x").ids
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == tok.token_to_id(EOS)


@pytest.mark.parametrize(
    "spec,reason",
    [
        (tiny(kv_sharing={"kind": "cla", "every": 2}), "cross-layer K/V sharing"),
        (tiny(mixer={**ATTENTION, "rope_dims": 8}), "partial RoPE (rope_dims=8 of head_dim=16)"),
        (tiny(mlp={"kind": "gelu", "hidden": 96}), "mlp 'gelu'"),
    ],
    ids=["cla", "partial_rope", "gelu"],
)
def test_unexportable_models_say_why_and_write_nothing(tmp_path, spec, reason):
    with pytest.raises(ValueError, match="no native transformers class") as excinfo:
        save_hf(build_model(spec), tmp_path / "hf")
    assert reason in str(excinfo.value)
    assert not list(tmp_path.iterdir())
