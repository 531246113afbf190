"""kvlab._io: files are replaced whole or not at all, and only kvlab's own leftovers are cleaned."""

import os
import subprocess
import sys

import pytest

from kvlab._io import atomic_path, atomic_write_text, remove_orphans, temp_path


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            fail(tmp)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


def test_the_temporary_is_beside_the_target_whatever_tmpdir_says(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", "/nonexistent")  # a rename within one directory never crosses filesystems
    with atomic_path(tmp_path / "last.ckpt") as tmp:
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "last.ckpt").read_bytes() == b"x"


def test_only_temporaries_of_dead_kvlab_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".last.ckpt.kvlab-tmp-{dead_pid}"
    orphan.write_bytes(b"half")
    orphan_dir = tmp_path / f".hf.kvlab-tmp-{dead_pid}"
    orphan_dir.mkdir()
    (orphan_dir / "model.safetensors").write_bytes(b"half")
    live = temp_path(tmp_path / "step000010.ckpt")  # this process: still writing
    live.write_bytes(b"busy")
    users = [tmp_path / "last.ckpt.tmp", tmp_path / f"notes.kvlab-tmp-{dead_pid}", tmp_path / "hf.partial"]
    for f in users:
        f.write_text("mine")
    assert sorted(remove_orphans(tmp_path)) == sorted([orphan, orphan_dir])
    assert live.exists() and all(f.read_text() == "mine" for f in users)
