"""The KV-cache footprint report of any model config, built on the meta device (no memory, no time).

    python -m kvlab.footprint model=gqa [model.n_layers=32 ...] [--dtype bf16] [--budget 80GiB]
                              [--context 32768] [--json report.json]
    python -m kvlab.footprint --hf path/to/hf-dir    # a Hugging Face model as load_hf would import it

The model is composed exactly as ``train.py`` composes it (the same Hydra
tree and overrides), so any preset, reference config
(``model=reference/llama3_8b``) or override works; ``--hf`` takes a Hugging
Face directory (or its ``config.json``) instead, translated as ``load_hf``
imports it, its weights unread. Prints a per-layer table
and the totals: bytes per token, fixed bytes, the cache at 2K / 32K / 128K /
1M tokens, the bytes one decode step reads there (cross-layer sharing
stores once but every reader reads), and with ``--budget`` the largest batch
whose caches fit at ``--context`` tokens. ``--json`` writes the same as JSON
(``-`` for standard output).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvlab._io import atomic_write_text
from kvlab.archs import ModelConfig, build_model
from kvlab.archs.footprint import human
from kvlab.layers.cache_policy import policy_option

CONTEXTS = (2048, 32768, 131072, 1048576)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """'80GiB', '512 MB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"--budget={text!r} is not a size; write e.g. 80GiB, 512MB or 1e9 (B, KB..TB, KiB..TiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def compose_model_config(overrides: list[str]) -> ModelConfig:
    """The ``model`` node ``train.py`` would compose with these overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kvlab._config import config_dir
    from kvlab.recipes.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def footprint_report(
    config: ModelConfig,
    dtype: torch.dtype = torch.bfloat16,
    contexts: tuple[int, ...] = CONTEXTS,
    budget: int | None = None,
    context: int = 32768,
    policy=None,
) -> dict[str, Any]:
    """Everything the report shows, as plain data (what ``--json`` writes); K/V held through the cache
    ``policy`` (``kvlab.layers.cache_policy``) when one is given."""
    with torch.device("meta"):
        model = build_model(config)
    fp = model.kv_footprint(dtype, policy)
    report = {
        "dtype": str(dtype).removeprefix("torch.") + (f", K/V {fp.policy}" if fp.policy else ""),
        "params": model.num_parameters(),
        "bytes_per_token": fp.bytes_per_token,
        "fixed_bytes": fp.fixed_bytes,
        "layers": [{k: v for k, v in asdict(r).items() if k != "held"} for r in fp.per_layer],
        "total_bytes": {str(n): fp.total_bytes(n) for n in contexts},
        "read_bytes_per_decode_step": {str(n): fp.read_bytes_per_step(n) for n in contexts},
    }
    if budget is not None:
        report["budget"] = {"bytes": budget, "context": context, "max_batch_size": fp.max_batch_size(budget, context)}
    return report


def render(report: dict[str, Any], console: Console) -> None:
    layers = Table(title=f"KV cache per layer, one sequence ({report['dtype']})")
    for name in ("layer", "kind", "bytes/token", "fixed bytes", "window", "kv_source"):
        layers.add_column(name, justify="left" if name == "kind" else "right")
    for r in report["layers"]:
        window = "-" if r["max_tokens"] is None else f"{r['max_tokens']:,}"
        per = f"{r['bytes_per_token']:,}"
        if r.get("per_tokens", 1) > 1:  # a Block Transformer's block decoder: one entry per block
            per += f" per {r['per_tokens']} tokens"
        layers.add_row(str(r["layer"]), r["kind"], per, f"{r['fixed_bytes']:,}", window, str(r["kv_source"]))
    console.print(layers)
    totals = Table(title=f"Totals: {report['bytes_per_token']:,} B/token + {report['fixed_bytes']:,} B fixed, "
                         f"{report['params']:,} parameters")  # fmt: skip
    for name in ("context", "cache held", "read per decode step"):
        totals.add_column(name, justify="right")
    for n, held in report["total_bytes"].items():
        totals.add_row(f"{int(n):,}", human(held), human(report["read_bytes_per_decode_step"][n]))
    console.print(totals)
    if "budget" in report:
        b = report["budget"]
        fits = "any batch (no cache)" if b["max_batch_size"] < 0 else f"batch {b['max_batch_size']:,}"
        console.print(f"Budget {human(b['bytes'])} at {b['context']:,} tokens: {fits}")


def main(argv: list[str] | None = None, prog: str = "python -m kvlab.footprint") -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py: model=NAME, model.x=...")
    parser.add_argument("--hf", help="a Hugging Face model directory (or its config.json) instead of a model config: "
                        "its footprint as load_hf imports it (no weights read)")  # fmt: skip
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="the cache's dtype")
    parser.add_argument("--budget", help="memory for caches, e.g. 80GiB: report the largest batch that fits")
    parser.add_argument("--context", type=int, default=32768, help="tokens per sequence for --budget")
    parser.add_argument("--json", help="also write the report as JSON to this file ('-': standard output)")
    parser.add_argument("--policy", help="a cache policy: int8, int4, fp8, kivi, or a JSON mapping such as "
                                         '\'{"kind": "kivi", "bits": 4}\'')  # fmt: skip
    args = parser.parse_args(argv)
    from kvlab._config import config_dir
    from kvlab.recipes.config import choice_problem

    try:
        problem = choice_problem(args.overrides, config_dir())
        if problem is not None:
            raise ValueError(problem)
        budget = parse_bytes(args.budget) if args.budget is not None else None
        if args.context < 1:
            raise ValueError(f"--context={args.context} must be >= 1")
        policy = policy_option(args.policy, "--policy")
        if args.hf is not None:
            if args.overrides:
                raise ValueError(f"--hf gives the model; the overrides {' '.join(args.overrides)} would be ignored")
            from kvlab.archs.hf import hf_model_config

            config = hf_model_config(args.hf)[0]
        else:
            config = compose_model_config(args.overrides)
        report = footprint_report(config, DTYPES[args.dtype], budget=budget, context=args.context, policy=policy)
    except Exception as e:  # config mistakes: one line naming the field, as train.py does
        if not isinstance(e, (ValueError, FileNotFoundError)) and type(e).__module__.split(".")[0] not in (
            "hydra", "omegaconf"):  # fmt: skip
            raise
        print(f"kvlab: error: {e}", file=sys.stderr)
        sys.exit(1)
    render(report, Console(file=sys.stdout if args.json != "-" else sys.stderr))
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
    elif args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
