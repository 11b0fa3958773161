"""The locks of a teacher cache entry (pipeline.cache): flock, so the kernel drops them when
their holder dies, kill -9 included, and a lock never outlives its owner.

``shard-NNNNN.lock`` (non-blocking): held while a process scores that shard; another process
skips the shard. ``cache.lock`` (blocking): exclusive to rewrite a shard file or the manifest,
shared to read them, so no reader sees a manifest and shards from different moments.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ENTRY_LOCK = "cache.lock"


def shard_name(shard: int) -> str:
    """The zero-padded stem of shard ``shard``'s files: shard-00042."""
    return f"shard-{shard:05d}"


@contextlib.contextmanager
def shard_lock(path: Path, shard: int) -> Iterator[bool]:
    """Yield True while this process holds the shard's lock, False if another process does.

    flock is released by the kernel when its holder dies (kill -9 included), so a lock never
    outlives its owner.
    """
    fd = os.open(path / f"{shard_name(shard)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _open_lock(lock: Path, shared: bool) -> int | None:
    """A descriptor to flock ``lock`` with, or None for a reader of a cache it cannot write."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
    try:
        return os.open(lock, os.O_RDONLY)
    except OSError:
        # A read-only cache without a lock file (another user's, a read-only mount): nobody can
        # write it either, so reading it unlocked is safe.
        log.info("%s cannot be created: reading the cache without its lock", lock)
        return None


@contextlib.contextmanager
def entry_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold the entry's lock: exclusive to rewrite a shard or the manifest, shared to read them.

    Blocking; exclusive holders only rename files and hash shards, so waits are short. Never
    nest it in one process: flock treats each open of the file as another owner.
    """
    fd = _open_lock(Path(path) / ENTRY_LOCK, shared)
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
