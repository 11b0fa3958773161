"""``cprd cache verify``: check a whole teacher cache entry without changing it.

Every shard: marker and parquet both present, checksum and row count as the marker says, the
file readable, every pair hashed to this shard, no duplicate pairs, finite scores; the manifest
agreeing with key.json and the markers; with a candidates dir, every pair score-teacher would
score for it (pipeline.pairs) cached. Repair (re-scoring only the damaged shards) lives in
pipeline.score.repair_cache, which needs the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.core import atomic
from pipeline.core.cache import (
    KEY_FIELDS,
    KEY_JSON,
    MANIFEST_JSON,
    SHARD_SCHEMA,
    cache_key,
    entry_lock,
    missing_pairs,
    read_key,
    read_marker,
    shard_by,
    shard_name,
    shard_of,
)

# ---- verification ------------------------------------------------------------------------------


def _shard_problems(path: Path, shard: int, meta: dict) -> tuple[list[str], int]:
    """(what is wrong with one shard, its rows): marker, file, checksum, rows, hashing, dupes."""
    name = shard_name(shard)
    f, m = path / f"{name}.parquet", path / f"{name}.json"
    problems, marker = [], None
    if m.is_file():
        try:
            marker = json.loads(m.read_text())
            if not isinstance(marker, dict) or not {"rows", "sha256"} <= marker.keys():
                raise ValueError("rows or sha256 missing")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"marker unreadable ({e})")
            marker = None
    if not f.is_file():
        what = "its marker is present" if m.is_file() else "no marker either: not scored yet"
        return [*problems, f"shard file missing ({what})"], 0
    if not m.is_file():
        problems.append("marker missing (shard file present)")
    if marker is not None and atomic.file_sha256(f) != marker["sha256"]:
        problems.append("checksum differs from its marker")
    try:
        rows = pl.from_arrow(pq.read_table(f, schema=SHARD_SCHEMA))
    except Exception as e:  # Arrow raises several types for damaged bytes; each is reported
        problems.append(f"parquet unreadable ({str(e).splitlines()[0][:120]})")
        return problems, 0
    if marker is not None and rows.height != marker["rows"]:
        problems.append(f"{rows.height} rows, its marker says {marker['rows']}")
    ids = rows["image_id"].to_numpy(), rows["caption_id"].to_numpy()
    elsewhere = int((shard_of(*ids, meta["num_shards"], by=shard_by(meta)) != shard).sum())
    if elsewhere:
        problems.append(f"{elsewhere} pairs belong to other shards")
    dupes = rows.height - rows.select("image_id", "caption_id").n_unique()
    if dupes:
        problems.append(f"{dupes} duplicate pairs")
    bad = rows.height - rows.filter(pl.col("score").is_finite() & pl.col("prob").is_finite()).height
    if bad:
        problems.append(f"{bad} non-finite scores")
    return problems, rows.height


def _manifest_problems(path: Path, meta: dict) -> list[str]:
    """What in cache.json disagrees with key.json and the shard markers (each line names it)."""
    mfile = path / MANIFEST_JSON
    if not mfile.is_file():
        return [f"{MANIFEST_JSON} missing (the cache was never completed, or it was deleted)"]
    try:
        manifest = json.loads(mfile.read_text())
        entries = manifest["shards"]
        if not isinstance(entries, dict):
            raise TypeError("'shards' is not a mapping")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        return [f"{MANIFEST_JSON} unreadable ({e})"]
    problems = [
        f"{MANIFEST_JSON}: {k} differs from {KEY_JSON}"
        for k in ("format", "version", "key", "num_shards", *KEY_FIELDS)
        if manifest.get(k) != meta.get(k)
    ]
    names = [shard_name(s) for s in range(meta["num_shards"])]
    problems += [f"{MANIFEST_JSON}: no entry for {n}" for n in names if n not in entries]
    problems += [f"{MANIFEST_JSON}: unknown shard {n}" for n in entries if n not in names]
    for shard, name in enumerate(names):
        marker, entry = read_marker(path, shard), entries.get(name)
        if marker is None or not isinstance(entry, dict):
            continue
        if (entry.get("rows"), entry.get("sha256")) != (marker.get("rows"), marker.get("sha256")):
            problems.append(
                f"{MANIFEST_JSON}: {name} (rows {entry.get('rows')}, sha256 "
                f"{str(entry.get('sha256'))[:12]}) disagrees with its marker (rows "
                f"{marker.get('rows')}, sha256 {str(marker.get('sha256'))[:12]})"
            )
    total = sum(e.get("rows", 0) for e in entries.values() if isinstance(e, dict))
    if manifest.get("pairs") != total:
        problems.append(f"{MANIFEST_JSON}: pairs {manifest.get('pairs')}, its shards list {total}")
    return problems


def coverage(path: Path, candidates: Path, data: Path | None = None) -> dict:
    """How many of the pairs score-teacher scores for ``candidates`` the entry lacks.

    The pairs are pipeline.pairs' (the candidates' pairs and the positives of their split);
    candidates of another dataset are an error naming --candidates.
    """
    from pipeline.core.pairs import PAIR_KEY, load_pair_set

    meta = read_key(path)
    manifest, _, _, wanted = load_pair_set(candidates, data)
    have = manifest["dataset"]["fingerprint"]
    if have != meta["dataset_fingerprint"]:
        raise ValueError(
            f"--candidates '{candidates}' belong to another cache: they were mined from "
            f"dataset {have[:12]}, this cache holds dataset "
            f"{meta['dataset_fingerprint'][:12]}; pass candidates of this cache's dataset"
        )
    missing = missing_pairs(path, wanted.pairs)
    return {
        "candidates": str(candidates),
        "pairs": wanted.pairs.height,
        "missing": missing.height,
        "positives_missing": wanted.positives.join(missing, on=PAIR_KEY, how="semi").height,
    }


def verify(path: Path, candidates: Path | None = None, data: Path | None = None) -> dict:
    """A health report of a cache entry; reads every shard, changes nothing.

    ``damaged`` maps each bad shard's name to one line saying what is wrong, ``manifest`` lists
    what in cache.json disagrees, ``key_problems`` what is wrong with key.json itself (re-scoring
    cannot fix that); with ``candidates``, ``coverage`` counts their pairs the cache lacks
    (:func:`coverage`). ``healthy`` is True when all of these are empty (and none is missing).
    """
    path = Path(path)
    meta = read_key(path)
    num_shards = meta["num_shards"]
    identity = {"weights_sha256": meta.get("teacher_weights_sha256")}
    identity |= {k: meta.get(k) for k in ("preprocessing", "precision")}
    key_problems = []
    if cache_key(meta.get("dataset_fingerprint"), identity)[0] != meta.get("key"):
        key_problems.append(f"{KEY_JSON}: its fields do not hash to its key (edited?)")
    if path.resolve().name != meta.get("key"):
        key_problems.append(
            f"the directory is named '{path.resolve().name}', its key is '{meta.get('key')}' "
            "(renamed?); score-teacher looks for it under its key"
        )
    damaged, pairs = {}, 0
    with entry_lock(path, shared=True):  # a running score-teacher commits nothing meanwhile
        for shard in range(num_shards):
            problems, rows = _shard_problems(path, shard, meta)
            if problems:
                damaged[shard_name(shard)] = "; ".join(problems)
            else:
                pairs += rows
        manifest = _manifest_problems(path, meta)
    report = {
        "cache_path": str(path),
        "key": meta.get("key"),
        "num_shards": num_shards,
        "shards_ok": num_shards - len(damaged),
        "pairs": pairs,
        "damaged": damaged,
        "manifest": manifest,
        "key_problems": key_problems,
        "temporaries": sorted(p.name for p in path.iterdir() if atomic.TMP_MARK in p.name),
    }
    if candidates is not None:
        report["coverage"] = coverage(path, candidates, data)
    missing = report.get("coverage", {}).get("missing", 0)
    report["healthy"] = not (damaged or manifest or key_problems or missing)
    return report
