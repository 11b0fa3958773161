"""The teacher cache: one raw teacher score per unique (image, caption) pair, in N Parquet shards.

Layout of a cache entry ``DIR/<key>/`` (DESIGN 3)::

    key.json               what the key hashes (dataset fingerprint, teacher weights, preprocessing,
                           precision) in readable form, plus the shard count; written first
    shard-00000.parquet    schemas.SHARD_SCHEMA rows, sorted by (image_id, caption_id)
    shard-00000.json       completion marker: rows and sha256 of the shard file; written after it
    shard-00000.lock       held (flock) while a process scores that shard; the OS drops it on death
    cache.json             the manifest: every shard's rows and checksum; written last, once all
                           N shards are complete, by whichever worker finishes last

The candidate set is not part of the key: a re-mined candidate set only adds the missing pairs,
each to the shard its pair hashes to, so the shard count of a cache never changes. Teacher ranks
are not stored: they depend on each query's candidate list and are rebuilt from the scores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import atomic

CACHE_FORMAT = "cprd-teacher-cache"
CACHE_VERSION = 1
KEY_JSON = "key.json"
KEY_FIELDS = ("dataset_fingerprint", "teacher_weights_sha256", "preprocessing", "precision")
MANIFEST_JSON = "cache.json"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # dataset image id
        pa.field("caption_id", pa.int64(), nullable=False),  # dataset caption id
        pa.field("score", pa.float32(), nullable=False),  # raw ITM logit for "match", unsquashed
        pa.field("prob", pa.float32(), nullable=False),  # softmax match probability of the ITM head
    ]
)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def cache_key(fingerprint: str, teacher_identity: dict) -> tuple[str, dict]:
    """(key, the fields it hashes): everything that changes a teacher score, nothing else.

    The teacher is identified by its weights hash, not its path, so the same weights loaded from
    a moved directory reuse the cache; its spec is kept in the manifest for people to read.
    """
    fields = {
        "dataset_fingerprint": fingerprint,
        "teacher_weights_sha256": teacher_identity["weights_sha256"],
        "preprocessing": teacher_identity["preprocessing"],
        "precision": teacher_identity["precision"],
    }
    return atomic.json_sha256(fields)[:20], fields


def shard_of(image_ids: np.ndarray, caption_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard of each pair: a fixed integer hash (splitmix64) of the pair, modulo N."""
    with np.errstate(over="ignore"):
        x = (image_ids.astype(np.uint64) << np.uint64(32)) ^ caption_ids.astype(np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_shards)).astype(np.int64)


def open_cache(root: Path, fields: dict, key: str, num_shards: int, teacher: dict) -> Path:
    """Create (or check) the cache entry ``root/key``; return its path.

    An existing entry made with another shard count, or whose key file disagrees, is an error.
    """
    path = Path(root) / key
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": key,
        "num_shards": num_shards,
        **fields,
        "teacher": teacher,
    }
    key_file = path / KEY_JSON
    if key_file.is_file():
        have = json.loads(key_file.read_text())
        if have.get("num_shards") != num_shards:
            raise ValueError(
                f"cache '{path}' has {have.get('num_shards')} shards, --shards asks for "
                f"{num_shards}; the shard count of a cache never changes: pass --shards "
                f"{have.get('num_shards')}"
            )
        if any(have.get(k) != v for k, v in fields.items()):
            raise ValueError(
                f"cache '{path}' holds another dataset or teacher ({KEY_JSON} differs)"
            )
        return path
    path.mkdir(parents=True, exist_ok=True)
    atomic.write_json(key_file, meta)
    return path


def read_key(path: Path) -> dict:
    """The key.json of a cache entry; ValueError when ``path`` is not one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher cache '{path}' does not exist; create it with `cprd score-teacher`"
        )
    key_file = path / KEY_JSON
    if not key_file.is_file():
        hint = ""
        if (path / "candidates.json").is_file():
            hint = " (it is a candidates dir)"
        elif (path / "dataset.json").is_file():
            hint = " (it is a dataset dir)"
        elif any(p.joinpath(KEY_JSON).is_file() for p in path.iterdir() if p.is_dir()):
            hint = " (it is a cache root: pass one of its entries, see `cprd cache list`)"
        raise ValueError(
            f"'{path}' is not a teacher cache entry{hint}; pass the cache_path "
            "that `cprd score-teacher` printed"
        )
    try:
        meta = json.loads(key_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"'{key_file}' is corrupt ({e}); the entry cannot be trusted: delete '{path}' and "
            "run `cprd score-teacher` again"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"'{key_file}' is not a cprd teacher cache key file")
    return meta


def read_marker(path: Path, shard: int) -> dict | None:
    """The completion marker of a shard, or None when the shard is not complete."""
    marker = path / f"{shard_name(shard)}.json"
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None  # a marker is written atomically, so this is outside damage: redo the shard


def read_shard(path: Path, shard: int) -> pl.DataFrame | None:
    """A shard's rows if its file exists and is readable, else None."""
    f = path / f"{shard_name(shard)}.parquet"
    if not f.is_file():
        return None
    try:
        return pl.from_arrow(pq.read_table(f, schema=SHARD_SCHEMA))
    except (pa.ArrowInvalid, OSError):
        return None


def write_shard(path: Path, shard: int, rows: pl.DataFrame) -> dict:
    """Write a shard file atomically, then its marker; return the marker."""
    rows = rows.sort("image_id", "caption_id")
    table = pa.Table.from_pydict(
        {f.name: rows[f.name].to_numpy() for f in SHARD_SCHEMA}, schema=SHARD_SCHEMA
    )
    f = path / f"{shard_name(shard)}.parquet"
    with atomic.atomic_path(f) as tmp:
        pq.write_table(table, tmp)
    marker = {"shard": shard, "rows": rows.height, "sha256": atomic.file_sha256(f)}
    atomic.write_json(path / f"{shard_name(shard)}.json", marker)
    return marker


def check_cache_root(root: Path, flag: str = "cache dir") -> None:
    """ValueError when ``root`` is a file or another kind of cprd directory, not a cache root."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{flag} '{root}' is a file; pass a directory (the cache root)")
    kinds = {
        KEY_JSON: ("a teacher cache entry", f"pass its parent '{root.parent}'"),
        "dataset.json": ("a dataset dir", "pass the directory that holds the cache entries"),
        "candidates.json": ("a candidates dir", "pass the directory that holds the cache entries"),
    }
    for name, (kind, fix) in kinds.items():
        if (root / name).is_file():
            raise ValueError(f"{flag} '{root}' is {kind}, not a cache root; {fix}")


def discard_shard(path: Path, shard: int) -> None:
    """Delete a shard's file, then its marker (a crash in between leaves a marker without a
    file, which every reader treats as not done, never a trusted unmarked file)."""
    name = shard_name(shard)
    atomic.remove_stale_tmp(path, f"{name}.parquet")
    atomic.remove_stale_tmp(path, f"{name}.json")
    (path / f"{name}.parquet").unlink(missing_ok=True)
    atomic.fsync_dir(path)
    (path / f"{name}.json").unlink(missing_ok=True)
    atomic.fsync_dir(path)


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


def finalize(path: Path) -> dict | None:
    """Write the manifest if all shards are complete; return it, or None if some are missing."""
    meta = read_key(path)
    shards = {}
    for shard in range(meta["num_shards"]):
        marker = read_marker(path, shard)
        if marker is None:
            return None
        shards[shard_name(shard)] = {"rows": marker["rows"], "sha256": marker["sha256"]}
    manifest = {
        **meta,
        "complete": True,
        "pairs": sum(s["rows"] for s in shards.values()),
        "shards": shards,
    }
    atomic.write_json(path / MANIFEST_JSON, manifest)
    return manifest


def cache_info(path: Path) -> dict:
    """What a cache entry holds: dataset, teacher, shards complete, pairs; for `cprd cache info`."""
    meta = read_key(path)
    markers = [read_marker(path, s) for s in range(meta["num_shards"])]
    done = [m for m in markers if m]
    return {
        "cache_path": str(path),
        "key": meta["key"],
        "dataset_fingerprint": meta["dataset_fingerprint"],
        "teacher": meta["teacher"],
        "precision": meta["precision"],
        "num_shards": meta["num_shards"],
        "shards_complete": len(done),
        "complete": len(done) == meta["num_shards"] and (path / MANIFEST_JSON).is_file(),
        "pairs": sum(m["rows"] for m in done),
    }


def list_caches(root: Path) -> list[dict]:
    """cache_info of every entry under a cache root."""
    root = Path(root)
    check_cache_root(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cache dir '{root}' does not exist")
    return [cache_info(p) for p in sorted(root.iterdir()) if (p / KEY_JSON).is_file()]


def load_scores(path: Path, fingerprint: str | None = None) -> tuple[dict, pl.DataFrame]:
    """(manifest, all pair scores) of a complete cache entry, every shard checked.

    A missing, truncated or altered shard is an error naming it, never silently skipped;
    ``fingerprint``, when given, must match the cache's dataset.
    """
    path = Path(path)
    meta = read_key(path)
    if fingerprint is not None and meta["dataset_fingerprint"] != fingerprint:
        raise ValueError(
            f"teacher cache '{path}' was made for another dataset (fingerprint "
            f"{meta['dataset_fingerprint'][:12]}, --data has {fingerprint[:12]}); score this "
            "dataset's candidates with `cprd score-teacher`"
        )
    mfile = path / MANIFEST_JSON
    if not mfile.is_file():
        info = cache_info(path)
        raise ValueError(
            f"teacher cache '{path}' is incomplete ({info['shards_complete']} of "
            f"{info['num_shards']} shards); finish it with `cprd score-teacher`"
        )
    manifest = json.loads(mfile.read_text())
    frames = []
    for name, entry in manifest["shards"].items():
        f = path / f"{name}.parquet"
        if not f.is_file():
            raise ValueError(
                f"teacher cache shard '{f}' is missing; re-score it with "
                "`cprd score-teacher` on the same candidates"
            )
        if atomic.file_sha256(f) != entry["sha256"]:
            raise ValueError(
                f"teacher cache shard '{f}' is damaged (checksum mismatch); re-score "
                "it with `cprd score-teacher` on the same candidates"
            )
        frames.append(pl.from_arrow(pq.read_table(f, schema=SHARD_SCHEMA)))
    return manifest, pl.concat(frames)
