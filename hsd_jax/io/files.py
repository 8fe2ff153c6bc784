"""The one atomic writer: a file or a directory appears whole at its path, or not at all.

Files are written to a fresh, randomly named sibling created with `O_EXCL` (so a planted symlink
or file is never followed or reused), then renamed over the destination. Directories are built
in a fresh sibling and swapped in; an existing directory is replaced only once the new one is
complete, and a crash at any point leaves either the old or the new directory at the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_TAG = "tmp"


def _sibling_name(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(6)}")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (a new exclusive temporary sibling, then rename)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = _sibling_name(path, TMP_TAG)
        try:
            fd = os.open(tmp, flags, 0o644)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    return write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode())


def fresh_sibling_dir(path: Path, tag: str = TMP_TAG) -> Path:
    """Create a new empty directory `.NAME.TAG-XXXX` next to `path`."""
    while True:
        candidate = _sibling_name(path, tag)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def remove_stale_siblings(path: Path) -> None:
    """Remove what an interrupted earlier write to `path` left beside it."""
    for tag in (TMP_TAG, "old"):
        for stale in path.parent.glob(f".{path.name}.{tag}-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir`; on success it replaces `out_dir`.

    On any error (or interrupt) the temporary directory is removed and `out_dir` is untouched.
    An existing non-empty `out_dir` is refused unless `overwrite`. With `overwrite`, the old
    directory is moved aside only after the new one is complete, and removed after the swap.
    """
    out = Path(out_dir).absolute()
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; give a real directory path")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = fresh_sibling_dir(out)
    try:
        yield tmp
        if out.exists():
            old = _sibling_name(out, "old")
            os.rename(out, old)  # a crash here leaves `old` and `tmp`: the next run restores nothing
            os.rename(tmp, out)  # but removes both, so the path is missing only between two renames
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
