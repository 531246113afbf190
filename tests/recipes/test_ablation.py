"""recipe=ablation: a sweep of presets into results.csv, results.md and pareto.png."""

import csv
import json

from kvlab.recipes.ablation import _cache_at, pareto_front, plot_pareto
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


def test_plot_draws_every_row(tmp_path):
    rows = [{"model": "gqa", "kv_bytes_at_context": 3_000_000, "val_ppl": 200.0},
            {"model": "mamba2", "kv_bytes_at_context": 400_000, "val_ppl": 150.0}]  # fmt: skip
    points = plot_pareto(rows, tmp_path / "p.png", 2048)
    assert points == [("gqa", 3_000_000, 200.0), ("mamba2", 400_000, 150.0)]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_sweep_at_equal_parameters_writes_the_table_and_the_plot(tmp_path, data_cache):
    train(tmp_path, data_cache, "-m", "recipe=ablation", "model=mha,retnet", "trainer.max_steps=3",
          "model.vocab_size=512", "trainer.limit_val_batches=1", "iso_params=5500000", tiny_model=False)  # fmt: skip
    (sweep,) = run_dirs(tmp_path, "ablation")
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["mha", "retnet"]
    for r in rows:
        (job,) = sweep.glob(f"*-{r['model']}")
        metrics = json.loads((job / "metrics.json").read_text())
        assert float(r["val_ppl"]) == metrics["val_ppl"]
        assert int(r["kv_bytes_at_context"]) == metrics["kv_bytes_per_token"] * 2048 + metrics["kv_fixed_bytes"]
        assert float(r["decode_tok_s_batch_1"]) > 0
        assert abs(int(r["params"]) - 5_500_000) <= 4 * 3 * 256 * 6  # iso_params: within a few MLP units
    assert "retnet** |" in (sweep / "results.md").read_text()  # the smallest cache: on the frontier
    assert (sweep / "pareto.png").stat().st_size > 1000


def test_with_wandb_the_table_and_the_plot_are_logged_offline(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from kvlab.recipes.ablation import COLUMNS, _log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    row = {c: 1.0 for c in COLUMNS} | {"model": "gqa", "kv_bytes_at_context": 10, "val_ppl": 5.0}
    plot_pareto([row], tmp_path / "pareto.png", 2048)
    _log_to_wandb([row], tmp_path, OmegaConf.create({"logger": {"kind": "wandb", "project": "kvlab", "mode": None}}))
    (table,) = tmp_path.glob("wandb/offline-run-*/files/media/table/ablation_*.table.json")
    assert json.loads(table.read_text())["columns"] == list(COLUMNS)
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/pareto_*.png"))
