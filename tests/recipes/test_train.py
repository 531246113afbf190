"""train.py end to end, as a user runs it: a subprocess per command."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

# A tiny model and data so a run takes seconds; the tokenizer and packed data
# are cached once per test session in a shared directory.
TINY_MODEL = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.mixer.n_heads=4",
    "model.mixer.n_kv_heads=2",
    "model.mixer.head_dim=16",
    "model.mlp.hidden=128",
    "model.vocab_size=512",
    "model.max_seq_len=128",
]
TINY_RUN = [
    "data.seq_len=64",
    "data.max_docs=60",
    "trainer.limit_val_batches=4",
    "trainer.log_every_n_steps=5",
    "trainer.progress_bar=false",
]


def train(tmp_path: Path, data_cache: Path, *overrides: str, tiny_model=True, check=True, wait=True, entry=None):
    """Run train.py (or ``entry``, a command line standing for it) with the tiny settings and ``overrides``."""
    flags = [o for o in overrides if o.startswith("-")]  # argparse wants flags before the overrides
    entry = entry or [str(REPO / "train.py")]
    args = [sys.executable, *entry, *flags, *(TINY_MODEL if tiny_model else []), *TINY_RUN]
    args += [f"output_root={tmp_path / 'outputs'}", f"data.cache_dir={data_cache}"]
    args += [o for o in overrides if not o.startswith("-")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def hf_dir_by_hand(ckpt: Path, model: dict, tokenizer: Path, out: Path) -> Path:
    """A Llama-style HF directory holding a kvlab checkpoint's weights, written without kvlab's exporter."""
    from safetensors.torch import save_file

    from kvlab.archs.hf import kvlab_to_hf_name

    out.mkdir()
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    save_file({kvlab_to_hf_name(k.removeprefix("model.")): v.contiguous() for k, v in state.items()},
              out / "model.safetensors")  # fmt: skip
    m = model
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": m["vocab_size"], "hidden_size": m["d_model"],
        "num_hidden_layers": m["n_layers"], "intermediate_size": m["mlp"]["hidden"],
        "num_attention_heads": m["mixer"]["n_heads"], "num_key_value_heads": m["mixer"]["n_kv_heads"],
        "head_dim": m["mixer"]["head_dim"], "max_position_embeddings": m["max_seq_len"],
        "rms_norm_eps": 1e-5}))  # fmt: skip
    (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return out


def run_dirs(tmp_path: Path, run_name: str) -> list[Path]:
    return sorted(p for p in (tmp_path / "outputs" / run_name).iterdir() if p.is_dir())


METRIC_KEYS = ["val_loss", "val_ppl", "train_loss", "tokens_seen", "tokens_per_s", "params", "kv_bytes_per_token",
               "kv_fixed_bytes", "val_accuracy", "val_ppl_ar_hit", "val_ppl_ar_other"]  # fmt: skip


def test_pretrain_writes_checkpoints_and_metrics_and_learns(tmp_path, data_cache):
    proc = train(tmp_path, data_cache, "recipe=pretrain", "trainer.max_steps=30", "trainer.ckpt_every_n_steps=10",
                 "trainer.progress_bar=true")  # fmt: skip
    (run,) = run_dirs(tmp_path, "pretrain")
    metrics = json.loads((run / "metrics.json").read_text())
    # Output to a pipe, as to a log file: progress as lines (steps 5, 10, ... with log_every_n_steps=5), no
    # carriage-return bars, no library tips or deprecation notices, and the final metrics as a table
    out = proc.stdout + proc.stderr
    assert "step 5/30 (16%): train_loss " in out and "step 30/30 (100%)" in out and "\r" not in out
    assert "Tip:" not in out and "deprecated" not in out and "Warning" not in out, out
    assert re.search(r"metrics:\n  initial_val_loss +\d\.\d{4}\n", out)
    for key in METRIC_KEYS:
        assert math.isfinite(metrics[key]), key
    assert metrics["val_loss"] < metrics["initial_val_loss"]
    assert metrics["tokens_seen"] == 30 * 8 * 64
    assert metrics["kv_bytes_per_token"] == 2 * (2 * 2 * 16) * 2  # layers x (K+V x heads x dim) x bf16
    assert metrics["model"]["mixer"]["n_kv_heads"] == 2
    ckpts = run / "checkpoints"
    assert {"last.ckpt", "config.yaml", "step000030.ckpt"} <= {p.name for p in ckpts.iterdir()}
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 30
    assert "val_loss" in (run / "logs" / "metrics.csv").read_text()


def train_losses(run: Path) -> dict[int, float]:
    """Step -> training loss, from a run's CSV log (the loss of the batch trained at that step)."""
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]}


def log_rows(run: Path) -> list[dict]:
    """A run's CSV log, without ThroughputMonitor's validation rows (counted per validation)."""
    with open(run / "logs" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if not any(k.startswith("validate/") and v for k, v in r.items())]


# Two documents: 3 batches an epoch, so 30 steps cross 9 epoch boundaries and step 10 is mid-epoch.
RESUMABLE = ["data.max_docs=2", "trainer.max_steps=30", "trainer.ckpt_every_n_steps=5", "trainer.log_every_n_steps=1",
             "optim.warmup_steps=2"]  # fmt: skip


def test_a_run_killed_while_writing_a_checkpoint_resumes_exactly_where_it_stopped(
    tmp_path, data_cache, monkeypatch, caplog
):
    train(tmp_path, data_cache, "run_name=whole", *RESUMABLE)
    (whole,) = run_dirs(tmp_path, "whole")

    # SIGKILL half-way through writing last.ckpt at step 10 (after step000010.ckpt was written), with TMPDIR on
    # another filesystem where there is one: the case where a temporary there was copied, not renamed
    if Path("/dev/shm").is_dir():
        monkeypatch.setenv("TMPDIR", "/dev/shm")
    killer = [str(Path(__file__).parent / "killed_train.py"), "10"]
    proc = train(tmp_path, data_cache, *RESUMABLE, entry=killer, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (killed,) = run_dirs(tmp_path, "train")
    ckpts = killed / "checkpoints"
    assert not (killed / "metrics.json").exists()
    # the write went to a temporary beside it: the previous last.ckpt is intact, and the half file is kvlab's
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 5
    (orphan,) = ckpts.glob(".last.ckpt.kvlab-tmp-*")
    assert orphan.stat().st_size > 0
    # As a copy across filesystems used to leave it: an empty last.ckpt, the newest file there.
    (ckpts / "last.ckpt").write_bytes(b"")
    monkeypatch.delenv("TMPDIR", raising=False)

    proc = train(tmp_path, data_cache, *RESUMABLE, "resume=auto")
    assert f"skipping {ckpts / 'last.ckpt'}" in proc.stdout  # said why it fell back
    (resumed,) = [d for d in run_dirs(tmp_path, "train") if d != killed]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["resumed_from"] == {"checkpoint": str(ckpts / "step000010.ckpt"), "step": 10}
    assert metrics["steps"] == 30  # and the killed run's first validation, from the checkpoint:
    assert metrics["initial_val_loss"] == json.loads((whole / "metrics.json").read_text())["initial_val_loss"]
    assert not orphan.exists()  # its writer is dead: cleaned
    # the same batches in the same order, loss for loss, across the epoch boundaries after the kill
    expected, got = train_losses(whole), train_losses(resumed)
    assert sorted(got) == list(range(10, 30))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step
    assert metrics["val_loss"] == pytest.approx(json.loads((whole / "metrics.json").read_text())["val_loss"], 1e-6)

    # Resuming it as another model is refused, each differing field named.
    from kvlab.recipes.run import ConfigError

    other = [f"resume={ckpts / 'step000010.ckpt'}", "model.mixer.window=32", "model.mixer.rope_theta=500000"]
    with pytest.raises(ConfigError, match=r"model.mixer.rope_theta: 500000 vs 10000.0.*model.mixer.window: 32 vs None"):
        _run_in_process(tmp_path, data_cache, [*RESUMABLE, *other], tmp_path / "other")
    # So is another batch size: the checkpoint's place in the data would mean other rows. (Another max_steps is
    # said first: the schedule that comes back with the checkpoint keeps its own length.)
    smaller = [f"resume={ckpts / 'step000010.ckpt'}", "data.batch_size=4", "trainer.max_steps=60"]
    with pytest.raises(ConfigError, match="trained with data.batch_size=8, this run has 4"):
        _run_in_process(tmp_path, data_cache, [*RESUMABLE, *smaller], tmp_path / "smaller")
    assert "trainer.max_steps=60, the checkpoint's run planned 30" in caplog.text
    # And so are other rows: another row length (32 tokens instead of the tests' 64).
    shorter = [f"resume={ckpts / 'step000010.ckpt'}", "data.seq_len=32"]
    with pytest.raises(ConfigError, match=r"trained on other rows \(data.seq_len: 32 vs 64: this run vs the check"):
        _run_in_process(tmp_path, data_cache, [*RESUMABLE, *shorter], tmp_path / "shorter")


def test_a_run_killed_at_an_epochs_last_batch_under_gradient_accumulation_resumes_exactly(tmp_path, data_cache):
    """Two documents in 7 batches of 4 rows an epoch, 2 batches a step: an epoch is 3 steps and a step of its
    last batch alone, so the checkpoint at step 4 falls on epoch 0's last batch. Lightning's checkpoint put that
    save off to the next batch, the first of the next step's two, whose gradient no checkpoint holds (the
    resumed run left it out of its step); and a checkpoint at an epoch's last batch skipped the whole next epoch
    on resume (the loader's place in the finished epoch was applied to the next)."""
    run = ["data.max_docs=2", "data.batch_size=4", "trainer.accumulate_grad_batches=2", "trainer.max_steps=8",
           "trainer.ckpt_every_n_steps=4", "trainer.log_every_n_steps=1", "optim.warmup_steps=2"]  # fmt: skip
    train(tmp_path, data_cache, "run_name=whole", *run)
    (whole,) = run_dirs(tmp_path, "whole")
    killer = [str(Path(__file__).parent / "killed_train.py"), "4"]
    proc = train(tmp_path, data_cache, *run, entry=killer, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (killed,) = run_dirs(tmp_path, "train")
    saved = torch.load(killed / "checkpoints" / "step000004.ckpt", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["ready"] == 7  # the epoch's last
    train(tmp_path, data_cache, *run, "resume=auto")
    (resumed,) = [d for d in run_dirs(tmp_path, "train") if d != killed]
    expected, got = train_losses(whole), train_losses(resumed)
    assert sorted(got) == list(range(4, 8))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


def test_a_killed_sweep_continues_with_resume_auto_keeping_finished_jobs_and_resuming_the_killed_one_in_place(
    tmp_path, data_cache
):
    """A sweep of two jobs killed in its second (while writing last.ckpt at step 10), run again over its directory
    with resume=auto: the finished job is kept as it is, the killed one continues its checkpoint in its own
    directory. Killed again in the validation after step 20 (a checkpoint's step too), and in the validation after
    training, and continued, its losses are the uninterrupted run's, its CSV log that run's, every row of it (the
    killed runs' rows kept), and its metrics.json's losses that run's."""
    sweep = tmp_path / "sweep"
    validating = ["trainer.val_check_interval=4", "trainer.limit_val_batches=1"]
    jobs = ["-m", *[o for o in RESUMABLE if not o.startswith("trainer.max_steps")], "trainer.max_steps=8,30",
            *validating, f"hydra.sweep.dir={sweep}"]  # fmt: skip
    killer = [str(Path(__file__).parent / "killed_train.py"), "10"]
    assert train(tmp_path, data_cache, *jobs, entry=killer, check=False).returncode == -signal.SIGKILL
    finished = (sweep / "0-gqa" / "metrics.json").read_text()
    assert not (sweep / "1-gqa" / "metrics.json").exists()
    killer = [str(Path(__file__).parent / "killed_train.py"), "validating:20"]
    proc = train(tmp_path, data_cache, *jobs, "resume=auto", entry=killer, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert f"this sweep job finished before in {sweep / '0-gqa'}" in proc.stdout
    assert (sweep / "0-gqa" / "metrics.json").read_text() == finished
    # the checkpoint of step 20 waited for its validation, which the kill stopped
    assert max(p.name for p in (sweep / "1-gqa/checkpoints").glob("step*")) == "step000015.ckpt"
    killer = [str(Path(__file__).parent / "killed_train.py"), "evaluating:30"]
    proc = train(tmp_path, data_cache, *jobs, "resume=auto", entry=killer, check=False)
    assert proc.returncode == -signal.SIGKILL
    proc = train(tmp_path, data_cache, *jobs, "resume=auto")
    resumed = json.loads((sweep / "1-gqa" / "metrics.json").read_text())
    assert resumed["resumed_from"]["step"] == 30 and resumed["tokens_per_s"] is None  # it trained no step

    train(tmp_path, data_cache, *RESUMABLE, *validating, "run_name=whole")
    (whole,) = run_dirs(tmp_path, "whole")
    uninterrupted = json.loads((whole / "metrics.json").read_text())
    for name in ("val_loss", "train_loss", "initial_val_loss"):  # the last two: from the checkpoint
        assert resumed[name] == pytest.approx(uninterrupted[name], rel=1e-6), name
    # The log: the killed runs' rows before steps 10 and 15 and the resumed runs' after (Lightning's logger deleted
    # the killed run's). Lightning wrote a step's row after its checkpoint (the kill at 10 took step 9's) and skipped
    # the validation of the checkpoint's step on resuming (the kill at 20 took its row, the run never made it again).
    expected, got = log_rows(whole), log_rows(sweep / "1-gqa")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert {int(r["step"]) for r in got if r["train_loss"]} == set(range(30))
    for want, row in zip(expected, got, strict=True):
        assert [row[n] for n in ("epoch", "train/batches", "train/samples")] == [
            want[n] for n in ("epoch", "train/batches", "train/samples")]  # fmt: skip
        for name in ("train_loss", "val_loss", "lr"):
            assert bool(row[name]) == bool(want[name]), (name, row)
            if want[name]:
                assert float(row[name]) == pytest.approx(float(want[name]), rel=1e-6, abs=1e-6), (name, row)

    # Continued with other overrides, a job's directory holds another job's run: refused, naming the difference.
    other = [o.replace("8,30", "8,40") for o in jobs]
    proc = train(tmp_path, data_cache, *other, "resume=auto", check=False)
    assert proc.returncode == 1
    assert f"{sweep / '1-gqa'} holds a run of other settings (trainer.max_steps: 40 vs 30" in proc.stderr


def test_a_continued_log_keeps_the_rows_before_the_checkpoint_by_training_step(tmp_path):
    """ThroughputMonitor's validation rows count validation batches in their step: they go with their
    validation's results row (the first continued log cut at one whose count reached the checkpoint's step, and
    lost the rows after it), and those of a validation with no results row (killed) are left to the resumed run."""
    from kvlab.recipes.run import RunCSVLogger

    log = tmp_path / "logs" / "metrics.csv"
    log.parent.mkdir()
    log.write_text(
        "epoch,step,train_loss,val_loss,validate/batches\n"
        ",1,,,1\n0,0,,6.0,\n"  # the first validation
        "0,0,5.9,,\n0,1,5.8,,\n0,2,5.7,,\n"
        ",7,,,7\n,8,,,8\n0,2,,5.5,\n"  # the validation after step 3: its batches counted 7 and 8
        "0,3,5.6,,\n0,4,5.5,,\n"  # the checkpoint of step 5 (these rows' steps count from 0)
        "0,5,5.4,,\n,9,,,9\n0,6,,5.3,\n0,6,5.3,,\n"  # after it: logged again by the resumed run
        ",10,,,10\n"  # a validation the kill stopped
    )
    logger = RunCSVLogger(tmp_path, continues_at=5)
    logger.log_metrics({"train_loss": 5.4}, step=5)
    logger.save()
    with open(log) as f:
        rows = [(r["step"], r["train_loss"], r["val_loss"], r["validate/batches"]) for r in csv.DictReader(f)]
    assert rows == [("1", "", "", "1"), ("0", "", "6.0", ""), ("0", "5.9", "", ""), ("1", "5.8", "", ""),
                    ("2", "5.7", "", ""), ("7", "", "", "7"), ("8", "", "", "8"), ("2", "", "5.5", ""),
                    ("3", "5.6", "", ""), ("4", "5.5", "", ""), ("5", "5.4", "", "")]  # fmt: skip


def test_multirun_sweeps_presets(tmp_path, data_cache):
    train(tmp_path, data_cache, "-m", "model=mqa,mla", "trainer.max_steps=3", "model.vocab_size=512",
          "trainer.limit_val_batches=1", tiny_model=False)  # fmt: skip
    (sweep,) = run_dirs(tmp_path, "train")
    metrics = {d.name: json.loads((d / "metrics.json").read_text()) for d in sweep.iterdir() if d.is_dir()}
    assert sorted(metrics) == ["0-mqa", "1-mla"]
    per_token = [metrics[n]["kv_bytes_per_token"] for n in ["0-mqa", "1-mla"]]
    assert per_token == [6 * 2 * 1 * 32 * 2, 6 * (128 + 16) * 2]  # MQA: one K/V head of 32; MLA: latent + RoPE key


LEARNING_PRESETS = [
    "retnet",
    "mamba2",
    "rwkv6",
    "rwkv7",
    "gau",
    "jamba",
    "jamba_m2",
    "samba",
    "samba_m2",
    "hymba",
    "parallel_heads",
    "rwkv6_shared_mla",
    "yoco_gret",
    "recurformer",
    "mixcon",
]


@pytest.mark.parametrize(
    "names",
    [
        # one of each family by default: retention, the delta rule, Hymba's parallel heads over Mamba (jamba's
        # Mamba + MoE under -m slow for the suite's time: MoE trains by default in the DDP and DeepSpeed tests)
        ["retnet", "rwkv7", "hymba"],
        pytest.param(
            [n for n in LEARNING_PRESETS if n not in ("retnet", "rwkv7", "hymba")],
            marks=pytest.mark.slow,
            id="the-rest",
        ),  # fmt: skip
    ],
    ids=["one-per-family", "the-rest"],
)
def test_recurrent_and_hybrid_presets_learn(tmp_path, data_cache, names):
    train(tmp_path, data_cache, "-m", f"model={','.join(names)}", "trainer.max_steps=12", "model.vocab_size=512",
          "optim.warmup_steps=2", "trainer.limit_val_batches=2", tiny_model=False)  # fmt: skip
    (sweep,) = run_dirs(tmp_path, "train")
    for run in sorted(d for d in sweep.iterdir() if d.is_dir()):
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["val_loss"] < metrics["initial_val_loss"] - 0.5, run.name
        # MoE layers (jamba, mixcon) train with their load-balancing loss, reported apart
        moe = run.name.endswith(("-jamba", "-mixcon"))
        assert ("train_aux_loss" in metrics) == moe, run.name
        if moe:
            assert 0 < metrics["train_aux_loss"] < metrics["train_loss"]
        recurrent_only = run.name.split("-", 1)[1] in ("retnet", "mamba2", "rwkv6", "rwkv7", "gau", "samba", "samba_m2")
        assert (metrics["kv_bytes_per_token"] == 0) == recurrent_only, run.name


def test_block_transformer_trains_through_train_py(tmp_path, data_cache):
    """The Block Transformer through the ordinary recipe: it learns, and its footprint is per block."""
    train(tmp_path, data_cache, "model=block_transformer", "model.blocks.token_layers=1", "trainer.max_steps=12",
          "optim.warmup_steps=2")  # fmt: skip
    (run,) = run_dirs(tmp_path, "train")
    m = json.loads((run / "metrics.json").read_text())
    assert m["val_loss"] < m["initial_val_loss"] - 0.5 and m["model"]["blocks"]["length"] == 4
    per_block = 2 * 2 * 2 * 16 * 2  # 2 block-decoder layers x (K, V) x 2 K/V heads x 16 channels, bf16
    token_block = 5 * 2 * 2 * 16 * 2  # 1 token-decoder layer, prefix 2 + 4 - 1 positions
    assert m["kv_bytes_per_token"] == per_block // 4 and m["kv_fixed_bytes"] == per_block + token_block


BAD_OVERRIDES = {
    "indivisible heads": (["model.mixer.n_kv_heads=3"], "mixer.n_heads=4 is not divisible by mixer.n_kv_heads=3"),
    "unknown trainer key": (["trainer.max_step=3"], "trainer.max_step"),
    "unknown model key": (["+model.mixer.n_kv_head=1"], "mixer.n_kv_head: unknown key"),
    "missing data": (["data=text", "data.paths=[/nonexistent/corpus/*.txt]"], "/nonexistent/corpus/*.txt"),
    "sequence too long": (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=128"),
    "missing checkpoint": (["resume=/nonexistent.ckpt"], "resume='/nonexistent.ckpt'"),
    "unknown strategy": (["trainer.strategy=dpp"], "trainer.strategy='dpp'"),
    "wrong type": (["trainer.max_steps=many"], "trainer.max_steps"),
    "init source": (["init.from=web"], "init.from='web' is not one of scratch, checkpoint, hf"),
    "init path": (["init.from=hf", "init.path=/nonexistent/model"], "init.path='/nonexistent/model'"),
    "convert from scratch": (["init.convert={to: gqa}"], "init.convert needs init.from=checkpoint or hf"),
    "distill from scratch": (["distill=true"], "distill=true distils the initial model into its conversion: it needs"),
    "nothing trainable": (["optim.trainable=[rotation]"], "optim.trainable=['rotation'] matches no parameter"),
    "ckpt outside export": (
        ["ckpt=/some.ckpt"],
        "ckpt='/some.ckpt' is the shorthand of recipe=eval, export and lm_eval",
    ),
    "warmup longer than the run": (
        ["optim.warmup_steps=50", "trainer.max_steps=10"],
        "optim.warmup_steps=50 exceeds trainer.max_steps=10",
    ),  # fmt: skip
    "negative clip": (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1.0 must be > 0"),
    "nan learning rate": (["optim.lr=nan"], "optim.lr=nan must be a finite number"),
    "inf in the model": (["model.mixer.rope_theta=inf"], "model.mixer.rope_theta=inf must be a finite number"),
    "window beyond max_seq_len": (["model.mixer.window=512"], "window=512 exceeds max_seq_len=128"),
    "one beta": (["optim.betas=[0.9]"], "optim.betas=[0.9] must be two numbers in [0, 1)"),
    "precision": (["trainer.precision=fp8"], "trainer.precision='fp8' is not one of 32-true"),
    "no devices": (["trainer.devices=0"], "trainer.devices=0 must be a count >= 1"),
    "accelerator": (["trainer.accelerator=tpuu"], "trainer.accelerator='tpuu' is not one of cpu"),
    "no validation": (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0 must be >= 1"),
    "export dtype": (["export.dtype=int8"], "export.dtype='int8' is not one of bf16, fp16, fp32"),
    "passkey trials": (["eval.passkey_trials=0"], "eval.passkey_trials=0 must be >= 1"),
    "negative workers": (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    "no documents": (["data.max_docs=0"], "data.max_docs=0 must be >= 1"),
    "mixer kind of the wrong type": (["model.mixer.kind=[attention]"], "mixer.kind=['attention'] is not a known"),
    "blocks over packed documents": (["+model.blocks={length: 4}", "data.doc_mask=true"], "data.doc_mask=true packs"),
    "meta tokens over packed documents": (
        ["+model.meta_tokens=4", "data.doc_mask=true"],
        "model.meta_tokens=4 go before a row's first token only",
    ),  # fmt: skip
    "sinks over packed documents": (  # the first training step failed, deep in the attention's masks
        ["+model.mixer.window=8", "+model.mixer.sinks=2", "data.doc_mask=true"],
        "layer 0's sinks=2 are a row's first positions, which a packed document does not start at",
    ),  # fmt: skip
    "corpus smaller than a batch": (
        ["data.max_docs=2", "data.batch_size=64"],
        "fewer than one batch (data.batch_size=64)",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_overrides_fail_before_training(tmp_path, data_cache, case):
    """In-process (Hydra's compose API) for speed; the subprocess test below checks the exit."""
    from hydra import compose, initialize_config_dir

    from kvlab.recipes.config import register_configs
    from kvlab.recipes.run import ConfigError, run

    overrides, message = BAD_OVERRIDES[case]
    register_configs()
    common = [*TINY_MODEL, *TINY_RUN, f"output_root={tmp_path}", f"data.cache_dir={data_cache}"]
    with pytest.raises(Exception) as excinfo:
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[*common, *overrides])
        run(cfg, tmp_path / "run")
    assert message in str(excinfo.value)
    if not isinstance(excinfo.value, ConfigError):  # Hydra's own errors come from composing
        assert type(excinfo.value).__module__.split(".")[0] in ("hydra", "omegaconf")
    assert not list(tmp_path.glob("**/*.ckpt"))


def _run_in_process(tmp_path, data_cache, overrides, run_dir):
    """run() on a config composed from the tiny settings and ``overrides``, as train.py would."""
    from hydra import compose, initialize_config_dir

    from kvlab.recipes.config import register_configs
    from kvlab.recipes.run import run

    register_configs()
    common = [*TINY_MODEL, *TINY_RUN, f"output_root={tmp_path}", f"data.cache_dir={data_cache}"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*common, *overrides])
    return run(cfg, run_dir)


def test_garbage_checkpoints_are_named_not_tracebacks(tmp_path, data_cache):
    from kvlab.recipes.run import ConfigError

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match=f"resume='{garbage}': does not load as a checkpoint"):
        _run_in_process(tmp_path, data_cache, [f"resume={garbage}"], tmp_path / "a")
    with pytest.raises(ConfigError, match=f"init: {garbage}: does not load as a checkpoint"):
        _run_in_process(tmp_path, data_cache, ["init.from=checkpoint", f"init.path={garbage}"], tmp_path / "b")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError, match="not a kvlab training checkpoint"):
        _run_in_process(tmp_path, data_cache, [f"resume={foreign}"], tmp_path / "c")


def test_a_run_directory_holding_another_run_is_refused(tmp_path, data_cache):
    from kvlab.recipes.run import LOCK_FILE, ConfigError

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds another run's checkpoints or metrics"):
        _run_in_process(tmp_path, data_cache, ["trainer.max_steps=1"], finished)
    assert (finished / "metrics.json").read_text() == "{}"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / LOCK_FILE).write_text(f"{os.getppid()}\n")  # a live process that is not this one
    with pytest.raises(ConfigError, match=f"in use by another kvlab run .process {os.getppid()}"):
        _run_in_process(tmp_path, data_cache, ["trainer.max_steps=1"], busy)


def test_a_renamed_preset_is_named_with_its_new_name(tmp_path):
    """model=goldfinch (renamed rwkv6_shared_mla) ends with one line giving the new name, unless a config
    directory of the user's own has a goldfinch.yaml, which is then theirs to use."""
    from kvlab.recipes.config import choice_problem

    shipped = REPO / "configs"
    problem = choice_problem(["model=gqa,goldfinch", "trainer.max_steps=3"], shipped)
    assert problem.startswith("model=goldfinch: the preset was renamed rwkv6_shared_mla on 2026-12-06")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "goldfinch.yaml").write_text("d_model: 64\n")
    assert choice_problem(["-cd", str(tmp_path), "model=goldfinch"], shipped) is None
    assert choice_problem(["model=rwkv6_shared_mla"], shipped) is None


def test_broken_or_empty_user_config_files_are_named(tmp_path, data_cache):
    """train.py checks the YAML files its command line picks before Hydra composes (which would show a
    traceback); an empty model file composes to nothing, which run() names."""
    from omegaconf import OmegaConf

    from kvlab.recipes.config import choice_problem
    from kvlab.recipes.run import ConfigError

    user = tmp_path / "my_configs"
    (user / "model").mkdir(parents=True)
    (user / "model" / "broken.yaml").write_text("d_model: 64\nmixer: {kind: attention, n_heads: 4\nn_layers: 2\n")
    shipped = REPO / "configs"
    problem = choice_problem([f"--config-dir={user}", "model=gqa,broken", "trainer.max_steps=3"], shipped)
    assert problem.startswith(f"{user / 'model' / 'broken.yaml'}, line 3: not valid YAML")
    assert choice_problem(["-cd", str(user), "model=gqa"], shipped) is None  # only the files it picks
    from hydra import compose, initialize_config_dir

    from kvlab.recipes.config import register_configs
    from kvlab.recipes.run import run

    register_configs()
    with initialize_config_dir(config_dir=str(shipped), version_base="1.3"):
        cfg = compose("train", overrides=[f"output_root={tmp_path}"])
    cfg.model = OmegaConf.create({})
    with pytest.raises(ConfigError, match="model: the model config is empty"):
        run(cfg, tmp_path / "run")


def test_an_interrupted_deepspeed_checkpoint_is_not_resumed(tmp_path):
    from kvlab.recipes.run import _checkpoint_problem

    shards = tmp_path / "last.ckpt" / "checkpoint"
    shards.mkdir(parents=True)
    torch.save({"global_step": 3, "loops": {}, "hyper_parameters": {}}, shards / "mp_rank_00_model_states.pt")
    assert "no 'latest' file" in _checkpoint_problem(tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt" / "latest").write_text("checkpoint")
    assert _checkpoint_problem(tmp_path / "last.ckpt") is None


@pytest.mark.parametrize("case", ["indivisible heads", "unknown trainer key"])
def test_bad_override_exits_with_the_error_first(tmp_path, data_cache, case):
    overrides, message = BAD_OVERRIDES[case]
    proc = train(tmp_path, data_cache, *overrides, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr.strip().splitlines()[0], proc.stderr
    assert not list((tmp_path / "outputs").glob("**/*.ckpt"))


def test_a_diverging_run_stops_with_its_checkpoints_finite(tmp_path, data_cache):
    """At a rate that overflows, the run stops at the first step whose loss or gradients are not finite, before
    applying it: one line says where and which checkpoint holds the last finite weights, metrics.json records it,
    and no checkpoint holds nan (before, the run trained on to its last step and saved nan over them). Those
    weights then train on at a lower rate as the line says."""
    proc = train(tmp_path, data_cache, "optim.lr=1000", "optim.warmup_steps=0", "trainer.max_steps=20",
                 "trainer.ckpt_every_n_steps=2", check=False)  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]  # the last: Lightning's lines about devices come before
    assert re.match(r"kvlab: error: training diverged: at step (\d+) the (training loss|gradients) ", last), last
    (run,) = run_dirs(tmp_path, "train")
    metrics = json.loads((run / "metrics.json").read_text())
    step = metrics["diverged"]["step"]
    assert f"at step {step} " in last and metrics["steps"] == step - 1 < 19 and metrics["val_loss"] is None
    saved = sorted((run / "checkpoints").glob("*.ckpt"))
    held = run / "checkpoints" / "last.ckpt"
    assert saved and f"{held} holds the weights of step {(step - 1) // 2 * 2}" in last
    for path in saved:
        weights = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()), path.name
    # a resumed run would continue the checkpoint's optimizer and schedule, lr 1000 included: another rate is
    # refused, naming the way that applies it (the weights from a fresh optimizer), which trains on
    proc = train(tmp_path, data_cache, "resume=auto", "optim.lr=1e-3", "trainer.max_steps=20", check=False)
    assert proc.returncode == 1 and "optim.lr: 0.001 vs 1000.0" in proc.stderr.strip().splitlines()[-1]
    train(tmp_path, data_cache, "run_name=again", "init.from=checkpoint", f"init.path={held}", "optim.lr=1e-3",
          "trainer.max_steps=2")  # fmt: skip
    (again,) = run_dirs(tmp_path, "again")
    assert math.isfinite(json.loads((again / "metrics.json").read_text())["val_loss"])


# MoE MLPs, top-1 of 8 experts: some experts get no tokens on a rank (the distributed tests train them)
MOE_MLP = ["model.mlp.kind=moe", "++model.mlp.n_experts=8", "++model.mlp.top_k=1", "model.mlp.hidden=32"]


def test_ddp_on_two_cpu_processes(tmp_path, data_cache):
    # with MoE MLPs, top-1 of 8 experts: an expert that gets no tokens on a rank still has a (zero) gradient,
    # which DDP's all-reduce needs; the balance loss trains with the language-model loss
    # As a sweep's job continued with resume=auto (nothing to resume here): the second process, started inside
    # the first's fit, had taken the job's directory for another run's (the first's) and ended them both
    sweep = tmp_path / "sweep"
    train(tmp_path, data_cache, "-m", "trainer=ddp", "trainer.max_steps=4", *MOE_MLP, f"hydra.sweep.dir={sweep}",
          "resume=auto")  # fmt: skip
    run = sweep / "0-gqa"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_aux_loss"] > 0
    assert metrics["steps"] == 4
    assert metrics["tokens_seen"] == 4 * 8 * 64 * 2  # two processes, a batch each per step
    assert (run / "train_ddp_process_1.log").exists()


def tensorboard_log(logdir: Path) -> tuple[list[tuple[int, int]], dict[tuple[str, int], float]]:
    """The session marks (step, status) of a TensorBoard log and the scalars TensorBoard shows: its event files in
    name order, a SessionLog START (status 1: a purge) at step s hiding every event before it at step >= s."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    marks, scalars = [], {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):  # TFRecords: length, its checksum, the event, its checksum
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 16 + n
            if event.HasField("session_log"):
                marks.append((event.step, event.session_log.status))
                if event.session_log.status == 1:
                    scalars = {key: value for key, value in scalars.items() if key[1] < event.step}
            scalars.update({(value.tag, event.step): value.simple_value for value in event.summary.value})
    return marks, scalars


# wandb under -m slow for the suite's time (its offline files: test_ablation.py's wandb test, in process)
@pytest.mark.parametrize("logger", ["tensorboard", pytest.param("wandb", marks=pytest.mark.slow)])
def test_other_loggers_write_their_files(tmp_path, data_cache, logger, monkeypatch):
    """TensorBoard shows every step's training loss and every validation's loss, the one before training and the
    final one included (each stage opened a file of its own, named by the second: a training of under a second
    went under the final validation's)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default without it
    train(tmp_path, data_cache, f"logger={logger}", "trainer.max_steps=3", "trainer.val_check_interval=2",
          "trainer.log_every_n_steps=1")  # fmt: skip
    (run,) = run_dirs(tmp_path, "train")
    if logger == "tensorboard":
        _, scalars = tensorboard_log(run / "logs")
        metrics = json.loads((run / "metrics.json").read_text())
        assert sorted(step for tag, step in scalars if tag == "train_loss") == [0, 1, 2]
        validations = {step: loss for (tag, step), loss in scalars.items() if tag == "val_loss"}
        assert sorted(validations) == [0, 1, 3]  # before training, at step 2, the final one
        assert validations[0] == pytest.approx(metrics["initial_val_loss"])
        assert validations[3] == pytest.approx(metrics["val_loss"])
    else:
        assert list((run / "wandb").glob("offline-run-*"))


def test_a_run_resuming_in_its_own_directory_purges_the_killed_runs_later_tensorboard_events(tmp_path):
    """TensorBoard's purge marker at the checkpoint's step: the killed run's events from there on are hidden,
    as the CSV log drops its rows (the resumed run logs them again); the marker is written once, in the resumed
    run's first file, and its own events of the stages after it (here the final validation's) all show."""
    from kvlab.recipes.config import TrainConfig
    from kvlab.recipes.run import _logger

    tc = TrainConfig(model={"mixer": {"kind": "attention"}})
    tc.logger.kind = "tensorboard"
    for run, resumed_at in (tmp_path / "fresh", None), (tmp_path / "resumed", 7):
        logger = _logger(tc, run, resumed_at)
        logger.log_metrics({"train_loss": 1.0}, step=8)
        logger.finalize("success")  # the end of training: what it logged is in the file
        logger.log_metrics({"val_loss": 2.0}, step=9)
        logger.finalize("success")
        marks, scalars = tensorboard_log(run / "logs")
        assert marks == ([] if resumed_at is None else [(7, 1)])  # 1: SessionLog.START, the purge
        assert scalars == {("train_loss", 8): 1.0, ("val_loss", 9): 2.0}


def test_every_tensorboard_event_is_in_its_file_before_a_checkpoint_is_saved(tmp_path):
    """tensorboardX writes from a thread and writes out only on closing (or every 2 minutes): a kill after a
    checkpoint lost the events logged before it, which the resumed run does not log again."""
    from types import SimpleNamespace

    from kvlab.recipes.config import TrainConfig
    from kvlab.recipes.run import StepCheckpoint, _logger

    tc = TrainConfig(model={"mixer": {"kind": "attention"}})
    tc.logger.kind = "tensorboard"
    logger = _logger(tc, tmp_path, None)
    logger.log_metrics({"train_loss": 1.0}, step=1)
    time.sleep(0.5)  # the thread writes its first event out at once, the next ones when it next flushes
    logger.log_metrics({"train_loss": 2.0}, step=2)
    on_disk = []
    trainer = SimpleNamespace(
        loggers=[logger], global_step=2, is_global_zero=True,
        save_checkpoint=lambda path, weights_only: on_disk.append(tensorboard_log(tmp_path / "logs")[1]),
    )  # fmt: skip
    StepCheckpoint(dirpath=tmp_path)._save_checkpoint(trainer, str(tmp_path / "step000002.ckpt"))
    assert on_disk == [{("train_loss", 1): 1.0, ("train_loss", 2): 2.0}]
    logger.log_metrics({"train_loss": 3.0}, step=3)  # on into another file
    logger.finalize("success")
    assert tensorboard_log(tmp_path / "logs")[1] == {
        ("train_loss", 1): 1.0,
        ("train_loss", 2): 2.0,
        ("train_loss", 3): 3.0,
    }


def test_a_new_column_rewrites_the_csv_log_through_a_temporary(tmp_path, monkeypatch):
    """A metric first logged late (the first validation's) rewrites every row under the new header; Lightning
    rewrote the file in place, so a kill during it lost the whole log. Killed here inside the rewrite."""
    from kvlab.recipes.run import _ContinuedWriter

    for killed in (False, True):
        directory = tmp_path / str(killed)
        writer = _ContinuedWriter(str(directory), None)
        writer.log_metrics({"train_loss": 1.0}, step=0)
        writer.save()
        before = (directory / "metrics.csv").read_text()
        writer.log_metrics({"val_loss": 2.0}, step=1)
        if not killed:
            writer.save()
            rows = list(csv.DictReader(open(directory / "metrics.csv")))
            assert [(r["train_loss"], r["val_loss"]) for r in rows] == [("1.0", ""), ("", "2.0")]
            continue

        def kill(self, rows):
            raise KeyboardInterrupt

        monkeypatch.setattr(csv.DictWriter, "writerows", kill)
        with pytest.raises(KeyboardInterrupt):
            writer.save()
        assert (directory / "metrics.csv").read_text() == before
        assert [p.name for p in directory.iterdir()] == ["metrics.csv"]  # no temporary left behind


def test_wandb_runs_are_named_by_preset_and_grouped_by_sweep():
    from kvlab.recipes.config import TrainConfig
    from kvlab.recipes.run import _hydra_run, wandb_identity

    assert _hydra_run() == {}  # outside Hydra: nothing but the config
    tc = TrainConfig(model={"mixer": {"kind": "attention"}}, run_name="pretrain", seed=3)
    assert wandb_identity(tc, {"preset": "gqa"}) == ("pretrain-gqa-s3", None, ["pretrain", "gqa", "attention"])
    job = {"preset": "mla", "sweep": "2026-12-04_10-00-00", "overrides": "model=mla,seed=1"}
    assert wandb_identity(tc, job)[:2] == ("pretrain-model=mla,seed=1", "pretrain/2026-12-04_10-00-00")
    parallel = {"kind": "parallel", "mixers": [{"kind": "mamba2"}, {"kind": "rwkv7", "value_residual": False}]}
    hybrid = TrainConfig(model={"n_layers": 2, "pattern": "AP", "mixers": {"A": {"kind": "attention"}, "P": parallel}})
    assert wandb_identity(hybrid, {})[2] == ["train", "model", "attention", "mamba2", "parallel", "rwkv7"]
    tc.logger.name, tc.logger.group = "mine", "ours"
    assert wandb_identity(tc, job)[:2] == ("mine", "ours")


def test_init_from_checkpoint_starts_where_the_parent_ended(tmp_path, data_cache):
    train(tmp_path, data_cache, "recipe=pretrain", "trainer.max_steps=20")
    (parent_dir,) = run_dirs(tmp_path, "pretrain")
    parent = json.loads((parent_dir / "metrics.json").read_text())
    ckpt = parent_dir / "checkpoints" / "last.ckpt"

    # Unconverted, the run starts exactly where the parent ended.
    train(tmp_path, data_cache, "run_name=same", "init.from=checkpoint", f"init.path={ckpt}", "trainer.max_steps=1")
    (same_dir,) = run_dirs(tmp_path, "same")
    same = json.loads((same_dir / "metrics.json").read_text())
    assert abs(same["initial_val_loss"] - parent["val_loss"]) < 1e-4

    # The source's max_seq_len (128) bounds data.seq_len, whatever the ignored `model` group says.
    proc = train(tmp_path, data_cache, "run_name=long", "init.from=checkpoint", f"init.path={ckpt}",
                 "data.seq_len=256", "model.max_seq_len=4096", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "data.seq_len=256 exceeds the initial model's max_seq_len=128" in proc.stderr.strip().splitlines()[0]


@pytest.mark.slow
def test_init_converted_or_from_an_hf_directory(tmp_path, data_cache):
    """Under -m slow for the suite's time: recipes convert through init.convert (test_uptrain.py) and
    test_uptrain_an_hf_directory starts from an HF directory."""
    train(tmp_path, data_cache, "recipe=pretrain", "trainer.max_steps=20")
    (parent_dir,) = run_dirs(tmp_path, "pretrain")
    parent = json.loads((parent_dir / "metrics.json").read_text())
    ckpt = parent_dir / "checkpoints" / "last.ckpt"

    # Converted to MQA: the architecture comes from the source, with one K/V head.
    train(tmp_path, data_cache, "run_name=mqa", "init.from=checkpoint", f"init.path={ckpt}",
          "init.convert={to: mqa}", "trainer.max_steps=2")  # fmt: skip
    (mqa_dir,) = run_dirs(tmp_path, "mqa")
    mqa = json.loads((mqa_dir / "metrics.json").read_text())
    assert mqa["model"]["mixer"]["n_kv_heads"] == 1
    assert mqa["kv_bytes_per_token"] * 2 == parent["kv_bytes_per_token"]

    # A Hugging Face directory (here: the parent exported by hand with its tokenizer).
    hf_dir = hf_dir_by_hand(ckpt, parent["model"], ckpt.parent / "tokenizer.json", tmp_path / "hf")
    train(tmp_path, data_cache, "run_name=hf", "init.from=hf", f"init.path={hf_dir}", "trainer.max_steps=1")
    (hf_run,) = run_dirs(tmp_path, "hf")
    assert abs(json.loads((hf_run / "metrics.json").read_text())["initial_val_loss"] - parent["val_loss"]) < 1e-4


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_zero_on_two_cpu_processes_checkpoints_resumes_and_inits(tmp_path, data_cache, stage):
    ds = [f"trainer=deepspeed_zero{stage}", "trainer.accelerator=cpu", "trainer.devices=2",
          "trainer.precision=32-true", "trainer.ckpt_every_n_steps=3", *MOE_MLP]  # fmt: skip
    train(tmp_path, data_cache, *ds, "trainer.max_steps=4")
    (run,) = run_dirs(tmp_path, "train")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens_seen"] == 4 * 8 * 64 * 2
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # DeepSpeed's sharded format, saved at the final step though 4 % 3 != 0
    assert (run / "checkpoints" / "step000003.ckpt").is_dir()

    train(tmp_path, data_cache, *ds, "trainer.max_steps=6", "resume=auto")
    resumed = json.loads((run_dirs(tmp_path, "train")[-1] / "metrics.json").read_text())
    assert resumed["resumed_from"]["step"] == 4 and resumed["steps"] == 6

    # Plain DDP (same two ranks, so the same validation samples) evaluates the gathered weights
    # exactly where the first run ended.
    train(tmp_path, data_cache, "run_name=init", "init.from=checkpoint", f"init.path={last}", "trainer=ddp",
          "stages=[eval]", *MOE_MLP)  # fmt: skip
    (init_dir,) = run_dirs(tmp_path, "init")
    init = json.loads((init_dir / "metrics.json").read_text())
    assert abs(init["val_loss"] - metrics["val_loss"]) < 1e-5


def test_fsdp2_on_two_cpu_processes_checkpoints_resumes_exactly_and_inits(tmp_path, data_cache):
    """trainer=fsdp: FSDP2 (fully_shard per block) over 2 gloo processes; checkpoints gathered into one file."""
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.ckpt_every_n_steps=3", "trainer.max_steps=4"]  # fmt: skip
    train(tmp_path, data_cache, *fsdp, "stages=[train,export]", "export.dtype=fp32")
    (run,) = run_dirs(tmp_path, "train")
    straight = json.loads((run / "metrics.json").read_text())
    assert straight["steps"] == 4 and straight["tokens_seen"] == 4 * 8 * 64 * 2
    last, third = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step000003.ckpt"
    assert last.is_file() and third.is_file()  # whole weights on rank 0, as every other strategy's
    from kvlab.archs.hf import load_hf
    from kvlab.recipes.checkpoint import load_checkpoint_model

    exported, saved = load_hf(run / "hf").state_dict(), load_checkpoint_model(last).state_dict()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)  # rank 0 exported the gathered weights
    # from step 3 of the same run to step 4: where the straight run ended, to the bit
    train(tmp_path, data_cache, *fsdp, "run_name=resumed", f"resume={third}")
    (resumed_dir,) = run_dirs(tmp_path, "resumed")
    resumed = json.loads((resumed_dir / "metrics.json").read_text())
    assert resumed["resumed_from"]["step"] == 3 and resumed["steps"] == 4
    assert resumed["train_loss"] == straight["train_loss"] and resumed["val_loss"] == straight["val_loss"]
    # plain DDP (the same two ranks, so the same validation samples) evaluates the gathered weights
    train(tmp_path, data_cache, "run_name=init", "init.from=checkpoint", f"init.path={last}", "trainer=ddp",
          "stages=[eval]", "eval.decode_speed=false", "eval.passkey=false")  # fmt: skip
    (init_dir,) = run_dirs(tmp_path, "init")
    assert abs(json.loads((init_dir / "metrics.json").read_text())["val_loss"] - straight["val_loss"]) < 1e-5


def test_export_stage_and_recipe_write_a_loadable_hf_directory(tmp_path, data_cache):
    transformers = pytest.importorskip("transformers")
    train(tmp_path, data_cache, "stages=[train,export]", "trainer.max_steps=2")
    (run,) = run_dirs(tmp_path, "train")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["hf_dir"] == str(run / "hf")
    from safetensors.torch import load_file  # bf16 weights by default (export.dtype), as the config says

    assert {t.dtype for t in load_file(run / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((run / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    card = (run / "hf" / "README.md").read_text()  # the model card, with the run's numbers
    assert card.startswith("---\nlibrary_name: transformers") and f"| val_loss | {metrics['val_loss']:,.4g} |" in card
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    assert tokenizer.get_vocab() == transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(run / "checkpoints" / "tokenizer.json")).get_vocab()  # fmt: skip

    # recipe=eval and recipe=export on the checkpoint: the same weights, evaluated to the same loss
    train(tmp_path, data_cache, "recipe=eval", f"ckpt={run / 'checkpoints' / 'last.ckpt'}")
    (evaluated,) = run_dirs(tmp_path, "eval")
    evaluation = json.loads((evaluated / "metrics.json").read_text())
    assert evaluation["val_loss"] == pytest.approx(metrics["val_loss"], abs=1e-5)
    assert evaluation["decode_tokens_per_s"]["batch_1"] > 0 and evaluation["decode_tokens_per_s"]["batch_8"] > 0
    assert "hf_dir" not in evaluation
    assert evaluation["passkey"] and all(0 <= acc <= 1 for by_depth in evaluation["passkey"].values()
                                         for acc in by_depth.values())  # fmt: skip
    train(tmp_path, data_cache, "recipe=export", f"ckpt={run / 'checkpoints' / 'last.ckpt'}")
    (export,) = run_dirs(tmp_path, "export")
    exported = json.loads((export / "metrics.json").read_text())
    assert exported["val_loss"] == pytest.approx(metrics["val_loss"], abs=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(run / "hf" / "model.safetensors"), load_file(export / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # stages=[export] alone: no data prepared (a corpus that is not there is never read), the same weights
    train(tmp_path, data_cache, "recipe=export", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "stages=[export]",
          "run_name=export_only", "data=text", "data.paths=[/nonexistent/corpus/*.txt]")  # fmt: skip
    (only,) = run_dirs(tmp_path, "export_only")
    c = load_file(only / "hf" / "model.safetensors")
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert "val_loss" not in json.loads((only / "metrics.json").read_text())
    assert transformers.AutoTokenizer.from_pretrained(only / "hf").get_vocab() == tokenizer.get_vocab()
