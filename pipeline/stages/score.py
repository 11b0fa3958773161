"""Stage 2, ``cprd score-teacher``: score every unique candidate pair with the teacher, once.

The pairs are those of pipeline.pairs: the candidates' pairs plus every ground-truth pair of
their split. Work is split into the cache's N shards (pipeline.cache); each worker takes
``shards[rank::world_size]`` (of ``--shard-ids`` when given), holds a shard's lock while it scores
it, and skips shards that are complete or held by another process. Whoever finds every pair of
its candidates cached writes the manifest; ``complete`` in the summary means exactly that.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from pipeline.core import atomic, cache, cache_verify
from pipeline.core.candidates import candidate_pairs  # noqa: F401
from pipeline.core.pairs import PAIR_KEY, load_pair_set, unique_pairs  # noqa: F401 (re-exported)
from pipeline.torchkit.encode import precision_scope, with_precision, worker_device
from teacher.scoring import score_pairs

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class ScoreConfig:
    candidates: Path  # candidates dir from mine-candidates
    teacher: str  # teacher spec: a BLIP ITM checkpoint dir or hub id
    cache_dir: Path  # cache root; the entry is cache_dir/<key>
    shards: int = 64  # shard count of a new cache (an existing cache keeps its own)
    shard_ids: tuple[int, ...] | None = None  # only these shards (None: all)
    rank: int | None = None  # this worker's rank (None: torchrun / Slurm env, else 0)
    world_size: int | None = None  # number of workers (None: torchrun / Slurm env, else 1)
    batch_size: int = 64  # caption batch size of the text encoder
    images_per_step: int = 16  # images (with all their captions) handed to the teacher at once
    num_workers: int | None = None  # processes decoding and preprocessing images ahead of the
    # teacher; None: 4 on CUDA, 0 on CPU (where they would take the model's cores)
    data: Path | None = None  # dataset dir (None: the path recorded in the candidates manifest)
    device: str | None = None  # None: CUDA when present, else CPU
    precision: str | None = None  # fp32 | amp_bf16 | amp | bf16 | fp16; None: amp_bf16 on CUDA


def parse_shard_ids(text: str, num_shards: int | None = None) -> tuple[int, ...]:
    """``"0-15,32"`` -> (0, ..., 15, 32); ValueError naming --shard-ids for bad text."""
    ids: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            ids.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--shard-ids '{text}' is not a list like 0-15,32") from None
    if not ids or min(ids) < 0 or (num_shards is not None and max(ids) >= num_shards):
        raise ValueError(f"--shard-ids '{text}' must name shards in 0..{(num_shards or 1) - 1}")
    return tuple(sorted(ids))


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size) from the flags, else torchrun's env, else a Slurm array, else (0, 1)."""
    if rank is None and world_size is None:
        env = os.environ
        if "WORLD_SIZE" in env:
            rank, world_size = int(env.get("RANK", 0)), int(env["WORLD_SIZE"])
        elif "SLURM_ARRAY_TASK_COUNT" in env:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            rank = int(env["SLURM_ARRAY_TASK_ID"]) - first
            world_size = int(env["SLURM_ARRAY_TASK_COUNT"])
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank must lie in 0..--world-size-1, got rank {rank} of {world_size}")
    return rank, world_size


def describe(values: np.ndarray) -> dict:
    """mean, std and quantiles of a score distribution (DESIGN 1: teacher vs miner shapes)."""
    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "std": float(v.std())}
    out.update({f"q{int(q * 100):02d}": float(np.quantile(v, q)) for q in QUANTILES})
    return out


def _existing(path: Path, shard: int) -> pl.DataFrame | None:
    """A shard's rows if they can be trusted: marker and file agree, or the marker is missing
    (a run killed between the shard's rename and its marker: the file itself is complete)."""
    rows = cache.read_shard(path, shard)
    marker = cache.read_marker(path, shard)
    if rows is None or marker is None:
        return rows
    f = path / f"{cache.shard_name(shard)}.parquet"
    if atomic.file_sha256(f) != marker["sha256"]:
        log.warning("shard %d does not match its marker (damaged); scoring it again", shard)
        return None
    return rows


@with_precision
def score_teacher(cfg: ScoreConfig, progress: bool = True, loaded_teacher=None) -> dict:
    """Score the missing pairs of this worker's shards; return the run summary.

    ``loaded_teacher`` (a teacher.model.LoadedTeacher of ``cfg.teacher``) saves loading it again.
    """
    from teacher.model import load_teacher

    if cfg.shards < 1:
        raise ValueError(f"--shards must be >= 1, got {cfg.shards}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {cfg.num_workers}")
    if cfg.shard_ids is not None and max(cfg.shard_ids) >= cfg.shards:
        # An existing cache must have cfg.shards shards too (open_cache refuses another count).
        raise ValueError(
            f"--shard-ids names shard {max(cfg.shard_ids)}, the cache has "
            f"{cfg.shards} (0..{cfg.shards - 1})"
        )
    rank, world = resolve_rank(cfg.rank, cfg.world_size)
    cache.check_cache_root(cfg.cache_dir, "--cache-dir")
    _, cand, ds, wanted = load_pair_set(cfg.candidates, cfg.data)
    pairs = wanted.pairs
    # one GPU per worker when launched as several processes (torchrun, srun): cuda:LOCAL_RANK
    teacher = loaded_teacher or load_teacher(cfg.teacher, device=worker_device(cfg.device))
    workers = cfg.num_workers
    if workers is None:
        workers = 4 if teacher.device.type == "cuda" else 0
    key, fields = cache.cache_key(ds.fingerprint, teacher.identity)
    # A new cache keeps each image's pairs in one shard, so each image is encoded once per run
    # (a pair-hashed cache of an older cprd keeps its layout: an image per shard it touches).
    path = cache.open_cache(cfg.cache_dir, fields, key, cfg.shards, teacher.identity, by="image")
    meta = cache.read_key(path)
    num_shards = meta["num_shards"]

    ids = pairs["image_id"].to_numpy(), pairs["caption_id"].to_numpy()
    pairs = pairs.with_columns(shard=cache.shard_of(*ids, num_shards, by=cache.shard_by(meta)))
    mine = list(cfg.shard_ids if cfg.shard_ids is not None else range(num_shards))[rank::world]

    by_shard = {
        s: df.drop("shard") for (s,), df in pairs.partition_by("shard", as_dict=True).items()
    }
    none = pairs.clear().drop("shard")
    todo = {}
    for shard in mine:
        need, have = by_shard.get(shard, none), _existing(path, shard)
        todo[shard] = need if have is None else need.join(have, on=PAIR_KEY, how="anti")
    total = sum(m.height for m in todo.values())
    paths = {i: ds.image_path(p) for i, p in ds.images.select("image_id", "path").iter_rows()}

    written, skipped, busy, scored = [], [], [], 0
    bar = tqdm(total=total, desc="teacher pairs", unit="pair", disable=not progress)
    for shard in mine:
        if todo[shard].height == 0 and cache.read_marker(path, shard) is not None:
            log.info("shard %d: complete, skipped", shard)
            skipped.append(shard)
            continue
        with cache.shard_lock(path, shard) as got:
            if not got:
                log.info("shard %d: held by another process, skipped", shard)
                busy.append(shard)
                continue
            # Only a holder of this lock writes the shard: a killed one's temporaries are stale.
            for name in (f"{cache.shard_name(shard)}.parquet", f"{cache.shard_name(shard)}.json"):
                atomic.remove_stale_tmp(path, name)
            have = _existing(path, shard)  # another process may have finished it meanwhile
            need = by_shard.get(shard, none)
            missing = need if have is None else need.join(have, on=PAIR_KEY, how="anti")
            if missing.height == 0 and have is not None and cache.read_marker(path, shard):
                log.info("shard %d: completed by another process, skipped", shard)
                skipped.append(shard)
                continue
            new = None
            if missing.height:
                cache.remove_manifest(path)  # readers see an incomplete cache from here on
                new = score_pairs(
                    teacher,
                    missing,
                    paths,
                    ds.captions["caption"],
                    batch_size=cfg.batch_size,
                    images_per_step=cfg.images_per_step,
                    num_workers=workers,
                    bar=bar,
                )
            parts = [p for p in (have, new) if p is not None]
            rows = pl.concat(parts) if parts else pl.from_arrow(cache.SHARD_SCHEMA.empty_table())
            cache.write_shard(path, shard, rows)
            scored += 0 if new is None else new.height
            written.append(shard)
    bar.close()
    pairs = pairs.drop("shard")
    final = cache.finalize(path, pairs)  # checked under the entry lock: every pair is cached
    missing = pairs.clear() if final is not None else cache.missing_pairs(path, pairs)
    summary = {
        "cache_path": str(path),
        "key": key,
        "num_shards": num_shards,
        "rank": rank,
        "world_size": world,
        "pairs_total": pairs.height,
        "num_workers": workers,
        "pairs_candidates": wanted.candidate_pairs.height,
        "pairs_scored": scored,
        "pairs_missing": missing.height,
        "positives": {
            "total": wanted.positives.height,
            "added": wanted.positives_added,  # not among the candidates: scored for this rule
            "cached": wanted.positives.height
            - wanted.positives.join(missing, on=PAIR_KEY, how="semi").height,
        },
        "shards_written": len(written),
        "shards_written_ids": written,
        "device": str(teacher.device),
        "shards_skipped": len(skipped),
        "shards_busy": len(busy),
        "complete": final is not None,
    }
    if final is not None:
        try:  # streamed: only the candidates' pairs are held
            _, needed = cache.load_scores(path, pairs=wanted.candidate_pairs)
        except ValueError as e:
            # Another worker (a re-mining round) began rewriting a shard after our pairs were
            # checked complete under the entry lock: the claim stands, the distributions wait.
            log.warning("score distributions skipped, the cache is being extended: %s", e)
            return summary
        summary["teacher_score"] = describe(needed["score"].to_numpy())
        summary["miner_score"] = describe(cand["score"].to_numpy())
    return summary


def repair_cache(
    path: Path,
    candidates: Path | None,
    teacher: str | None = None,
    *,
    data: Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Re-score the damaged shards of a cache entry and rewrite its manifest; return a summary.

    The cache does not record its candidates, so ``candidates`` must be the set it was scored
    from; ``teacher`` (default: the spec key.json records) must give the same cache key. A
    re-scored shard holds only the pairs of these candidates (score-teacher's set, positives
    included): pairs scored for other candidate sets are lost from it (the summary warns).
    ``before`` and ``after`` are cache_verify reports, with the candidates' coverage.
    """
    path = Path(path)
    meta = cache.read_key(path)
    with precision_scope(meta.get("precision")):  # the precision the cache was scored with
        return _repair(path, meta, candidates, teacher, data, batch_size, device, progress)


def _repair(path, meta, candidates, teacher, data, batch_size, device, progress) -> dict:
    from teacher.model import load_teacher

    before = cache_verify.verify(path, candidates, data)
    if before["key_problems"]:
        raise ValueError(
            f"cache '{path}' cannot be repaired: {before['key_problems'][0]}; delete it and run "
            "`cprd score-teacher` again"
        )
    redo = sorted(int(name.split("-")[1]) for name in before["damaged"])
    summary = {"cache_path": str(path), "repaired_shards": [], "pairs_scored": 0, "warnings": []}
    if redo:
        if candidates is None:
            raise ValueError(
                f"{len(redo)} shards need re-scoring: --repair needs --candidates DIR, the "
                "candidates this cache was scored from"
            )
        spec = teacher or meta["teacher"]["spec"]
        loaded = load_teacher(spec, device=device)
        key, _ = cache.cache_key(meta["dataset_fingerprint"], loaded.identity)
        if key != meta["key"]:
            raise ValueError(
                f"--teacher '{spec}' belongs to another cache (key {key}, this cache is "
                f"{meta['key']}: other weights, preprocessing or precision); pass the teacher "
                "this cache was scored with"
            )
        listed = _read_json(path / cache.MANIFEST_JSON).get("shards")
        listed = listed if isinstance(listed, dict) else {}
        old_rows = {}  # what each shard held before, to tell the user if pairs are lost
        for shard in redo:
            entry = listed.get(cache.shard_name(shard))
            entry = entry if isinstance(entry, dict) else cache.read_marker(path, shard) or {}
            old_rows[shard] = entry.get("rows")
        # The manifest goes first: readers then see an incomplete cache, never a stale manifest.
        cache.remove_manifest(path)
        for shard in redo:
            with cache.shard_lock(path, shard) as got:
                if not got:
                    raise ValueError(
                        f"{cache.shard_name(shard)} is being scored by another process; run "
                        "`cprd cache verify` again when it has finished"
                    )
                cache.discard_shard(path, shard)
        cfg = ScoreConfig(
            candidates=Path(candidates),
            teacher=spec,
            cache_dir=path.parent,
            shards=meta["num_shards"],
            shard_ids=tuple(redo),
            rank=0,
            world_size=1,
            batch_size=batch_size,
            data=data,
            device=device,
        )
        scored = score_teacher(cfg, progress=progress, loaded_teacher=loaded)
        summary["repaired_shards"] = [cache.shard_name(s) for s in redo]
        summary["pairs_scored"] = scored["pairs_scored"]
        for shard in redo:
            now = (cache.read_marker(path, shard) or {}).get("rows", 0)
            if old_rows[shard] is not None and now < old_rows[shard]:
                summary["warnings"].append(
                    f"{cache.shard_name(shard)} held {old_rows[shard]} pairs, these candidates "
                    f"give {now}: {old_rows[shard] - now} pairs of other candidate sets are no "
                    "longer cached (score those candidates again to restore them)"
                )
    rewrite = bool(redo or before["manifest"])
    summary["manifest_rewritten"] = rewrite and cache.finalize(path) is not None
    summary["after"] = cache_verify.verify(path, candidates, data)
    summary["before"] = before
    return summary


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or {} when it is missing or unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}
