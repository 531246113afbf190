"""The staged uptraining recipes end to end (tiny models; the real default is the README's main job)."""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch

from tests.recipes.test_train import log_rows, run_dirs, train, train_losses

# An 8-head MHA parent, small enough to train in seconds.
TINY_MHA = ["model.mixer.n_heads=8", "model.mixer.n_kv_heads=8", "model.mixer.head_dim=8"]
PARENT = ["uptrain.parent_steps=30", "uptrain.alpha=0.2"]  # 6 uptraining steps


def _metrics(tmp_path, run_name):
    return json.loads((run_dirs(tmp_path, run_name)[-1] / "metrics.json").read_text())


def test_gqa_uptrain_runs_every_stage_then_reuses_the_parent(tmp_path, data_cache):
    proc = train(tmp_path, data_cache, "recipe=gqa_uptrain", *TINY_MHA, *PARENT, "uptrain.compare_scratch=true")
    m = _metrics(tmp_path, "gqa_uptrain")
    for key in ("val_loss", "val_ppl", "train_loss", "tokens_seen", "tokens_per_s", "params", "kv_bytes_per_token"):
        assert math.isfinite(m[key]), key
    assert m["convert"] == {"to": "gqa", "n_kv_heads": 2, "method": "mean"}  # n_heads / 4
    assert m["parent"]["tokens_seen"] == 30 * 8 * 64
    assert m["uptrained"]["steps"] == 6 and m["uptrained"]["tokens_seen"] == 6 * 8 * 64
    assert m["scratch"]["steps"] == 6
    assert m["converted"]["kv_bytes_per_token"] * 8 == m["parent"]["kv_bytes_per_token"] * 2
    assert m["uptrained"]["val_ppl"] < m["converted"]["val_ppl"]
    assert m["val_loss"] == m["uptrained"]["val_loss"] and m["model"]["mixer"]["n_kv_heads"] == 2
    assert "uptrained" in proc.stdout and "converted" in proc.stdout  # the table
    run = run_dirs(tmp_path, "gqa_uptrain")[-1]
    assert (run / "uptrained" / "checkpoints" / "last.ckpt").is_file()
    for stage in ("parent", "uptrained", "scratch"):  # validation only: the stages' time goes to training
        assert not {"passkey", "decode_tokens_per_s"} & set(json.loads((run / stage / "metrics.json").read_text()))

    # mqa_uptrain starts from the same cached parent: no parent training, same parent quality; with stage eval,
    # every stage runs the evaluations eval picks (here pass keys, within max_seq_len=128 less the answer's 8)
    proc = train(tmp_path, data_cache, "recipe=mqa_uptrain", *TINY_MHA, *PARENT, "stages=[train,eval]",
                 "eval.decode_speed=false", "eval.passkey_trials=1")  # fmt: skip
    assert "reusing the parent" in proc.stdout + proc.stderr
    for stage in ("parent", "uptrained"):
        stage_metrics = json.loads((run_dirs(tmp_path, "mqa_uptrain")[-1] / stage / "metrics.json").read_text())
        assert stage_metrics["passkey"] and "decode_tokens_per_s" not in stage_metrics
        assert max(map(int, stage_metrics["passkey"])) == 120
    mqa = _metrics(tmp_path, "mqa_uptrain")
    assert mqa["parent"]["val_loss"] == pytest.approx(m["parent"]["val_loss"], abs=1e-6)
    assert mqa["converted"]["kv_bytes_per_token"] * 8 == mqa["parent"]["kv_bytes_per_token"]
    assert mqa["uptrained"]["val_ppl"] < mqa["converted"]["val_ppl"]
    assert "scratch" not in mqa

    # cla_uptrain too: the second of the two layers reads the first's K/V
    train(tmp_path, data_cache, "recipe=cla_uptrain", *TINY_MHA, *PARENT)
    cla = _metrics(tmp_path, "cla_uptrain")
    assert cla["parent"]["val_loss"] == pytest.approx(m["parent"]["val_loss"], abs=1e-6)
    assert cla["convert"] == {"to": "cla", "every": 2} and cla["model"]["kv_sharing"]["every"] == 2
    assert cla["converted"]["kv_bytes_per_token"] * 2 == cla["parent"]["kv_bytes_per_token"]
    assert cla["uptrained"]["val_ppl"] < cla["converted"]["val_ppl"]

    # and mla_uptrain (MHA2MLA): per layer a 16-wide latent + 8 K/V heads x 4 RoPE channels, vs 2 x 8 x 8
    train(tmp_path, data_cache, "recipe=mla_uptrain", *TINY_MHA, *PARENT, "init.convert.kv_lora_rank=16",
          "init.convert.rope_dims=4", "uptrain.lr=1e-3")  # fmt: skip
    mla = _metrics(tmp_path, "mla_uptrain")
    stage_cfg = (run_dirs(tmp_path, "mla_uptrain")[-1] / "uptrained" / "checkpoints" / "config.yaml").read_text()
    assert "lr: 0.001" in stage_cfg  # the uptraining's own peak lr
    assert mla["parent"]["val_loss"] == pytest.approx(m["parent"]["val_loss"], abs=1e-6)
    assert mla["model"]["mixer"]["kind"] == "mla"
    assert mla["converted"]["kv_bytes_per_token"] * 128 == mla["parent"]["kv_bytes_per_token"] * (16 + 8 * 4)
    assert mla["uptrained"]["val_ppl"] < mla["converted"]["val_ppl"]

    # and recurformer_uptrain: half of all heads, the most recency-aware on calibration rows, become Mamba
    train(tmp_path, data_cache, "recipe=recurformer_uptrain", *TINY_MHA, *PARENT, "init.convert.window=8")
    rf = _metrics(tmp_path, "recurformer_uptrain")
    assert rf["parent"]["val_loss"] == pytest.approx(m["parent"]["val_loss"], abs=1e-6)
    report = json.loads((run_dirs(tmp_path, "recurformer_uptrain")[-1] / "uptrained" / "convert_report.json")
                        .read_text())["recurformer"]  # fmt: skip
    layers = len(report["recency"])
    assert sum(map(len, report["replaced"])) * 2 == layers * 8 and all(len(r) == 8 for r in report["recency"])
    chosen = [r for row, heads in zip(report["recency"], report["replaced"], strict=True) for h, r in enumerate(row)
              if h in heads]  # fmt: skip
    assert min(chosen) >= max(r for row in report["recency"] for r in row if r not in chosen)
    assert rf["converted"]["kv_bytes_per_token"] * 2 == rf["parent"]["kv_bytes_per_token"]
    assert rf["uptrained"]["val_ppl"] < rf["converted"]["val_ppl"]


def test_uptrain_a_checkpoint_parent_counts_its_tokens_and_groups_by_search(tmp_path, data_cache):
    """AsymGQA's search (calibrated on training rows, as method=similarity is) and CEPE's context encoder; the
    other conversions' recipes on a checkpoint parent are the slow test below."""
    train(tmp_path, data_cache, "recipe=pretrain", *TINY_MHA, "trainer.max_steps=20")
    ckpt = run_dirs(tmp_path, "pretrain")[0] / "checkpoints" / "last.ckpt"
    train(tmp_path, data_cache, "recipe=gqa_uptrain", "init.from=checkpoint", f"init.path={ckpt}",
          "uptrain.alpha=0.25", "init.convert.n_kv_heads=4", "init.convert.method=asymgqa",
          "+init.convert.iterations=4")  # fmt: skip
    m = _metrics(tmp_path, "gqa_uptrain")
    assert m["parent"]["tokens_seen"] == 20 * 8 * 64 and m["uptrained"]["steps"] == 5
    assert m["convert"] == {"to": "gqa", "n_kv_heads": 4, "method": "asymgqa", "iterations": 4}
    assert m["uptrained"]["val_ppl"] < m["converted"]["val_ppl"]
    losses = json.loads((run_dirs(tmp_path, "gqa_uptrain")[-1] / "uptrained" / "convert_report.json").read_text())
    assert len(losses["asymgqa_losses"]) == 5

    # CEPE (XC-Cache: a slow test below): a context encoder added to the parent and trained with the decoder
    # frozen, on rows with a context
    _check_context_uptrain(tmp_path, data_cache, ckpt, "cepe_uptrain", "init.convert.context.chunk=16", 128)


@pytest.mark.slow
def test_qcqa_matryoshka_dha_and_sa_uptrain_a_checkpoint_parent(tmp_path, data_cache):
    """QCQA, MatryoshkaKV, DHA and SA through their recipes on one parent (under -m slow for the suite's
    time: their conversions are tested in tests/archs; the default suite runs the checkpoint-parent path above).
    qcqa_uptrain writes its Pareto front beside the uptraining run."""
    train(tmp_path, data_cache, "recipe=pretrain", *TINY_MHA, "trainer.max_steps=20")
    ckpt = run_dirs(tmp_path, "pretrain")[0] / "checkpoints" / "last.ckpt"

    train(tmp_path, data_cache, "recipe=qcqa_uptrain", "init.from=checkpoint", f"init.path={ckpt}",
          "uptrain.alpha=0.25", "init.convert.population=8", "init.convert.generations=4")  # fmt: skip
    q = _metrics(tmp_path, "qcqa_uptrain")
    assert q["converted"]["kv_bytes_per_token"] * 4 <= q["parent"]["kv_bytes_per_token"]  # n_heads / 4 on average
    assert q["uptrained"]["val_ppl"] < q["converted"]["val_ppl"]
    report = json.loads((run_dirs(tmp_path, "qcqa_uptrain")[-1] / "uptrained" / "convert_report.json").read_text())
    chosen = [p for p in report["qcqa_front"] if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kv_heads"] == sum(m["n_kv_heads"] for m in q["model"]["mixers"].values())

    # MatryoshkaKV: PCA-initialised projections, trained through the rank schedule by distillation from the
    # parent, only the projections, validated at rank [2, 4]
    train(tmp_path, data_cache, "recipe=matryoshka_uptrain", "init.from=checkpoint", f"init.path={ckpt}",
          "uptrain.alpha=0.25", "init.convert.rank=[2,4]", "distill=true",
          "optim.trainable=[k_rotation,v_rotation,v_mean]")  # fmt: skip
    mk = _metrics(tmp_path, "matryoshka_uptrain")
    assert mk["model"]["mixers"]["a"]["kv_ranks"] == [2, 4, 6, 8] and mk["model"]["mixers"]["a"]["kv_rank"] == [2, 4]
    assert mk["converted"]["kv_bytes_per_token"] * 16 == mk["parent"]["kv_bytes_per_token"] * 6
    # trained on the KL from the parent (a fraction of a nat; the language-modelling loss is above 4 here)
    assert mk["train_loss"] < 1.0 < 4.0 < mk["uptrained"]["val_loss"]
    parent = torch.load(ckpt, weights_only=False)["state_dict"]
    up = run_dirs(tmp_path, "matryoshka_uptrain")[-1] / "uptrained" / "checkpoints" / "last.ckpt"
    up = torch.load(up, weights_only=False)["state_dict"]
    assert all(torch.equal(up[k], v) for k, v in parent.items())  # only the projections trained

    # DHA: key and value heads clustered apart, per-layer counts by the budget search, fused for 3 steps
    train(tmp_path, data_cache, "recipe=dha_uptrain", "init.from=checkpoint", f"init.path={ckpt}",
          "uptrain.alpha=0.25", "+init.convert.fusion_steps=3", "+init.convert.calibration_rows=4")  # fmt: skip
    dha = _metrics(tmp_path, "dha_uptrain")
    assert dha["convert"]["n_k_heads"] == dha["convert"]["n_v_heads"] == 2  # n_heads / 4 each
    assert dha["converted"]["kv_bytes_per_token"] * 4 == dha["parent"]["kv_bytes_per_token"]
    assert dha["uptrained"]["val_ppl"] < dha["converted"]["val_ppl"]
    report = json.loads((run_dirs(tmp_path, "dha_uptrain")[-1] / "uptrained" / "convert_report.json").read_text())
    mixers = [dha["model"]["mixers"][name] for name in dha["model"]["pattern"]]
    assert report["dha"]["k_heads_per_layer"] == [m["n_kv_heads"] for m in mixers]
    assert report["dha"]["v_heads_per_layer"] == [m["n_v_heads"] for m in mixers]
    assert (
        len(report["dha"]["fusion"]) == 4 and report["dha"]["fusion_tokens"] == 3 * 4 * 63
    )  # 64-token rows: 63 predictions

    # SA: the pair of layers whose attention is most alike, found on calibration rows; the reader keeps values
    train(tmp_path, data_cache, "recipe=sa_uptrain", "init.from=checkpoint", f"init.path={ckpt}",
          "uptrain.alpha=0.25", "init.convert.n_shared=1")  # fmt: skip
    sa = _metrics(tmp_path, "sa_uptrain")
    sources = sa["model"]["attention_source"]
    (reader,) = [i for i, j in enumerate(sources) if j != i]
    report = json.loads((run_dirs(tmp_path, "sa_uptrain")[-1] / "uptrained" / "convert_report.json").read_text())
    assert report["sa"]["spans"] == [[reader - 1, reader]] and len(report["sa"]["similarity"]) == len(sources)
    assert sa["converted"]["kv_bytes_per_token"] * 2 * len(sources) == sa["parent"]["kv_bytes_per_token"] * (
        2 * len(sources) - 1
    )
    assert sa["uptrained"]["val_ppl"] < sa["converted"]["val_ppl"]


def _check_context_uptrain(tmp_path, data_cache, ckpt, recipe: str, extra: str, width: int) -> None:
    """``recipe`` on the parent ``ckpt``, on rows of 32 context tokens + 64 to predict: the continuations are
    scored with and without their context, and only the new modules train."""
    train(tmp_path, data_cache, f"recipe={recipe}", "init.from=checkpoint", f"init.path={ckpt}", "data.context=32",
          "uptrain.steps=6", extra)  # fmt: skip
    r = _metrics(tmp_path, recipe)
    assert r["context_bytes_per_token"] == width * 2  # the encoder's states, bf16
    assert r["kv_bytes_per_token"] == r["parent"]["kv_bytes_per_token"]  # the continuation's cache as it was
    # the context is read (whether it helps after 6 steps is benchmarks/RESULTS.md's question)
    assert math.isfinite(r["val_loss_without_context"]) and r["val_loss"] != r["val_loss_without_context"]
    assert r["uptrained"]["val_loss_without_context"] == r["val_loss_without_context"]
    parent = torch.load(ckpt, weights_only=False)["state_dict"]
    up = run_dirs(tmp_path, recipe)[-1] / "uptrained" / "checkpoints" / "last.ckpt"
    up = torch.load(up, weights_only=False)["state_dict"]
    assert all(torch.equal(up[k], v) for k, v in parent.items())  # the decoder stayed frozen
    assert any("cross" in k for k in set(up) - set(parent))


@pytest.mark.slow
def test_xc_cache_uptrain_trains_the_shared_cross_block_alone(tmp_path, data_cache):
    train(tmp_path, data_cache, "recipe=pretrain", *TINY_MHA, "trainer.max_steps=20")
    ckpt = run_dirs(tmp_path, "pretrain")[0] / "checkpoints" / "last.ckpt"
    _check_context_uptrain(tmp_path, data_cache, ckpt, "xc_cache_uptrain", "init.convert.context.cross_layers=[1]", 64)


# the untied MHA parent under -m slow (the suite's time); the tied GQA one covers the path
@pytest.mark.parametrize("n_kv_heads,tied", [pytest.param(8, False, marks=pytest.mark.slow), (4, True)])
def test_uptrain_an_hf_directory(tmp_path, n_kv_heads, tied):
    transformers = pytest.importorskip("transformers")
    from kvlab.recipes.data import stdlib_files, train_tokenizer

    hf_dir = tmp_path / "hf"
    texts = [p.read_text(errors="replace") for p in stdlib_files()[:40]]
    hf_dir.mkdir()
    train_tokenizer(texts, 512).save(str(hf_dir / "tokenizer.json"))
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=n_kv_heads, head_dim=8, max_position_embeddings=128, tie_word_embeddings=tied,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    train(tmp_path, tmp_path / "cache", "recipe=gqa_uptrain", "init.from=hf", f"init.path={hf_dir}",
          "uptrain.steps=8", "optim.lr=1e-2")  # fmt: skip
    m = _metrics(tmp_path, "gqa_uptrain")
    assert m["parent"]["init"] == {"from": "hf", "path": str(hf_dir), "convert": None}
    assert m["model"]["mixer"]["n_kv_heads"] == 2 and m["model"]["tie_embeddings"] == tied
    assert m["converted"]["kv_bytes_per_token"] * n_kv_heads == m["parent"]["kv_bytes_per_token"] * 2
    assert m["uptrained"]["val_ppl"] < m["converted"]["val_ppl"]


BAD = {
    "several processes": (["trainer=ddp"], "the staged uptraining recipes run in one process"),
    "alpha": (["uptrain.alpha=2"], "uptrain.alpha=2.0 must be in (0, 1]"),
    "hf without a path": (["init.from=hf"], "init.from=hf needs init.path"),
    "lr": (["uptrain.lr=0"], "uptrain.lr=0.0 must be > 0"),
    "resume a path": (["resume=x.ckpt"], "resume='x.ckpt': an uptraining recipe resumes with resume=auto"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uptrain_settings_fail_before_training(tmp_path, data_cache, case):
    """In-process (Hydra's compose API) for speed; one case through train.py checks the exit and the message."""
    overrides, message = BAD[case]
    if case == "several processes":
        proc = train(tmp_path, data_cache, "recipe=gqa_uptrain", *TINY_MHA, *overrides, check=False)
        assert proc.returncode == 1
        assert message in proc.stderr.strip().splitlines()[0], proc.stderr
    else:
        from hydra import compose, initialize_config_dir

        from kvlab.recipes.config import register_configs
        from kvlab.recipes.run import ConfigError
        from kvlab.recipes.uptrain import run_uptrain
        from tests.recipes.test_train import REPO, TINY_MODEL, TINY_RUN

        register_configs()
        common = [*TINY_MODEL, *TINY_RUN, f"output_root={tmp_path}", f"data.cache_dir={data_cache}"]
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[*common, "recipe=gqa_uptrain", *TINY_MHA, *overrides])
        with pytest.raises(ConfigError, match=re.escape(message)):
            run_uptrain(cfg, tmp_path / "run")
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_a_killed_uptraining_resumes_every_stage_exactly_with_resume_auto(tmp_path, data_cache):
    """The main job killed in its uptraining (while writing last.ckpt at step 4 of 6) continues with resume=auto:
    as a sweep's job over its sweep directory, in place (the parent's finished evaluation kept, the uptraining
    resumed in its own directory, its log the uninterrupted run's, row for row); as a plain run, into a new run
    directory from the killed run's newest checkpoint of that stage, with the parent's training, killed too after
    its last checkpoint, resumed from it. Before, the recipes refused resume: a killed uptraining started over."""
    args = ["recipe=gqa_uptrain", *TINY_MHA, "uptrain.parent_steps=10", "uptrain.steps=6", "seed=7",
            "trainer.ckpt_every_n_steps=2", "trainer.log_every_n_steps=1"]  # fmt: skip
    train(tmp_path, data_cache, *args, "run_name=whole")
    (whole,) = run_dirs(tmp_path, "whole")
    expected = json.loads((whole / "metrics.json").read_text())
    killer = [str(Path(__file__).parent / "killed_train.py"), "4"]

    def same_as_whole(run: Path) -> None:
        m = json.loads((run / "metrics.json").read_text())
        for stage in ("parent", "converted", "uptrained"):
            assert m[stage]["val_loss"] == pytest.approx(expected[stage]["val_loss"], rel=1e-6), stage
        assert m["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
        assert m["uptrained"]["steps"] == 6 and m["resumed_from"]["step"] == 4

    sweep = tmp_path / "sweep"
    jobs = ["-m", *args, f"hydra.sweep.dir={sweep}"]
    assert train(tmp_path, data_cache, *jobs, entry=killer, check=False).returncode == -signal.SIGKILL
    proc = train(tmp_path, data_cache, *jobs, "resume=auto")
    assert f"this sweep job finished before in {sweep / '0-mha' / 'parent'}" in proc.stdout
    same_as_whole(sweep / "0-mha")
    want, got = log_rows(whole / "uptrained"), log_rows(sweep / "0-mha" / "uptrained")
    assert [(r["step"], r["train/batches"]) for r in got] == [(r["step"], r["train/batches"]) for r in want]
    for name in ("train_loss", "val_loss"):
        assert [float(r[name] or "nan") for r in got] == pytest.approx([float(r[name] or "nan") for r in want],
                                                                        rel=1e-6, nan_ok=True), name  # fmt: skip

    assert train(tmp_path, data_cache, *args, entry=killer, check=False).returncode == -signal.SIGKILL
    (killed,) = run_dirs(tmp_path, "gqa_uptrain")
    (parent_dir,) = [
        p for p in data_cache.glob("parents/*") if (p / "DONE").is_file() and '"seed": 7' in (p / "DONE").read_text()
    ]
    # a checkpoint of another conversion (the same model, other weights) is not continued
    proc = train(tmp_path, data_cache, *args, "init.convert.method=first", "resume=auto", check=False)
    assert proc.returncode == 1 and "init.convert.method: 'first' vs 'mean'" in proc.stderr, proc.stderr[-2000:]
    (parent_dir / "DONE").unlink()  # as if the parent was killed after its last checkpoint too
    (parent_dir / "metrics.json").unlink()
    proc = train(tmp_path, data_cache, *args, "resume=auto")
    assert f"continuing {killed / 'uptrained' / 'checkpoints' / 'step000004.ckpt'}" in proc.stdout
    (resumed,) = [d for d in run_dirs(tmp_path, "gqa_uptrain") if (d / "metrics.json").is_file()]
    same_as_whole(resumed)
    assert json.loads((parent_dir / "metrics.json").read_text())["resumed_from"]["step"] == 10
    assert (parent_dir / "DONE").exists() and "reusing the parent" not in proc.stdout + proc.stderr
    losses = train_losses(resumed / "uptrained")
    assert sorted(losses) == [4, 5]
    assert [losses[s] for s in (4, 5)] == pytest.approx([train_losses(whole / "uptrained")[s] for s in (4, 5)], 1e-6)


def test_a_corpus_edited_in_place_is_another_parent(tmp_path):
    """The cached parent's key holds the corpus's fingerprint (its files' sizes and times), not only the data
    settings: text changed under the same paths trains a new parent instead of reusing one of the old text."""
    from hydra import compose, initialize_config_dir

    from kvlab.recipes.config import register_configs
    from kvlab.recipes.run import training_identity
    from tests.recipes.test_train import REPO

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the old text\n")
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["data=text", f"data.paths=[{corpus}]"])
    before = training_identity(cfg)
    assert training_identity(cfg) == before
    corpus.write_text("the new text, longer\n")
    assert training_identity(cfg)["corpus"] != before["corpus"]


def test_default_head_counts_come_from_attention_layers_with_one_head_layout():
    """GQA's default n_kv_heads (n_heads / 4) is read from the parent's one attention mixer, or from a pattern of
    attention mixers that share their heads (Gemma 2 and 3's windowed and full layers); other parents name it."""
    from kvlab.recipes.uptrain import _resolve_convert

    full = {"kind": "attention", "n_heads": 8, "n_kv_heads": 8}
    gemma = {"mixer": None, "pattern": "LG", "mixers": {"L": {**full, "window": 5}, "G": full}}
    assert _resolve_convert({"to": "gqa"}, {"mixer": full})["n_kv_heads"] == 2
    assert _resolve_convert({"to": "gqa"}, gemma)["n_kv_heads"] == 2
    assert _resolve_convert([{"to": "gqa"}, {"to": "cla"}], gemma)[0]["n_kv_heads"] == 2
    uneven = {**gemma, "mixers": {"L": {**full, "n_kv_heads": 4}, "G": full}}
    hybrid = {**gemma, "mixers": {"L": {"kind": "mamba2"}, "G": full}}
    for parent in (uneven, hybrid):
        with pytest.raises(ValueError, match="not attention with one number of heads; give n_kv_heads"):
            _resolve_convert({"to": "gqa"}, parent)
    with pytest.raises(ValueError, match=r"init.convert.to=gqa: the parent has no attention layers \(its mixers: "
                                         r"mamba\)"):  # fmt: skip
        _resolve_convert({"to": "gqa"}, {"mixer": {"kind": "mamba"}})  # (an imported Mamba)
