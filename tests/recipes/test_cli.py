"""The ``kvlab`` command: what it dispatches to, and the wheel a user installs, run from an empty directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from kvlab import cli
from tests.conftest import REPO, preset_dict
from tests.recipes.test_train import TINY_MODEL, TINY_RUN


def test_usage_and_unknown_commands_exit_with_their_status(capsys):
    for argv, status in (([], 2), (["--help"], 0), (["trian"], 2)):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == status
    out, err = capsys.readouterr()
    assert "usage: kvlab COMMAND" in out and all(name in out for name in cli.COMMANDS)
    assert "kvlab: error: unknown command 'trian'; one of train, eval, export, lm-eval, footprint, generate" in err


def test_eval_and_export_are_their_recipes_with_the_overrides_after_it(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "train", calls.append)
    cli.main(["train", "model=mqa"])
    cli.main(["eval", "ckpt=a.ckpt", "data=mqar"])
    cli.main(["export", "ckpt=a.ckpt"])
    assert calls == [["model=mqa"], ["recipe=eval", "ckpt=a.ckpt", "data=mqar"], ["recipe=export", "ckpt=a.ckpt"]]


def test_generate_names_what_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", str(tmp_path / "nothing.ckpt"), "--prompt", "x"])
    assert exit_info.value.code == 1 and "nothing.ckpt: nothing there" in capsys.readouterr().err
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit):
        cli.main(["generate", str(tmp_path / "last.ckpt"), "--prompt", "x"])
    assert "tokenizer.json: no tokenizer beside the checkpoint" in capsys.readouterr().err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(["generate", str(tmp_path / "hf"), "--prompt", "x"])
    assert "hf: no tokenizer.json in this Hugging Face directory" in capsys.readouterr().err
    for policy, message in [("zip", "cache policy kind='zip' is not one of none, int8"),
                            ("{kind: kivi}", "--cache-policy '{kind: kivi}' is not a JSON mapping")]:  # fmt: skip
        with pytest.raises(SystemExit):  # named before the checkpoint is read
            cli.main(["generate", str(tmp_path / "nothing.ckpt"), "--prompt", "x", "--cache-policy", policy])
        assert message in capsys.readouterr().err


def test_generate_samples_each_prompt_as_it_samples_alone(monkeypatch, capsys):
    """Several prompts are one batch; with --seed each draws from its own generator, so its text is its text alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from kvlab import build_model
    from tests.archs.test_decode import VARIANTS

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # bytes as single tokens: any text encodes
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    model = build_model({**VARIANTS["gqa"], "vocab_size": 256}).eval()
    monkeypatch.setattr(cli, "load_trained", lambda path: (model, tokenizer))

    def printed(*prompts):
        args = [
            "generate",
            "last.ckpt",
            "--temperature",
            "1.5",
            "--top-p",
            "0.9",
            "--seed",
            "4",
            "--max-new-tokens",
            "9",
        ]
        cli.main([*args, *(a for p in prompts for a in ("--prompt", p))])
        return capsys.readouterr().out

    assert printed("def main(", "x = [1]") == printed("def main(") + "\n" + printed("x = [1]")


def test_the_wheel_installs_a_kvlab_command_that_works_from_an_empty_directory(tmp_path, data_cache):
    """Built from the repository's files, installed into a fresh venv (its dependencies from this one's
    site-packages, kvlab itself only from the wheel), then footprint, a 5-step train and generate."""
    pytest.importorskip("setuptools")  # the build backend, used without build isolation (offline)
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "kvlab", "configs"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(
            REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if name == "kvlab" else {})
        )
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source],
                   check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("kvlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"kvlab/{p.relative_to(REPO / 'kvlab')}" for p in (REPO / "kvlab").rglob("*.py")}
    shipped |= {f"kvlab/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert not shipped - names, sorted(shipped - names)  # every module (a new subpackage must be listed) and config
    assert any(n.endswith("entry_points.txt") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    # this venv's packages as plain path entries: its .pth files (the editable kvlab's finder) are not run
    (venv / site.removeprefix(str(venv) + "/") / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"])
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], check=True)
    kvlab = venv / "bin" / "kvlab"
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([python, "-c", "import kvlab; print(kvlab.__file__)"], cwd=empty, check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert where.startswith(site)
    script = "from kvlab import ModelConfig; print(ModelConfig.from_preset('mla').n_layers)"
    layers = subprocess.run([python, "-c", script], cwd=empty, check=True, capture_output=True, text=True).stdout
    assert layers == f"{preset_dict('mla')['n_layers']}\n"  # the presets ship with it

    def kvlab_run(*args):
        return subprocess.run([kvlab, *args], cwd=empty, check=True, capture_output=True, text=True, timeout=600)

    report = json.loads(kvlab_run("footprint", "model=gqa", "--json", "-").stdout)
    assert report["bytes_per_token"] == 6 * 2 * 2 * 32 * 2  # 6 layers x (K, V) x 2 K/V heads x 32 channels, bf16

    kvlab_run("train", *TINY_MODEL, *TINY_RUN, "trainer.max_steps=5", f"data.cache_dir={data_cache}")
    (run,) = (empty / "outputs" / "train").iterdir()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 5 and (run / "train.log").is_file()

    prompts = ("--prompt", "def main(", "--prompt", "x = [1, 2, 3]")  # of different lengths: one padded batch
    text = kvlab_run("generate", run / "checkpoints" / "last.ckpt", *prompts, "--max-new-tokens", "4")
    assert text.stdout.startswith("def main(") and "\n\nx = [1, 2, 3]" in text.stdout
    # a policy that takes no padded rows: each prompt alone
    sinks = ("--cache-policy", '{"kind": "sinks", "sinks": 1, "window": 3}')
    text = kvlab_run("generate", run / "checkpoints" / "last.ckpt", *prompts, "--max-new-tokens", "6", *sinks)
    assert text.stdout.startswith("def main(") and "\n\nx = [1, 2, 3]" in text.stdout
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]  # nothing else written where it ran


SWEEP_WORKER = """
import multiprocessing, pathlib, signal, sys, time
from kvlab import cli

class Stop(Exception):
    pass

def stop(*_):
    raise Stop

mark = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, stop)  # as Lightning's handler: the job ends after its step
multiprocessing.current_process().name = "LokyProcess-1"  # a joblib worker
cli._end_with_the_sweep(poll_s=0.05, grace_s=60)
print("watching", flush=True)
try:
    time.sleep(60)  # the job
except Stop:
    mark.write_text("stopped by SIGTERM")
cli._end_with_the_sweep()  # the next job handed to this worker starts
mark.write_text("went on with the next job")
"""


def _ended(pid: int) -> bool:
    try:  # gone, or a zombie its new parent has not reaped
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_parallel_sweeps_worker_ends_when_the_sweep_is_killed(tmp_path):
    import threading
    import time

    cli._end_with_the_sweep()  # not a worker: nothing is watched
    assert "kvlab-sweep-watch" not in [t.name for t in threading.enumerate()]
    mark = tmp_path / "mark"
    sweep = (  # starts the worker, waits until it watches, and exits as a killed sweep would
        "import subprocess, sys\n"
        f"w = subprocess.Popen([sys.executable, '-c', {SWEEP_WORKER!r}, {str(mark)!r}], stdout=subprocess.PIPE, "
        "text=True)\nprint(w.pid, flush=True)\nw.stdout.readline()\n"
    )
    out = subprocess.run([sys.executable, "-c", sweep], capture_output=True, text=True, timeout=60, cwd=REPO)
    worker = int(out.stdout)
    deadline = time.monotonic() + 30  # the grace is 60 s: ending sooner is the next job's check
    while not _ended(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ended(worker) and mark.read_text() == "stopped by SIGTERM"
