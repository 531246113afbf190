"""Fair comparisons: the learning-rate sweep (its choice on stub trials, its cache) and the iso settings (iso_flops,
iso_cache) that scale presets to one budget."""

import json
import math

import pytest
from omegaconf import OmegaConf

from kvlab.recipes.config import TrainConfig
from kvlab.recipes.lr_sweep import choose_lr, run_lr_sweep
from kvlab.recipes.run import ConfigError, RunDiverged


def _cfg(tmp_path, **changes):
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model = {"d_model": 64}
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.trainer.max_steps = 200
    cfg.lr_sweep.grid = [1e-3, 3e-3, 1e-2]
    cfg.lr_sweep.steps = 20
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _stub_trials(losses, calls):
    """A trial that writes the loss ``losses`` gives its rate, as run() writes metrics.json."""

    def trial(cfg, run_dir):
        calls.append((cfg.optim.lr, cfg.trainer.max_steps, cfg.seed, list(cfg.stages), cfg.optim.warmup_steps))
        run_dir.mkdir(parents=True)
        loss = losses[cfg.optim.lr]
        if loss == "diverged":  # as run() ends a run whose loss or gradients stopped being finite
            (run_dir / "metrics.json").write_text(json.dumps({"val_loss": None, "diverged": {"step": 3}}))
            raise RunDiverged("training diverged: at step 3 the training loss was nan, ...")
        (run_dir / "metrics.json").write_text(json.dumps({"val_loss": loss}))
        return {"val_loss": loss}

    return trial


def test_the_rate_of_least_loss_is_chosen_and_diverged_trials_lose():
    assert choose_lr({1e-3: 5.0, 3e-3: 4.5, 1e-2: 4.8}) == 3e-3
    assert choose_lr({1e-3: 5.0, 3e-3: float("nan"), 1e-2: float("inf")}) == 1e-3
    assert choose_lr({1e-3: 4.0, 3e-3: 4.0}) == 1e-3  # a tie: the first in the grid
    with pytest.raises(ConfigError, match="every learning rate diverged"):
        choose_lr({1e-3: float("nan"), 1e-2: float("inf")})


def test_the_sweep_trains_each_rate_once_then_every_seed_at_the_chosen_one(tmp_path, caplog):
    calls, runs = [], []
    trial = _stub_trials({1e-3: 5.0, 3e-3: 4.2, 1e-2: "diverged"}, calls)  # the last one stops at a nan loss

    def then(cfg, run_dir):
        runs.append((cfg.optim.lr, cfg.seed, cfg.trainer.max_steps, list(cfg.lr_sweep.grid)))
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"val_loss": 4.0, "lr": cfg.optim.lr}

    for seed in (0, 1):
        metrics = run_lr_sweep(_cfg(tmp_path, seed=seed), tmp_path / f"run{seed}", then=then, trial=trial)
        assert metrics["lr"] == 3e-3 and metrics["lr_sweep"]["chosen"] == 3e-3
        by_rate = metrics["lr_sweep"]["val_loss"]
        assert by_rate.keys() == {"0.001", "0.003", "0.01"} and (by_rate["0.001"], by_rate["0.003"]) == (5.0, 4.2)
        assert math.isnan(by_rate["0.01"])  # the trial that diverged (its run raised RunDiverged) loses
        written = json.loads((tmp_path / f"run{seed}" / "metrics.json").read_text())
        assert written["lr"] == 3e-3 and written["lr_sweep"]["chosen"] == 3e-3
    # the trials: seed 0 (lr_sweep.seed), its own short budget with no warmup set, trained once for both seeds
    assert calls == [(lr, 20, 0, ["train"], None) for lr in (1e-3, 3e-3, 1e-2)]
    assert runs == [(3e-3, 0, 200, []), (3e-3, 1, 200, [])]
    assert "trials of 20 steps for a run of 200 favour small rates" in caplog.text  # a tenth of the run
    caplog.clear()
    run_lr_sweep(_cfg(tmp_path, **{"trainer.max_steps": 40}), tmp_path / "half", then=then, trial=trial)
    assert "favour small rates" not in caplog.text  # half the run: no warning
    # another grid reuses the trials it shares; a warmup keeps its share of the shorter budget
    run_lr_sweep(_cfg(tmp_path, **{"lr_sweep.grid": [3e-3, 3e-4]}), tmp_path / "run2", then=then,
                 trial=_stub_trials({3e-4: 6.0}, calls))  # fmt: skip
    assert calls[3:] == [(3e-4, 20, 0, ["train"], None)]
    run_lr_sweep(_cfg(tmp_path, **{"optim.warmup_steps": 50, "lr_sweep.grid": [1e-3]}), tmp_path / "run3",
                 then=then, trial=_stub_trials({1e-3: 5.0}, calls))  # fmt: skip
    assert calls[4:] == [(1e-3, 20, 0, ["train"], 5)]  # a new optimizer setting: trials of its own


def test_an_interrupted_trial_continues_from_its_newest_checkpoint(tmp_path):
    """A trial killed after a checkpoint resumes it (with resume set to it, where its run continues exactly, as
    train.py's kill tests check), one killed before its first is cleared and trained afresh; a finished one is
    reused. Before, an interrupted trial was deleted, checkpoints and all, and trained again from its first step."""
    import torch

    from kvlab.recipes.lr_sweep import sweep_key

    cfg = _cfg(tmp_path, **{"lr_sweep.grid": [1e-3, 3e-3]})
    root = tmp_path / "cache" / "lr_sweeps" / sweep_key(cfg)
    (root / "lr-0.001" / "checkpoints").mkdir(parents=True)
    saved = {"global_step": 5, "loops": {}, "hyper_parameters": {}}  # what resuming reads of a Lightning file
    torch.save(saved, root / "lr-0.001" / "checkpoints" / "step000005.ckpt")
    (root / "lr-0.001" / "checkpoints" / "last.ckpt").write_bytes(b"")  # torn: the one before it is taken
    (root / "lr-0.003" / "logs").mkdir(parents=True)  # killed before its first checkpoint
    resumes = []

    def trial(cfg, run_dir):
        resumes.append((cfg.optim.lr, cfg.resume, sorted(p.name for p in run_dir.glob("*"))))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"val_loss": 5.0}))

    def then(cfg, run_dir):
        run_dir.mkdir()
        return {}

    run_lr_sweep(cfg, tmp_path / "run", then=then, trial=trial)
    ckpt = str(root / "lr-0.001" / "checkpoints" / "step000005.ckpt")
    assert resumes == [(1e-3, ckpt, ["checkpoints"]), (3e-3, None, [])]
    run_lr_sweep(cfg, tmp_path / "again", then=then, trial=trial)
    assert len(resumes) == 2  # both finished: reused


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lr_sweep.grid": [1e-3, -1.0]}, r"lr_sweep.grid=\[0.001, -1.0\]: every learning rate must be > 0"),
        ({"lr_sweep.steps": 0}, "lr_sweep.steps=0 must be >= 1"),
        ({"stages": ["eval"]}, r"stages=\['eval'\] does not train"),
        ({"trainer.devices": 2, "trainer.strategy": "ddp"}, "the sweep runs in one process"),
    ],
)
def test_bad_sweeps_are_named(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        run_lr_sweep(_cfg(tmp_path, **changes), tmp_path / "run", then=None, trial=None)


def test_iso_flops_sets_the_mlp_width_for_the_flops_per_token():
    from kvlab.archs import ModelConfig
    from kvlab.recipes.module import training_flops
    from kvlab.recipes.run import _with_flops
    from tests.conftest import tiny

    tc = TrainConfig(iso_flops=3_000_000)
    tc.data.seq_len = 32
    for model in (tiny(), tiny(mixer={"kind": "mla", "n_heads": 4}), tiny(mixer={"kind": "retention", "n_heads": 4})):
        scaled = _with_flops(ModelConfig.from_dict(model), tc)
        per_token = training_flops(scaled, 1, 32) / 32
        unit = (
            training_flops(ModelConfig.from_dict(model | {"mlp": {"kind": "swiglu", "hidden": 16}}), 1, 32)
            - training_flops(ModelConfig.from_dict(model | {"mlp": {"kind": "swiglu", "hidden": 8}}), 1, 32)
        ) / 32
        assert abs(per_token - 3_000_000) <= unit / 2 + 1  # the nearest multiple of 8 hidden units
    with pytest.raises(ValueError, match="this model's FLOPs cannot be counted"):
        _with_flops(ModelConfig.from_dict(tiny(mlp={"kind": "moe", "hidden": 16, "n_experts": 4, "top_k": 2})), tc)
    with pytest.raises(ValueError, match="iso_flops=3000000 and iso_params=10: both set the MLP's width"):
        _with_flops(ModelConfig.from_dict(tiny()), TrainConfig(iso_flops=3_000_000, iso_params=10))


def test_iso_cache_scales_each_mixers_cache_width_to_the_bytes_per_token():
    """Attention's head_dim (its RoPE and value widths with it), MLA's latent and Mamba-2's state, scaled by one
    factor; cross-layer sharing keeps its saving (the reading layers hold nothing)."""
    import torch

    from kvlab.archs import ModelConfig
    from kvlab.archs.model import build_model
    from tests.conftest import preset_dict, tiny

    def per_token(config, context=64):
        with torch.device("meta"):
            return build_model(config).kv_footprint(torch.bfloat16).total_bytes(context) / context

    gqa = ModelConfig.from_dict(tiny())  # 4 layers x K,V x 2 heads x 16 x 2 bytes = 512 bytes per token
    half = gqa.with_cache(256, 64)
    assert per_token(half) == 256 and {(m.head_dim, m.rope_dims, m.v_head_dim) for m in half.layer_mixers} == {
        (8, 8, 8)
    }
    cla = ModelConfig.from_dict(
        tiny(kv_sharing={"kind": "cla", "every": 2})
    )  # half the layers hold K/V: twice the head width
    assert {m.head_dim for m in cla.with_cache(512, 64).layer_mixers} == {32}
    mla = ModelConfig.from_dict(tiny(mixer={"kind": "mla", "n_heads": 4}))  # latent 64 + RoPE key 8 per layer
    assert [m.kv_lora_rank for m in mla.with_cache(4 * 2 * (40 + 8), 64).layer_mixers] == [40] * 4
    for ssm in ({"kind": "mamba2", "head_dim": 16}, {"kind": "mamba"}):  # Mamba-2's and Mamba-1's state
        mamba = ModelConfig.from_dict(tiny(mixer=ssm))
        target = per_token(mamba) * 2
        assert abs(per_token(mamba.with_cache(target, 64)) - target) < 0.01 * target, ssm["kind"]
    recurformer = ModelConfig.from_dict(preset_dict("recurformer"))  # both widths, one factor
    scaled = recurformer.with_cache(1_000, 2048)
    attention, ssm = scaled.layer_mixers[0].mixers
    assert attention.head_dim < 32 and ssm.state_dim < 16 and abs(per_token(scaled, 2048) - 1_000) < 50
    with pytest.raises(ValueError, match=r"mixers.F is a parallel layer whose branches are averaged .* ties their"):
        ModelConfig.from_dict(preset_dict("hymba")).with_cache(300, 2048)
    with pytest.raises(ValueError, match="iso_cache=100: mixer is a rwkv7 mixer, whose cache kvlab does not scale"):
        ModelConfig.from_dict(tiny(mixer={"kind": "rwkv7"}, mlp={"kind": "rwkv_channel_mix", "hidden": 96})).with_cache(
            100, 64
        )
