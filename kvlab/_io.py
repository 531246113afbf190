"""Writing files so that a crash never leaves half of one, and cleaning up only what kvlab wrote.

Every file kvlab writes goes through :func:`atomic_write`: a temporary file
in the *same directory* (so the final ``os.replace`` is a rename on one
filesystem, never a copy), flushed and fsynced, renamed over the target,
and the directory fsynced so the rename itself survives a power cut. A
process killed at any instant leaves either the old file or the new one,
plus at most an orphaned temporary whose name says it is kvlab's:
``.<name>.kvlab-tmp-<pid>``. :func:`remove_orphans` deletes those whose
writer is no longer alive, and nothing else.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARK = ".kvlab-tmp-"
_ORPHAN = re.compile(r"^\..+\.kvlab-tmp-(\d+)$")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name kvlab writes ``path`` under before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, install: Callable[[Path, Path], object] = os.replace) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, it replaces ``path`` atomically.

    The block writes a file (or a directory) at the yielded path; its contents
    are fsynced, then ``install(tmp, path)`` moves it into place (a rename;
    a directory that exists needs a caller's ``install`` that sets it aside).
    On an error the temporary is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            for child in tmp.rglob("*"):
                if child.is_file():
                    with open(child, "rb+") as f:
                        os.fsync(f.fileno())
            _fsync_dir(tmp)
        install(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to write the file, then rename it over ``path`` (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_csv(path: str | os.PathLike, rows: list[dict], columns, ignore_extra: bool = False) -> None:
    """``rows`` under a header of ``columns``; with ``ignore_extra``, keys not in ``columns`` are left out."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore" if ignore_extra else "raise")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_orphans(directory: str | os.PathLike, pattern: re.Pattern = _ORPHAN) -> list[Path]:
    """Delete kvlab's temporaries in ``directory`` whose writing process is gone; return them.

    ``pattern`` matches a temporary's name, its first group the writer's pid."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for child in directory.iterdir():
        m = pattern.match(child.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
    return removed
