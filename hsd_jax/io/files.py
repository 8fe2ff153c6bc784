"""The one atomic writer: a file or a directory appears whole at its path, or not at all.

Files are written to a fresh, randomly named sibling created with `O_EXCL` (so a planted symlink
or file is never followed or reused), then renamed over the destination. Directories are built
in a fresh sibling and swapped in; an existing directory is replaced only once the new one is
complete, and a crash at any point leaves either the old or the new directory at the path (on
Linux the swap is one atomic `renameat2(RENAME_EXCHANGE)`; elsewhere it is two renames, and the
next write to the path puts the old directory back if a crash fell between them). Whatever a
killed run left beside the path (`.NAME.tmp-*`, `.NAME.old-*`) is removed by the next write.

`check_output_file` / `check_output_dir` refuse a bad output path before a long run starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def check_output_file(path: str | os.PathLike) -> Path:
    """`path` if a file can be written there: not a directory, and not below a file. A symbolic
    link at `path` is replaced by the file, never followed."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"{path} is a directory; give the path of a file to write")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK) and parent == path.absolute().parent:
                raise PermissionError(f"cannot write {path}: the directory {parent} is not writable")
            break
    return path


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute `out_dir` if `atomic_directory` may write it; raise FileExistsError otherwise
    (a link, a file, or a non-empty directory without `overwrite`)."""
    out = Path(out_dir).absolute()
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link{'' if out.exists() else ' (dangling)'}; give a real "
                              "directory path (hsd-jax never writes through a link)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; give another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite (overwrite=True "
                              "from Python) to replace it, or give another output path")
    check_output_file(out / "x")  # its nearest existing parent is a writable directory
    return out


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


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
    """Remove what an interrupted earlier write to `path` left beside it. A previous directory that
    a crash left moved aside (`.NAME.old-*`, with nothing at `path`) is first put back."""
    if not path.exists() and not path.is_symlink():
        olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds and olds[-1].is_dir() and not olds[-1].is_symlink():
            os.rename(olds[-1], path)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    check_output_dir(out, overwrite)
    tmp = fresh_sibling_dir(out)
    try:
        yield tmp
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):  # one atomic step: `out` is the new directory, `tmp` the old one
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = _sibling_name(out, "old")
            os.rename(out, old)  # a crash between these renames leaves `old`, which the next
            os.rename(tmp, out)  # write to `out` puts back (`remove_stale_siblings`)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
