"""Crash-safe writes: a reader never sees a half-written file or directory.

Every output goes to a temporary name beside its final place, is fsynced, and is renamed into
place in one step (rename is atomic on POSIX within one filesystem). A crash leaves at most a
temporary name behind, which the next run ignores and removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def _tmp_name(path: Path) -> Path:
    # Hidden, unique per writer, and recognisable so stale leftovers can be cleaned up.
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def remove_stale_tmp(parent: Path, name: str) -> None:
    """Remove temporaries a crashed writer left for ``parent / name``."""
    if not parent.is_dir():
        return
    for leftover in parent.glob(f".{name}{TMP_MARK}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it is fsynced and renamed to ``path``.

    On an exception the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as key-sorted JSON to ``path`` atomically (same object, same bytes)."""
    write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
    )


def check_out(path: str | os.PathLike, overwrite: bool = False, expect: str | None = None) -> None:
    """Raise unless ``path`` can become an output dir: absent, or replaceable with ``overwrite``.

    ``expect`` names the file that marks this kind of output (e.g. dataset.json): an existing,
    non-empty directory without it is someone else's data and is never replaced.
    """
    path = Path(path)
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(
            f"cannot write '{path}': '{parent}' is a file, not a directory; choose another --out"
        )
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(
            f"output '{path}' already exists; choose another --out or pass --overwrite"
        )
    if not path.is_dir():
        raise FileExistsError(
            f"--overwrite: '{path}' is a file, not an output dir; not replacing it"
        )
    if expect and not (path / expect).exists() and any(path.iterdir()):
        raise FileExistsError(
            f"--overwrite: '{path}' holds no {expect}, so it is not an output of this command; "
            "not replacing it (choose another --out)"
        )


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, overwrite: bool = False, expect: str | None = None
) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` in one rename.

    ``path`` must not exist unless ``overwrite`` is set (then the old directory is replaced only
    once the new one is complete; ``expect`` as in :func:`check_out`). On an exception nothing at
    ``path`` changes.
    """
    path = Path(path)
    check_out(path, overwrite, expect)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent, path.name)
    tmp = _tmp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            # Move the old one aside first: a crash between the two renames leaves the old
            # output under a temporary name rather than a half state at `path`.
            old = _tmp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_sha256(obj: Any) -> str:
    """Hex sha256 of ``obj`` as JSON with sorted keys: the same for equal content, any key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (manifests record it, readers check it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
