"""Bad input to the model API, the cache, generate, load_hf and save_hf: a named ValueError, never a
traceback from deep inside, a silently different model, or a user's file lost."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvlab import ModelConfig, build_model
from tests.conftest import tiny

NAN, INF = float("nan"), float("inf")

LONGROPE = {"kind": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_seq_len": 8,
            "attention_factor": 1.0}  # fmt: skip
BAD_CONFIGS = {
    "nan init_std": (tiny(init_std=NAN), "init_std=nan must be a finite number"),
    "inf rope_theta": (tiny(mixer={"kind": "attention", "n_heads": 4, "rope_theta": INF}), "rope_theta=inf"),
    "nan value_mix": (
        tiny(mixer={"kind": "attention", "n_heads": 4, "value_residual": "resformer", "value_mix": NAN}),
        "value_mix=nan",
    ),  # fmt: skip
    "inf dt_max": (tiny(mixer={"kind": "mamba2", "dt_max": INF}), "dt_max=inf"),
    "nan norm eps": (tiny(norm={"kind": "rmsnorm", "eps": NAN}), "norm.eps=nan"),
    "window beyond max_seq_len": (
        tiny(mixer={"kind": "attention", "n_heads": 4, "window": 65}),
        "window=65 exceeds max_seq_len=64",
    ),  # fmt: skip
    "mixer kind of the wrong type": (tiny(mixer={"kind": ["attention"]}), r"mixer.kind=\['attention'\] is not a known"),
    "mixer kind missing": (tiny(mixer={"n_heads": 4}), "mixer.kind=None is not a known mixer kind"),
    "unknown rope scaling": (
        tiny(mixer={"kind": "attention", "n_heads": 4, "rope_scaling": {"kind": "ntk"}}),
        "mixer.rope_scaling.kind='ntk' is not one of linear, llama3",
    ),  # fmt: skip
    "rope scaling without its settings": (
        tiny(mixer={"kind": "attention", "n_heads": 4, "rope_scaling": {"kind": "llama3", "factor": 8.0}}),
        "mixer.rope_scaling: kind llama3 takes exactly factor, high_freq_factor, kind, low_freq_factor",
    ),
    "negative rope factor": (
        tiny(mixer={"kind": "attention", "n_heads": 4, "rope_scaling": {"kind": "linear", "factor": -2.0}}),
        "mixer.rope_scaling.factor=-2.0 must be a positive number",
    ),  # fmt: skip
    "longrope factors not a list": (
        tiny(mixer={"kind": "attention", "n_heads": 4, "rope_scaling": LONGROPE | {"short_factor": 1.0}}),
        r"mixer.rope_scaling.short_factor=1.0 must be a list of positive numbers, one per rotated pair",
    ),
    "longrope factors, one short": (
        tiny(mixer={"kind": "attention", "n_heads": 4, "rope_scaling": LONGROPE | {"long_factor": [2.0] * 7}}),
        "mixer.rope_scaling.long_factor has 7 factors; RoPE on 16 channels rotates 8 pairs, one factor each",
    ),
    "longrope on mla": (
        tiny(mixer={"kind": "mla", "n_heads": 4, "rope_scaling": LONGROPE}),
        r"mixer.rope_scaling: longrope \(Phi-3's\) is not supported on MLA",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_model_configs_name_the_field(case):
    d, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(d)


def test_a_broken_or_empty_model_yaml_names_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("d_model: 64\nmixer: {kind: attention, n_heads: 4\nn_layers: 2\n")
    with pytest.raises(ValueError, match=r"broken.yaml, line \d+: .*"):
        ModelConfig.from_yaml(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="empty.yaml: expected a mapping of model settings, got nothing"):
        ModelConfig.from_yaml(empty)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny(n_layers=2)).eval()


BAD_GENERATE = {
    "float count": (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be an integer"),
    "negative count": (dict(max_new_tokens=-1), "max_new_tokens=-1 must be >= 0"),
    "nan temperature": (dict(temperature=NAN), "temperature=nan must be a finite number"),
    "negative temperature": (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
    "zero top_k": (dict(temperature=1.0, top_k=0), "top_k=0 must be >= 1"),
    "eos outside the vocabulary": (dict(eos_token_id=97), "eos_token_id=97 is outside the vocabulary"),
    "empty prompt": (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r"non-empty \[batch, tokens\].*\[1, 0\]"),
    "1-D prompt": (dict(input_ids=torch.tensor([1, 2, 3])), r"got shape \[3\]"),
    "float prompt": (dict(input_ids=torch.ones(1, 3)), "expected an integer tensor of token ids"),
    "string prompt": (dict(input_ids="1 2 3"), "got str"),
    "empty prompt in a list": (dict(input_ids=[[1, 2, 3], []]), r"input_ids\[1\]: expected a non-empty 1-D sequence"),
    "id beyond the vocabulary": (
        dict(input_ids=torch.tensor([[1, 97]])),
        r"token id 97 is outside the vocabulary \(0..96\)",
    ),
    "negative id": (dict(input_ids=torch.tensor([[-1, 5]])), "token id -1 is outside"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_generate_arguments_are_named(model, case):
    kwargs, message = BAD_GENERATE[case]
    kwargs = {"input_ids": torch.tensor([[1, 2, 3]]), "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


@pytest.mark.parametrize(
    "labels,message",
    [(torch.ones(1, 2, dtype=torch.long), r"input_ids' shape \[1, 3\].*got a torch.int64 tensor of shape \[1, 2\]"),
     (torch.ones(1, 3), "got a torch.float32 tensor"), ([[1, 2, 3]], "got list")],
)  # fmt: skip
def test_labels_not_shaped_as_the_tokens_are_named(model, labels, message):
    with pytest.raises(ValueError, match=message):
        model(torch.tensor([[1, 2, 3]]), labels=labels)


def test_bad_cache_arguments_and_foreign_caches_are_refused(model):
    with pytest.raises(ValueError, match="dtype=torch.int8: a cache holds floating-point states"):
        model.new_cache(1, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="batch_size=1.5 must be an integer"):
        model.new_cache(1.5, 8)
    with pytest.raises(ValueError, match="max_len=0 must be >= 1"):
        model.new_cache(1, 0)
    other = build_model(tiny(n_layers=2, mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": 1}))
    with pytest.raises(ValueError, match="cache: it was made by another model"):
        model(torch.tensor([[1, 2]]), cache=other.new_cache(1, 8))
    with pytest.raises(ValueError, match="expected a kvlab Cache"):
        model(torch.tensor([[1, 2]]), cache={"k": None})
    twin = build_model(tiny(n_layers=2))  # the same architecture: its caches have the same shapes
    twin.load_state_dict(model.state_dict())
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids, cache=twin.new_cache(1, 8)), model(ids))


# -- Hugging Face directories ----------------------------------------------------------------


def _llama_dir(tmp_path, model, **config):
    from kvlab.archs.hf import save_hf

    out = save_hf(model, tmp_path / "hf")
    hf = json.loads((out / "config.json").read_text())
    hf.update(config)
    (out / "config.json").write_text(json.dumps(hf))
    return out


def test_tied_embeddings_with_a_different_head_in_the_file_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from kvlab.archs.hf import load_hf

    untied = build_model(tiny(n_layers=1))
    out = _llama_dir(tmp_path, untied, tie_word_embeddings=True)
    with pytest.raises(
        ValueError, match="tie_word_embeddings=true, but the weights hold an lm_head.weight that differs"
    ):
        load_hf(out)
    state = load_file(out / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # a head equal to the embeddings: fine
    save_file(state, out / "model.safetensors")
    assert load_hf(out).config.tie_embeddings


@pytest.mark.parametrize(
    "change, message",
    [
        ({"intermediate_size": 100}, r"mlp.*has shape \[96, 64\] in the weights, .*check intermediate_size"),
        ({"num_key_value_heads": 4}, r"k_proj.weight has shape .*check num_key_value_heads"),
        ({"num_hidden_layers": None}, "the field 'num_hidden_layers' is missing|num_hidden_layers"),
    ],  # fmt: skip
)
def test_configs_that_do_not_match_their_weights_name_the_field(tmp_path, change, message):
    from kvlab.archs.hf import load_hf

    out = _llama_dir(tmp_path, build_model(tiny(n_layers=1)), **change)
    if change.get("num_hidden_layers", 0) is None:
        hf = json.loads((out / "config.json").read_text())
        del hf["num_hidden_layers"]
        (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message):
        load_hf(out)


def test_garbage_weights_and_configs_name_the_file(tmp_path):
    from kvlab.archs.hf import load_hf

    out = _llama_dir(tmp_path, build_model(tiny(n_layers=1)))
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors weights file"):
        load_hf(out)
    weights.unlink()
    (out / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: not a readable PyTorch weights file"):
        load_hf(out)
    (out / "config.json").write_text("")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        load_hf(out)


# -- save_hf never deletes what it did not write -------------------------------------------


def test_export_refuses_a_directory_it_did_not_write(tmp_path):
    from kvlab.archs.hf import save_hf

    model = build_model(tiny(n_layers=1))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    partial = tmp_path / "mine.partial"  # a name the exporter once used for its temporary
    partial.mkdir()
    (partial / "data.bin").write_bytes(b"mine too")
    with pytest.raises(ValueError, match=r"mine holds files kvlab did not write, or changed since \(notes.txt\)"):
        save_hf(model, out)
    assert (out / "notes.txt").read_text() == "my notes" and (partial / "data.bin").read_bytes() == b"mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "mine.partial"]
    save_hf(model, out, overwrite=True)  # said explicitly: replaced whole
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    assert (partial / "data.bin").read_bytes() == b"mine too"


def test_export_replaces_its_own_earlier_export_but_not_files_added_to_it(tmp_path):
    from kvlab.archs.hf import load_hf, save_hf

    first, second = build_model(tiny(n_layers=1)), build_model(tiny(n_layers=1))
    out = save_hf(first, tmp_path / "hf", max_shard_bytes=20_000)  # shards
    save_hf(second, out)  # one file now: the shards of the first are gone, as kvlab wrote them
    assert not list(out.glob("model-*.safetensors"))
    torch.testing.assert_close(load_hf(out).lm_head.weight, second.lm_head.weight)
    (out / "README.md").write_text("# my model card")
    with pytest.raises(ValueError, match=r"holds files kvlab did not write, or changed since \(README.md\)"):
        save_hf(first, out)
    assert (out / "README.md").exists()


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    from kvlab.archs import hf

    model = build_model(tiny(n_layers=1))
    out = hf.save_hf(model, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "_save_weights", no_space)
    with pytest.raises(OSError, match="No space left"):
        hf.save_hf(build_model(tiny(n_layers=1)), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # and no temporary
    with pytest.raises(OSError):
        hf.save_hf(model, tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_non_finite_values_are_caught_anywhere_in_a_config():
    from kvlab._config import first_non_finite

    assert first_non_finite({"a": [1.0, {"b": math.inf}]}) == ("a[1].b", math.inf)
    assert first_non_finite({"a": [1.0, {"b": 2}], "c": "nan"}) is None


def test_scaled_rope_is_carried_or_refused_by_conversions():
    from kvlab.archs import convert_model

    scaled = {"kind": "attention", "n_heads": 4, "n_kv_heads": 4, "rope_scaling": {"kind": "linear", "factor": 2.0}}
    model = build_model(tiny(n_layers=2, mixer=scaled))
    assert convert_model(model, {"to": "gqa", "n_kv_heads": 2}).config.mixer.rope_scaling == scaled["rope_scaling"]
    with pytest.raises(ValueError, match="RoPE scaling"):
        convert_model(model, {"to": "mla", "kv_lora_rank": 32, "rope_dims": 8})
    with pytest.raises(ValueError, match="rope_scaling=None differs from the source's rope_scaling"):
        ModelConfig.from_dict(
            tiny(
                n_layers=2,
                kv_source=[0, 0],
                mixers={"S": scaled, "P": {**scaled, "rope_scaling": None}},
                pattern="SP",
                mixer=None,
            )
        )
