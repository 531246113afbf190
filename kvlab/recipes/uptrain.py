"""Staged uptraining (``recipe=gqa_uptrain``, ``recipe=mqa_uptrain``), after Ainslie et al. 2023.

1. parent: ``init.path`` if given (a kvlab checkpoint or a Hugging Face
   directory); otherwise an MHA parent trained for ``uptrain.parent_steps``
   on the configured data, cached under ``$KVLAB_CACHE/parents/`` keyed by
   everything that shapes it, so later runs (and other recipes) reuse it;
   a parent interrupted mid-training resumes from its last checkpoint;
2. evaluate the parent;
3. convert it as ``init.convert`` says (default GQA with n_heads/4 K/V heads,
   mean-pooled) and evaluate with no training;
4. uptrain the converted model for ``uptrain.alpha`` of the parent's training
   tokens (or ``uptrain.steps``) and evaluate;
5. with ``uptrain.compare_scratch``, train the converted architecture from
   scratch on the same budget: the paper's comparison.

Each stage is an ordinary run (``kvlab.recipes.run.run``) in a subdirectory
of the recipe's run directory, with its own checkpoints, logs and
metrics.json. The recipe's metrics.json holds the uptrained model's metrics
at the top level and one section per stage. A killed recipe continues with
``resume=auto``, stage by stage (``_resumed``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kvlab._config import differences
from kvlab._io import atomic_write_text
from kvlab.recipes.config import TrainConfig
from kvlab.recipes.data import default_cache_dir, tokenizer_to_use
from kvlab.recipes.run import (
    ConfigError,
    _hydra_run,
    _write_json,
    conversion_spec,
    newest_checkpoint,
    run,
    training_identity,
    unfinished_cached_run,
)

log = logging.getLogger("kvlab")

STAGE_KEYS = ("val_loss", "val_ppl", "kv_bytes_per_token", "steps", "tokens_seen", "val_loss_without_context")


def run_uptrain(cfg: DictConfig, run_dir: Path) -> dict:
    tc: TrainConfig = OmegaConf.to_object(cfg)
    up = tc.uptrain
    _check(tc)
    init = dict(tc.init)
    source = init.get("from", "scratch")
    convert = conversion_spec(init.get("convert") or {"to": "gqa", "method": "mean"})
    cfg = copy.deepcopy(cfg)
    resume, cfg.resume = cfg.resume, None  # the stages' own, below
    runs = Path(tc.output_root) / tc.run_name
    if source == "hf" and not cfg.data.tokenizer:  # every stage reads the data with the parent's tokenizer
        cfg.data.tokenizer = str(init["path"])

    # 1-2. the parent, and how many tokens it was trained on (None for an HF directory)
    if source == "scratch":
        parent_init, parent_tokens = _cached_parent(cfg)
    else:
        parent_init = {"from": source, "path": str(init["path"]), "convert": None}
        parent_tokens = _checkpoint_tokens(Path(init["path"])) if source == "checkpoint" else None
    beside = Path(parent_init["path"]).expanduser().parent / "tokenizer.json"
    if parent_init["from"] == "checkpoint" and beside.is_file():  # the scratch baseline reads the same tokens
        cfg.data.tokenizer = tokenizer_to_use(OmegaConf.to_object(cfg.data), beside)
    # validation only, unless the run's stages ask for the evaluations too (as they then do in every stage)
    parent = _stage(cfg, run_dir / "parent", "parent evaluation", init=parent_init,
                    stages=["eval"] if "eval" in cfg.stages else [], **_resumed(resume, runs, run_dir, "parent", None),
                    **PLAIN_TRAINING, **PLAIN_ROWS)  # fmt: skip
    if parent_tokens is not None:
        parent["tokens_seen"] = parent_tokens
    convert = _resolve_convert(convert, parent["model"])

    # 3-4. convert, then uptrain; the uptraining run's first validation is the converted model's quality
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate_grad_batches
    if up.steps is not None:
        steps = up.steps
    else:
        budget = parent_tokens if parent_tokens is not None else up.parent_steps * tokens_per_step
        if parent_tokens is None:
            log.info("uptrain: the HF parent's training tokens are unknown; alpha applies to parent_steps")
        steps = max(1, round(up.alpha * budget / tokens_per_step))
    warmup = up.warmup_steps if up.warmup_steps is not None else steps // 10
    schedule = {"trainer.max_steps": steps, "optim.warmup_steps": warmup}
    peak = {"optim.lr": up.lr} if up.lr is not None else {}  # a converted model may want a gentler step
    init_uptrained = {**parent_init, "convert": convert}
    uptrained = _stage(cfg, run_dir / "uptrained", init=init_uptrained, **schedule, **peak,
                       **_resumed(resume, runs, run_dir, "uptrained", init_uptrained))  # fmt: skip
    converted = {
        "val_loss": uptrained["initial_val_loss"],
        "val_ppl": math.exp(min(uptrained["initial_val_loss"], 50.0)),
        "kv_bytes_per_token": uptrained["kv_bytes_per_token"],
    }

    # 5. the same architecture and budget from scratch
    scratch = None
    if up.compare_scratch:
        init_scratch = {"from": "scratch", "path": None, "convert": None}
        scratch = _stage(cfg, run_dir / "scratch", init=init_scratch, model=uptrained["model"], **schedule,
                         **_resumed(resume, runs, run_dir, "scratch", init_scratch), **PLAIN_TRAINING)  # fmt: skip

    metrics = {k: v for k, v in uptrained.items() if k != "initial_val_loss"}
    metrics["convert"] = convert
    metrics["parent"] = _section(parent) | {"init": parent_init}
    metrics["converted"] = converted
    metrics["uptrained"] = _section(uptrained)
    if scratch is not None:
        metrics["scratch"] = _section(scratch)
    _write_json(run_dir / "metrics.json", metrics)
    print(table(metrics))
    return metrics


def _check(tc: TrainConfig) -> None:
    up, t = tc.uptrain, tc.trainer
    if t.strategy != "auto" or t.devices not in (1, "1") or t.num_nodes != 1:
        raise ConfigError(
            f"trainer.strategy={t.strategy}, devices={t.devices}: the staged uptraining recipes run in one process; "
            "on several devices run the stages as separate runs (init.from=checkpoint with init.convert)"
        )
    if tc.resume not in (None, "", "none", "auto"):
        raise ConfigError(
            f"resume={tc.resume!r}: an uptraining recipe resumes with resume=auto, each stage from its own newest "
            "checkpoint (a checkpoint path names one stage's; train it on with init.from=checkpoint)"
        )
    if up.parent_steps < 1:
        raise ConfigError(f"uptrain.parent_steps={up.parent_steps} must be >= 1")
    if not 0 < up.alpha <= 1:
        raise ConfigError(f"uptrain.alpha={up.alpha} must be in (0, 1]: a fraction of the parent's tokens")
    if up.steps is not None and up.steps < 1:
        raise ConfigError(f"uptrain.steps={up.steps} must be >= 1 (or null to use uptrain.alpha)")
    if up.warmup_steps is not None and up.warmup_steps < 0:
        raise ConfigError(f"uptrain.warmup_steps={up.warmup_steps} must be >= 0")
    if up.lr is not None and not up.lr > 0:
        raise ConfigError(f"uptrain.lr={up.lr} must be > 0 (or null: optim.lr)")
    source = dict(tc.init).get("from", "scratch")
    if source != "scratch" and not dict(tc.init).get("path"):
        raise ConfigError(f"init.from={source} needs init.path (the parent to uptrain)")


def _resolve_convert(convert: dict | list[dict], parent_model: dict) -> dict | list[dict]:
    """Fill the default head counts (n_heads / 4: GQA's n_kv_heads, DHA's n_k_heads and n_v_heads) from the
    parent's attention (of a chain, its first conversion's: the later ones convert another model)."""
    if isinstance(convert, list):
        return [_resolve_convert(convert[0], parent_model), *convert[1:]] if convert else convert
    names = {"gqa": ["n_kv_heads"], "dha": ["n_k_heads", "n_v_heads"]}.get(convert.get("to"), [])
    missing = [name for name in names if convert.get(name) is None]
    if not missing:
        return convert
    # one mixer, or a pattern of attention mixers with one head layout (Gemma 2/3's windowed and full layers)
    mixers = [parent_model.get("mixer")] + list((parent_model.get("mixers") or {}).values())
    mixers = [m for m in mixers if m]
    if mixers and not any(m.get("kind") == "attention" for m in mixers):  # (a Mamba parent: nothing to group)
        kinds = ", ".join(sorted({str(m.get("kind")) for m in mixers}))
        raise ConfigError(f"init.convert.to={convert['to']}: the parent has no attention layers (its mixers: {kinds}), "
                          "so no heads to group; convert a parent with attention")  # fmt: skip
    heads = {(m.get("n_heads"), m.get("n_kv_heads") or m.get("n_heads")) for m in mixers}
    if not mixers or any(m.get("kind") != "attention" for m in mixers) or len(heads) != 1:
        raise ConfigError(f"init.convert.{missing[0]}: the parent's layers are not attention with one number of "
                          f"heads; give {missing[0]}")  # fmt: skip
    ((n_heads, n_kv_heads),) = heads
    n_kv = max(1, n_heads // 4)
    if convert["to"] == "gqa" and n_kv_heads % n_kv:  # DHA's clusters need not be equal
        raise ConfigError(
            f"init.convert.n_kv_heads: the default n_heads/4={n_kv} does not divide the parent's "
            f"n_kv_heads={n_kv_heads}; give init.convert.n_kv_heads"
        )
    return {**convert, **dict.fromkeys(missing, n_kv)}


# distill and optim.trainable are the uptraining's: the parent and the scratch baseline train on the labels,
# every parameter
PLAIN_TRAINING = {"distill": False, "optim.trainable": None}
# data.context is the converted model's (a context encoder added by init.convert.to=context): the parent, which
# has none, trains and is evaluated on plain rows
PLAIN_ROWS = {"data.context": 0}


def _stage(cfg: DictConfig, stage_dir: Path, name: str | None = None, **changes) -> dict:
    """Run one stage: ``cfg`` with dotted-key ``changes``, writing into ``stage_dir``."""
    stage_cfg = copy.deepcopy(cfg)
    stage_cfg.uptrain = None
    for key, value in changes.items():
        OmegaConf.update(stage_cfg, key, value, merge=False)
    log.info("uptrain: stage %s in %s", name or stage_dir.name, stage_dir)
    return run(stage_cfg, stage_dir)


def _resumed(resume: str | None, runs: Path, run_dir: Path, stage: str, init: dict | None) -> dict:
    """The ``resume`` of ``stage`` in a recipe run with ``resume`` (None or auto). A sweep's job continued over
    its sweep directory continues each stage in its own directory (a finished one is kept, a killed one resumes
    there); otherwise a training stage continues the newest checkpoint of that stage in an earlier run of this
    ``run_name`` (under ``runs``) and writes into this run's directory, as ``resume=auto`` does for a plain run.
    The parent's evaluation, which trains nothing, runs again. A checkpoint of a stage that started from another
    ``init`` (another parent, or conversion) is refused: its run is another recipe's, though its model may be the
    same."""
    if resume != "auto":
        return {"resume": None}
    if _hydra_run().get("sweep"):
        return {"resume": "auto"}
    if stage == "parent":
        return {"resume": None}
    path = newest_checkpoint(runs, f"*/{stage}/checkpoints/*.ckpt", but_not=run_dir)
    saved = Path(path).parent / "config.yaml" if path is not None else None
    if saved is not None and saved.is_file():
        theirs = OmegaConf.to_container(OmegaConf.load(saved).init)
        found = differences(init, {k: theirs.get(k) for k in init}, "init")
        if found:
            raise ConfigError(
                f"resume=auto: {path} is of a recipe run from another start ({'; '.join(found[:4])}: this run vs "
                "that one); run it without resume, or with that run's settings"
            )
    return {"resume": path}


def _cached_parent(cfg: DictConfig) -> tuple[dict, int]:
    """Train the parent (``model`` from scratch) or reuse the cached one; its init and training tokens."""
    identity = training_identity(cfg) | {"seed": cfg.seed, "steps": cfg.uptrain.parent_steps}
    del identity["data"]["context"]  # the converted model's rows (PLAIN_ROWS): the parent trains on plain ones
    del identity["optim"]["trainable"]  # which parameters the uptraining trains: the parent trains them all
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    parent_dir = Path(cfg.data.cache_dir or default_cache_dir()) / "parents" / key
    ckpt = parent_dir / "checkpoints" / "last.ckpt"
    if (parent_dir / "DONE").exists():
        log.info("uptrain: reusing the parent trained in %s", parent_dir)
    else:
        # An interrupted parent continues from its newest checkpoint rather than starting over.
        resume = unfinished_cached_run(parent_dir, "uptrain: the parent")
        _stage(
            cfg,
            parent_dir,
            "parent training",
            init={"from": "scratch", "path": None, "convert": None},
            resume=resume,
            stages=["train"],
            **{"trainer.max_steps": cfg.uptrain.parent_steps},
            **PLAIN_TRAINING,
            **PLAIN_ROWS,
        )
        atomic_write_text(parent_dir / "DONE", json.dumps(identity, indent=2, sort_keys=True) + "\n")
    tokens = json.loads((parent_dir / "metrics.json").read_text())["tokens_seen"]
    return {"from": "checkpoint", "path": str(ckpt), "convert": None}, tokens


def _checkpoint_tokens(ckpt: Path) -> int | None:
    """Training tokens of a kvlab checkpoint: its run's metrics.json, when it sits in a run directory."""
    metrics = ckpt.expanduser().resolve().parent.parent / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text()).get("tokens_seen")
    return None


def _section(metrics: dict) -> dict:
    return {k: metrics[k] for k in STAGE_KEYS if k in metrics}


def table(metrics: dict) -> str:
    """The stages side by side, as printed at the end of the recipe."""
    rows = [("stage", "val loss", "val ppl", "KV bytes/token (bf16)", "train tokens")]
    for name in ("parent", "converted", "uptrained", "scratch"):
        if name in metrics:
            m = metrics[name]
            tokens = m.get("tokens_seen")
            rows.append(
                (
                    name,
                    f"{m['val_loss']:.4f}",
                    f"{m['val_ppl']:.2f}",
                    f"{m['kv_bytes_per_token']:,}" if "kv_bytes_per_token" in m else "",
                    f"{tokens:,}" if tokens is not None else ("0" if name == "converted" else "?"),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
