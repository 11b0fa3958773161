"""The teacher cache: one teacher score (log-odds) per unique (image, caption) pair, in N shards.

Layout of a cache entry ``DIR/<key>/`` (DESIGN 3)::

    key.json               what the key hashes (dataset fingerprint, teacher weights, preprocessing,
                           precision) in readable form, plus the shard count; written first
    shard-00000.parquet    schemas.SHARD_SCHEMA rows, sorted by (image_id, caption_id)
    shard-00000.json       completion marker: rows and sha256 of the shard file; written after it
    shard-00000.lock       held (flock) while a process scores that shard; the OS drops it on death
    cache.lock             the entry's lock (flock): held exclusively to rewrite a shard or write
                           the manifest, shared to read, so no reader sees one without the other
    cache.json             the manifest: every shard's rows and checksum; written last, under the
                           entry lock, by whichever worker completes the set (every shard's file
                           agrees with its marker and every pair of its candidates is cached)

A shard is rewritten only after the manifest and the shard's marker are removed (under the entry
lock), so a manifest on disk always matches the shards, and a kill leaves either the old file or
the new one, each complete, with at most its marker missing.

Which shard a pair goes to is key.json's ``shard_by`` (:func:`shard_of`): ``image`` (every cache
score-teacher creates) hashes the image id alone, so all of an image's pairs share a shard and
its vision encoder runs once per scoring run, not once per shard; ``pair`` (caches written before
``shard_by`` existed, which lack the field) hashes the pair. The candidate set is not part of the
key: a re-mined candidate set only adds the missing pairs, each to the shard it hashes to, so the
shard count and layout of a cache never change. Teacher ranks
are not stored: they depend on each query's candidate list and are rebuilt from the scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import atomic
from pipeline.core.cache_locks import (  # noqa: F401 (used as cache.shard_lock etc.)
    ENTRY_LOCK,
    entry_lock,
    shard_lock,
    shard_name,
)

CACHE_FORMAT = "cprd-teacher-cache"
# 2: `score` is the ITM log-odds logit(match) - logit(no match), prob = sigmoid(score) exactly
# (version 1 stored the raw match logit); a cache of another version is refused on read.
CACHE_VERSION = 2
KEY_JSON = "key.json"
KEY_FIELDS = ("dataset_fingerprint", "teacher_weights_sha256", "preprocessing", "precision")
PAIR = ["image_id", "caption_id"]
MANIFEST_JSON = "cache.json"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # dataset image id
        pa.field("caption_id", pa.int64(), nullable=False),  # dataset caption id
        # the teacher's log-odds of a match (ITM: logit(match) - logit(no match)), unsquashed
        pa.field("score", pa.float32(), nullable=False),
        pa.field("prob", pa.float32(), nullable=False),  # sigmoid(score): the match probability
    ]
)


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


SHARD_BY = ("image", "pair")  # key.json's shard_by: what a pair's shard is a hash of


def shard_by(meta: dict) -> str:
    """The shard layout of a cache entry (its key.json): ``pair`` when the field is absent."""
    return meta.get("shard_by", "pair")


def shard_of(
    image_ids: np.ndarray, caption_ids: np.ndarray, num_shards: int, by: str = "pair"
) -> np.ndarray:
    """The shard of each pair: a fixed integer hash (splitmix64) of the pair (``by="pair"``) or
    of its image alone (``by="image"``: the pair hash with caption id 0), modulo N."""
    if by not in SHARD_BY:
        raise ValueError(f"shard_by must be one of {SHARD_BY}, got {by!r}")
    if by == "image":
        caption_ids = np.zeros_like(image_ids)
    with np.errstate(over="ignore"):
        x = (image_ids.astype(np.uint64) << np.uint64(32)) ^ caption_ids.astype(np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(num_shards)).astype(np.int64)


def open_cache(
    root: Path, fields: dict, key: str, num_shards: int, teacher: dict, by: str = "pair"
) -> Path:
    """Create (or check) the cache entry ``root/key``; return its path.

    A new entry shards ``by`` image or pair (:func:`shard_of`); an existing one keeps its own
    layout. An existing entry made with another shard count, or whose key file disagrees, is an
    error.
    """
    path = Path(root) / key
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": key,
        "num_shards": num_shards,
        **({"shard_by": by} if by != "pair" else {}),  # absent: pair (the older layout)
        **fields,
        "teacher": teacher,
    }
    key_file = path / KEY_JSON
    if key_file.is_file():
        have = read_key(path)  # format and version checked
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
    check_version(meta, path)
    return meta


def check_version(meta: dict, path: Path) -> None:
    """ValueError, saying how to rebuild, unless ``meta`` (key.json or cache.json of the entry
    ``path``) is of the format version this cprd reads."""
    version = meta.get("version")
    if version == CACHE_VERSION:
        return
    why = " (its scores are raw ITM match logits, not log-odds)" if version == 1 else ""
    raise ValueError(
        f"teacher cache '{path}' is format version {version}{why}, this cprd reads version "
        f"{CACHE_VERSION}; delete '{path}' and run `cprd score-teacher` again (or score into a "
        "new --cache-dir)"
    )


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
    """Replace a shard file atomically, then write its marker; return the marker.

    Under the entry lock, the manifest and the shard's old marker are removed first: a reader
    never sees a manifest or marker that no longer matches the file, and a kill leaves the old
    or the new file (each complete) without a marker, which score-teacher trusts and completes.
    """
    path = Path(path)
    rows = rows.sort(PAIR)
    table = pa.Table.from_pydict(
        {f.name: rows[f.name].to_numpy() for f in SHARD_SCHEMA}, schema=SHARD_SCHEMA
    )
    f = path / f"{shard_name(shard)}.parquet"
    with entry_lock(path):
        (path / MANIFEST_JSON).unlink(missing_ok=True)
        (path / f"{shard_name(shard)}.json").unlink(missing_ok=True)
        atomic.fsync_dir(path)
        with atomic.atomic_path(f) as tmp:
            pq.write_table(table, tmp)
        marker = {"shard": shard, "rows": rows.height, "sha256": atomic.file_sha256(f)}
        atomic.write_json(path / f"{shard_name(shard)}.json", marker)
    return marker


def remove_manifest(path: Path) -> None:
    """Delete the manifest (under the entry lock): readers see an incomplete cache from now on."""
    with entry_lock(path):
        (Path(path) / MANIFEST_JSON).unlink(missing_ok=True)
        atomic.fsync_dir(Path(path))


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
    """Delete the manifest, then a shard's file, then its marker, under the entry lock (a crash
    after the file leaves a marker without a file, which every reader treats as not done, never
    a trusted unmarked file). The caller holds the shard's lock."""
    name = shard_name(shard)
    with entry_lock(path):
        (path / MANIFEST_JSON).unlink(missing_ok=True)
        atomic.remove_stale_tmp(path, f"{name}.parquet")
        atomic.remove_stale_tmp(path, f"{name}.json")
        (path / f"{name}.parquet").unlink(missing_ok=True)
        atomic.fsync_dir(path)
        (path / f"{name}.json").unlink(missing_ok=True)
        atomic.fsync_dir(path)


def _by_shard(pairs: pl.DataFrame, meta: dict) -> dict[int, pl.DataFrame]:
    """(image_id, caption_id) ``pairs`` grouped by the shard each hashes to in the entry of
    key.json ``meta``."""
    pairs = pairs.select(PAIR)
    ids = pairs["image_id"].to_numpy(), pairs["caption_id"].to_numpy()
    shard = shard_of(*ids, meta["num_shards"], by=shard_by(meta))
    parts = pairs.with_columns(shard=shard).partition_by("shard", as_dict=True)
    return {s: df.drop("shard") for (s,), df in parts.items()}


def _read_pairs(f: Path) -> pl.DataFrame | None:
    """(image_id, caption_id) of a shard file, or None if it is missing or unreadable."""
    try:
        return pl.from_arrow(pq.read_table(f, columns=PAIR, schema=SHARD_SCHEMA))
    except (pa.ArrowInvalid, OSError):
        return None


def finalize(path: Path, required: pl.DataFrame | None = None) -> dict | None:
    """Write the manifest if the set is complete; return it, or None (nothing written).

    Complete is checked, under the entry lock, not assumed: every shard's file exists with the
    checksum its marker records, and every (image_id, caption_id) pair of ``required`` is in
    the file of the shard it hashes to. Whoever completes the set writes the manifest.
    """
    path = Path(path)
    meta = read_key(path)
    need = {} if required is None else _by_shard(required, meta)
    with entry_lock(path):
        shards = {}
        for shard in range(meta["num_shards"]):
            marker = read_marker(path, shard)
            f = path / f"{shard_name(shard)}.parquet"
            if marker is None or not f.is_file() or atomic.file_sha256(f) != marker.get("sha256"):
                return None
            if shard in need:
                have = _read_pairs(f)
                if have is None or need[shard].join(have, on=PAIR, how="anti").height:
                    return None
            shards[shard_name(shard)] = {"rows": marker["rows"], "sha256": marker["sha256"]}
        atomic.remove_stale_tmp(path, MANIFEST_JSON)  # a killed finalizer's: none runs now
        manifest = {
            **meta,
            "complete": True,
            "pairs": sum(s["rows"] for s in shards.values()),
            "shards": shards,
        }
        atomic.write_json(path / MANIFEST_JSON, manifest)
    return manifest


def missing_pairs(path: Path, required: pl.DataFrame) -> pl.DataFrame:
    """The (image_id, caption_id) pairs of ``required`` that no shard file of the entry holds."""
    path = Path(path)
    out = [pl.DataFrame(schema={"image_id": pl.Int64, "caption_id": pl.Int64})]
    with entry_lock(path, shared=True):
        for shard, need in _by_shard(required, read_key(path)).items():
            have = _read_pairs(path / f"{shard_name(shard)}.parquet")
            out.append(need if have is None else need.join(have, on=PAIR, how="anti"))
    return pl.concat(out).sort(PAIR)


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
    """cache_info of every entry under a cache root; an unreadable one as {cache_path, error}."""
    root = Path(root)
    check_cache_root(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cache dir '{root}' does not exist")
    out = []
    for p in sorted(root.iterdir()):
        if (p / KEY_JSON).is_file():
            try:
                out.append(cache_info(p))
            except ValueError as e:  # another format version, a corrupt key.json: say which
                out.append({"cache_path": str(p), "error": str(e)})
    return out


def iter_scores(
    path: Path,
    fingerprint: str | None = None,
    columns: list[str] | None = None,
    manifest_out: dict | None = None,
) -> Iterator[pa.Table]:
    """Each shard of a complete cache entry as an Arrow table, one at a time, every one checked.

    Streams: one shard's bytes are held at a time, read once for both the checksum and the
    Parquet decode, and only ``columns`` (default: all of ``SHARD_SCHEMA``) are decoded. A
    missing, truncated or altered shard is an error naming it, never silently skipped;
    ``fingerprint``, when given, must match the cache's dataset. The entry's shared lock is held
    until the iteration ends (or the generator is closed), so no shard is replaced meanwhile;
    ``manifest_out``, when given, is updated with the manifest read under that lock.
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
    with entry_lock(path, shared=True):  # no shard is replaced while it is read
        if not mfile.is_file():
            info = cache_info(path)
            raise ValueError(
                f"teacher cache '{path}' is incomplete ({info['shards_complete']} of "
                f"{info['num_shards']} shards, no {MANIFEST_JSON}); finish it with `cprd "
                "score-teacher` on its candidates"
            )
        manifest = json.loads(mfile.read_text())
        check_version(manifest, path)
        if manifest_out is not None:
            manifest_out.update(manifest)
        for name, entry in manifest["shards"].items():
            f = path / f"{name}.parquet"
            if not f.is_file():
                raise ValueError(
                    f"teacher cache shard '{f}' is missing; re-score it with "
                    "`cprd score-teacher` on the same candidates"
                )
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(
                    f"teacher cache shard '{f}' is damaged (checksum mismatch); re-score "
                    "it with `cprd score-teacher` on the same candidates"
                )
            yield pq.read_table(pa.BufferReader(data), columns=columns, schema=SHARD_SCHEMA)


def load_scores(
    path: Path,
    fingerprint: str | None = None,
    *,
    where: pl.Expr | None = None,
    pairs: pl.DataFrame | None = None,
    columns: list[str] | None = None,
) -> tuple[dict, pl.DataFrame]:
    """(manifest, pair scores) of a complete cache entry, every shard checked.

    Streamed (``iter_scores``): only the rows each shard keeps are held, those passing
    ``where`` (a polars expression) and, when ``pairs`` (image_id, caption_id) is given, those
    pairs. Without either every pair is held: readers that reduce all the scores (the
    student's teacher lookup) consume ``iter_scores`` themselves.
    """
    manifest: dict = {}
    frames = []
    for table in iter_scores(path, fingerprint, columns, manifest):
        frame = pl.from_arrow(table)
        if where is not None:
            frame = frame.filter(where)
        if pairs is not None:
            frame = frame.join(pairs.select(PAIR), on=PAIR, how="semi")
        frames.append(frame)
    return manifest, pl.concat(frames)
