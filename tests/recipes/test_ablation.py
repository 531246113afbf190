"""recipe=ablation: a sweep of presets into results.csv, results.md and pareto.png."""

import csv
import json
import math

import pytest

from kvlab.recipes.ablation import (
    _cache_at,
    frontier_marks,
    markdown_table,
    mean_interval,
    order_line,
    pareto_front,
    plot_pareto,
    seed_orders,
    summarize,
)
from tests.conftest import tiny
from tests.recipes.test_train import run_dirs, train


def test_pareto_front_keeps_models_no_other_beats_on_both():
    points = [("a", 100, 50.0), ("b", 10, 80.0), ("c", 1000, 40.0), ("d", 500, 60.0), ("e", 10, 90.0)]
    rows = [{"model": m, "kv_bytes_at_context": b, "val_ppl": p} for m, b, p in points]
    assert [r["model"] for r in pareto_front(rows)] == ["b", "a", "c"]


def test_a_context_encoder_on_rows_with_a_context_holds_the_context_as_its_states():
    plain = {"kv_bytes_per_token": 6144, "kv_fixed_bytes": 10}
    encoder = plain | {"context_bytes_per_token": 256}
    assert _cache_at(plain, 100) == _cache_at(encoder, 100) == 614_410  # trained without a context: its K/V
    with_context = {"val_loss_without_context": 4.0}  # data.context was set
    assert _cache_at(plain | with_context, 100) == 614_410  # the context in the prompt
    assert _cache_at(encoder | with_context, 100) == 25_610  # the context as encoder states
    counted = {"kv_bytes_at": {"100": 700_000}}  # as the run counted it (KIVI's residual): read, not recomputed
    assert _cache_at(plain | counted, 100) == 700_000 and _cache_at(plain | counted, 200) == 1_228_810


def test_plot_draws_every_row(tmp_path):
    rows = [{"model": "gqa", "kv_bytes_at_context": 3_000_000, "val_ppl": 200.0, "val_ppl_low": 180.0,
             "val_ppl_high": 230.0},
            {"model": "mamba2", "kv_bytes_at_context": 400_000, "val_ppl": 150.0}]  # fmt: skip
    points = plot_pareto(rows, tmp_path / "p.png", 2048)
    assert points == [("gqa", 3_000_000, 200.0), ("mamba2", 400_000, 150.0)]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_sweep_over_seeds_with_an_lr_sweep_writes_every_run_and_the_means(tmp_path, data_cache):
    train(tmp_path, data_cache, "-m", "recipe=ablation", "model=mha,retnet", "seed=0,1", "trainer.max_steps=3",
          "model.vocab_size=512", "trainer.limit_val_batches=1", "iso_params=5500000", "lr_sweep.grid=[1e-3,3e-3]",
          "lr_sweep.steps=2", tiny_model=False)  # fmt: skip
    (sweep,) = run_dirs(tmp_path, "ablation")
    with open(sweep / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["model"], r["seed"]) for r in runs) == [
        ("mha", "0"),
        ("mha", "1"),
        ("retnet", "0"),
        ("retnet", "1"),
    ]
    for r in runs:
        metrics = json.loads((sweep / r["job"] / "metrics.json").read_text())
        assert metrics["seed"] == int(r["seed"]) and float(r["val_loss"]) == metrics["val_loss"]
        assert int(r["kv_bytes_at_context"]) == metrics["kv_bytes_per_token"] * 2048 + metrics["kv_fixed_bytes"]
        assert float(r["decode_tok_s_batch_1"]) > 0
        assert abs(int(r["params"]) - 5_500_000) <= 4 * 3 * 256 * 6  # iso_params: within a few MLP units
        sweep_record = metrics["lr_sweep"]  # the rate of least trial loss, the same for both seeds (one sweep)
        losses = {float(lr): loss for lr, loss in sweep_record["val_loss"].items()}
        assert metrics["lr"] == sweep_record["chosen"] == min(losses, key=losses.get) and len(losses) == 2
        assert float(r["lr"]) == metrics["lr"]
    trials = {json.loads((sweep / r["job"] / "metrics.json").read_text())["lr_sweep"]["trials"] for r in runs}
    assert len(trials) == 2  # one set of trials per preset, shared by its seeds
    with open(sweep / "results.csv") as f:
        results = {r["model"]: r for r in csv.DictReader(f)}
    for model, row in results.items():
        losses = [float(r["val_loss"]) for r in runs if r["model"] == model]
        mean, half = mean_interval(losses)
        assert row["runs"] == "2" and float(row["val_loss"]) == pytest.approx(mean)
        assert float(row["val_loss_ci95"]) == pytest.approx(half)
    assert results["retnet"]["frontier"] == "front"  # the smallest cache
    assert "**retnet** |" in (sweep / "results.md").read_text()
    assert "Order by validation loss (lowest first), seed 0: " in (sweep / "results.md").read_text()
    assert (sweep / "pareto.png").stat().st_size > 1000
    from kvlab.recipes.ablation import main

    main([str(sweep), "--context", "1024"])  # the report again, at another length
    with open(sweep / "results.csv") as f:
        again = {r["model"]: r for r in csv.DictReader(f)}
    mha = json.loads((sweep / next(r["job"] for r in runs if r["model"] == "mha") / "metrics.json").read_text())
    assert int(again["mha"]["kv_bytes_at_context"]) == mha["kv_bytes_per_token"] * 1024 + mha["kv_fixed_bytes"]


def test_a_job_that_diverges_is_a_result_of_the_sweep_and_the_report_names_it_and_the_unfinished(tmp_path, data_cache):
    """A sweep's job that diverges ends with its line and its metrics.json, and the next job runs (its exit ended
    the whole sweep); the report keeps it out of the means and says so, and names the jobs with no metrics (killed)
    rather than averaging fewer seeds in silence (the report failed on a diverged job's missing loss)."""
    from kvlab.recipes.ablation import main

    proc = train(tmp_path, data_cache, "-m", "optim.lr=1e9,0.003", "optim.warmup_steps=0", "trainer.max_steps=4",
                 "seed=0", "run_name=lrs")  # fmt: skip
    assert "kvlab: error: training diverged: at step" in proc.stderr
    (sweep,) = run_dirs(tmp_path, "lrs")
    diverged, finished = (json.loads((sweep / f"{i}-gqa" / "metrics.json").read_text()) for i in (0, 1))
    assert diverged["val_loss"] is None and diverged["diverged"]["step"] >= 1 and finished["val_loss"] > 0
    (sweep / "2-mha").mkdir()  # a job killed before it wrote its metrics
    main([str(sweep)])
    table = (sweep / "results.md").read_text()
    step = diverged["diverged"]["step"]
    assert "| 1 (+1 diverged) |" in table and f"Diverged, so in no mean: gqa at seed 0 (step {step})." in table
    assert "Not finished (no metrics.json; continue the sweep with resume=auto): 2-mha." in table
    with open(sweep / "results.csv") as f:
        (row,) = csv.DictReader(f)
    assert float(row["val_loss"]) == finished["val_loss"] and row["diverged"] == f"0@{step}"


def test_a_preset_that_diverged_at_every_seed_is_marked_and_pairs_only_finished_seeds():
    runs = [{"model": m, "seed": s, "lr": 3e-3, "params": 10, "train_flops_per_token": 60, "kv_bytes_per_token": k,
             "kv_bytes_at_context": k * 2048, "val_loss": loss, "val_ppl": loss and math.exp(loss), "diverged": d,
             "val_accuracy": 0.5, "decode_tok_s_batch_1": None, "train_tok_s": 100.0}
            for m, s, k, loss, d in [("gqa", 0, 1024, 5.0, None), ("gqa", 1, 1024, None, 7), ("mqa", 0, 512, 5.2, None),
                                     ("mqa", 1, 512, 5.5, None), ("mla", 0, 256, None, 3)]]  # fmt: skip
    gqa, mqa, mla = summarize(runs)
    assert (gqa["runs"], gqa["diverged"], gqa["val_loss"]) == (1, "1@7", 5.0)
    assert mqa["val_loss_diff"] == pytest.approx(0.2) and mqa["val_loss_diff_ci95"] is None  # seed 0 alone
    assert (mla["runs"], mla["val_loss"], mla["frontier"]) == (0, None, "diverged")
    assert (gqa["frontier"], mqa["frontier"]) == ("", "front") or mqa["frontier"] == "front"
    assert seed_orders([r for r in runs if r["val_loss"] is not None]) == {0: ["gqa", "mqa"]}
    assert "| mla | 0 (+1 diverged) |" in markdown_table([gqa, mqa, mla], 2048)


def test_mean_interval_is_students_t_and_covers_the_mean_as_often_as_it_says():
    mean, half = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776445105197793 * math.sqrt(2.5 / 5))  # t(0.975, 4), tables
    assert mean_interval([4.0]) == (4.0, None)
    import numpy as np

    rng = np.random.default_rng(0)  # 3 seeds of a metric with mean 5 and sd 0.1, 4000 times
    covered = 0
    for sample in rng.normal(5.0, 0.1, size=(4000, 3)):
        m, h = mean_interval(sample.tolist())
        covered += abs(m - 5.0) <= h
    assert 0.935 < covered / 4000 < 0.965


def test_the_means_decide_the_frontier_and_overlapping_intervals_are_ties():
    def row(model, cache, loss, half):
        return {"model": model, "kv_bytes_at_context": cache, "val_loss": loss, "val_loss_ci95": half,
                "val_ppl": math.exp(loss)}  # fmt: skip

    rows = [row("small", 10, 5.0, 0.05), row("big", 100, 4.0, 0.05), row("close", 50, 5.05, 0.05),
            row("far", 200, 4.5, 0.05), row("noisy", 300, 4.3, 0.4)]  # fmt: skip
    assert frontier_marks(rows) == {"small": "front", "big": "front", "close": "tie", "far": "", "noisy": "tie"}
    assert frontier_marks([row("a", 1, 5.0, None), row("b", 2, 5.01, None)]) == {"a": "front", "b": ""}


def test_summary_groups_runs_by_preset_with_the_perplexity_interval_from_the_loss():
    runs = [{"model": m, "seed": s, "lr": 3e-3, "params": 10, "train_flops_per_token": 60, "kv_bytes_per_token": k,
             "kv_bytes_at_context": k * 2048, "val_loss": loss, "val_accuracy": 0.5, "decode_tok_s_batch_1": None,
             "train_tok_s": 100.0} for m, s, k, loss in [("gqa", 0, 1024, 5.0), ("mqa", 0, 512, 5.2),
                                                         ("gqa", 1, 1024, 5.2), ("mqa", 1, 512, 5.5),
                                                         ("mqa", 2, 512, 5.9)]]  # fmt: skip
    gqa, mqa = summarize(runs)
    assert (gqa["model"], gqa["runs"], gqa["seeds"], gqa["lr"]) == ("gqa", 2, "0 1", "0.003")
    mean, half = mean_interval([5.0, 5.2])
    assert gqa["val_loss"] == pytest.approx(mean) and gqa["val_loss_ci95"] == pytest.approx(half)
    assert gqa["val_ppl_low"] == pytest.approx(math.exp(mean - half))
    assert gqa["val_ppl_high"] == pytest.approx(math.exp(mean + half))
    assert (gqa["frontier"], mqa["frontier"]) == ("front", "front")
    # against the first preset at the seeds both ran (seed 2 has no gqa run to pair with)
    assert gqa["val_loss_diff"] is None and mqa["runs"] == 3
    diff, diff_half = mean_interval([0.2, 0.3])
    assert mqa["val_loss_diff"] == pytest.approx(diff) and mqa["val_loss_diff_ci95"] == pytest.approx(diff_half)
    assert diff_half < mqa["val_loss_ci95"]  # the pairs take out what the seed moves in both


def test_the_order_at_each_seed_and_whether_every_seed_agrees():
    def runs(losses):
        return [{"model": m, "seed": s, "val_loss": loss} for (m, s), loss in losses.items()]

    agree = runs({("mha", 0): 3.0, ("gqa", 0): 3.1, ("mqa", 0): 3.3, ("mha", 1): 2.9, ("gqa", 1): 3.0,
                  ("mqa", 1): 3.2, ("mha", 10): 3.1, ("gqa", 10): 3.15, ("mqa", 10): 3.2,
                  ("mha", 2): 3.0, ("gqa", 2): 3.05})  # fmt: skip
    orders = seed_orders(agree)  # seed 2 lacks mqa: no order to compare there
    assert orders == {0: ["mha", "gqa", "mqa"], 1: ["mha", "gqa", "mqa"], 10: ["mha", "gqa", "mqa"]}
    assert order_line(orders).startswith("Order by validation loss (lowest first), seed 0: mha < gqa < mqa; seed 1")
    assert order_line(orders).endswith("**the same at every seed**.")
    swapped = seed_orders(agree[:3] + runs({("mha", 1): 3.1, ("gqa", 1): 3.0, ("mqa", 1): 3.2}))
    assert swapped[1] == ["gqa", "mha", "mqa"] and "**not the same at every seed**" in order_line(swapped)
    assert order_line({0: ["mha", "gqa"]}) == "" and order_line({0: ["mha"], 1: ["mha"]}) == ""  # nothing to rank
    summary = [{"model": "mha", "runs": 3, "lr": None, "params": 1, "train_flops_per_token": 1,
                "kv_bytes_per_token": 1, "kv_bytes_at_context": 1, "val_loss": 3.0, "val_loss_ci95": 0.1,
                "val_loss_diff": None, "val_loss_diff_ci95": None, "val_ppl": 20.0, "val_ppl_low": 19.0,
                "val_ppl_high": 21.0, "frontier": "front"}]  # fmt: skip
    assert markdown_table(summary, 2048, swapped).rstrip().endswith(order_line(swapped))


def test_with_wandb_the_table_and_the_plot_are_logged_offline(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from kvlab.recipes.ablation import COLUMNS, _log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    row = {c: 1.0 for c in COLUMNS} | {"model": "gqa", "kv_bytes_at_context": 10, "val_ppl": 5.0, "val_ppl_low": 4.0,
                                       "val_ppl_high": 6.0}  # fmt: skip
    plot_pareto([row], tmp_path / "pareto.png", 2048)
    _log_to_wandb([row], tmp_path, OmegaConf.create({"logger": {"kind": "wandb", "project": "kvlab", "mode": None}}))
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/ablation_*.table.json")
    assert json.loads(table.read_text())["columns"] == list(COLUMNS)
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/pareto_*.png"))


@pytest.mark.parametrize(
    "setting, steps, seeds, width, launcher",
    [(None, 100, "0", 256, "basic_launcher.BasicLauncher"), ("standard", 2000, "0,1,2", 128, "JoblibLauncher")],
)
def test_the_ablation_settings_set_the_budget_and_the_seeds(setting, steps, seeds, width, launcher):
    from hydra import compose, initialize_config_dir

    from kvlab.archs import ModelConfig
    from kvlab.recipes.config import register_configs
    from tests.recipes.test_train import REPO

    register_configs()
    overrides = ["recipe=ablation", "model=mqa"] + ([f"ablation={setting}"] if setting else [])
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.trainer.max_steps == steps and str(cfg.hydra.sweeper.params.seed) == seeds
    assert ModelConfig.from_dict(cfg.model).d_model == width
    assert cfg.hydra.launcher._target_.endswith(launcher)  # the standard runs its jobs in parallel, one per core
    assert cfg.eval.decode_speed == (setting is None)  # speeds beside another job are not measured


def test_an_ablation_sweeps_cache_policies_like_models_in_parallel_jobs(tmp_path, data_cache):
    proc = train(tmp_path, data_cache, "-m", "recipe=ablation", "model=gqa", "cache=null,int8", "trainer.max_steps=3",
                 "trainer.limit_val_batches=2", "eval.decode_speed=false", "eval.cache_chunk=4",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")  # fmt: skip
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr  # two worker processes ran the jobs
    (sweep,) = run_dirs(tmp_path, "ablation")
    with open(sweep / "runs.csv") as f:
        runs = {r["model"]: r for r in csv.DictReader(f)}
    assert sorted(runs) == ["gqa", "gqa+int8"] and runs["gqa+int8"]["cache"] == "int8"
    assert runs["gqa"]["threads"] == "1"  # each job's torch threads (the tests run with OMP_NUM_THREADS=1)
    plain, int8 = (json.loads((sweep / runs[m]["job"] / "metrics.json").read_text()) for m in ("gqa", "gqa+int8"))
    assert plain["val_loss"] == int8["val_loss"]  # the forward pass never reads the cache
    # decoded through int8 codes: close to the forward's loss, not equal to it; the table's loss is that one
    assert 0 < abs(int8["cache_val_loss"] - int8["val_loss"]) < 0.05
    assert float(runs["gqa+int8"]["val_loss"]) == int8["cache_val_loss"]
    assert int(runs["gqa+int8"]["kv_bytes_at_context"]) == int8["kv_bytes_at"]["2048"] == 2048 * 2 * 2 * 2 * 20
    # 2 layers, 2 K/V heads of 16: 16 bytes of codes and a bf16 scale and zero point per vector, bf16's 32
    assert int8["kv_bytes_per_token"] == 2 * 2 * 2 * (16 + 4) and int8["kv_bytes_per_token_bf16"] == 2 * 2 * 2 * 32
    with open(sweep / "results.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["gqa", "gqa+int8"]


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"cache": "int5"},
            "cache: cache policy kind=.int5. is not one of none, int8, int4, fp8, kivi, sinks, h2o",
        ),
        (
            {"cache": "int8", "stages": ["train"]},
            r"cache=int8 is the cache stage eval decodes through; stages=\['train'\]",
        ),
        ({"cache": "fp8", "model": tiny(mixer={"kind": "mla", "n_heads": 4})}, "layer 0 caches a latent per token"),
        ({"cache": "int8", "doc_mask": True}, "use data.doc_mask=false"),
        ({"cache": "int8", "cache_chunk": 0}, "eval.cache_chunk=0 must be >= 1"),
        ({"cache": "int8", "cache_prompt": 256}, "eval.cache_prompt=256 must be from 0 to data.seq_len - 1 = 255"),
    ],
)
def test_bad_cache_settings_are_refused_before_training(changes, message):
    from kvlab.recipes.config import TrainConfig
    from kvlab.recipes.run import ConfigError, _validated

    tc = TrainConfig(
        model=changes.get("model", tiny()), cache=changes["cache"], stages=changes.get("stages", ["train", "eval"])
    )
    tc.data.doc_mask = changes.get("doc_mask", False)
    tc.eval.cache_chunk = changes.get("cache_chunk", 1)
    tc.eval.cache_prompt = changes.get("cache_prompt", 0)
    with pytest.raises(ConfigError, match=message):
        _validated(tc)
