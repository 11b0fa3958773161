"""The teacher lookup that train-student builds, at 1M to 100M cached pairs: its load time, peak and
resident memory, and what it costs per step afterwards. Run through ``benchmarks/mine_scale.py``
(``--lookup``, on by default; ``--no-mine`` for this part alone).

A child process writes a synthetic dataset of COCO's
Karpathy size (113,287 train + 5,000 val + 5,000 test images, 5 captions each) and a complete
teacher cache in the real format (``pipeline.dataset.write_dataset``, ``pipeline.cache``
``open_cache`` / ``write_shard`` / ``finalize``, 64 shards) holding the unique pairs of 64
candidates per train caption (t2i: its own image + 63 random train images) and 64 per train image
(i2t: its 5 captions + 59 random train captions), with random scores (positives higher). Random
candidates barely overlap between the two directions, so the pair count (about 43M) is the worst
case for k = 64. A second, fresh child then times ``Dataset.load``, ``load_lookup`` (hard_k 16,
as train-student builds it) with its peak and resident RSS above the loaded dataset, one epoch
of ``BatchPlanner`` (hard batching, 128 pairs) and ``batch_lists`` per step, in-batch and
explicit. ``--lookup-scales`` are fractions of COCO: the default 0.0233, 0.233, 1 and 2.33 give
about 1M, 10M, 43M and 100M cached pairs (the quick run: the first two, ten times apart).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, command, in_child, machine, status_kb

COCO_IMAGES = {"train": 113_287, "val": 5_000, "test": 5_000}  # Karpathy, restval in train
CAPTIONS_PER_IMAGE = 5
LOOKUP_HEADING = "## Teacher lookup at COCO scale"


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _write_lookup_data(root: str, scale: float, k: int, shards: int, out: mp.Queue) -> None:
    """Child: a synthetic dataset and complete teacher cache under ``root``; put their sizes."""
    import polars as pl

    from pipeline.core import cache
    from pipeline.core.dataset import write_dataset

    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    counts = {s: max(1, round(n * scale)) for s, n in COCO_IMAGES.items()}
    split = rng.permutation(np.repeat(list(counts), list(counts.values())))  # splits interleaved
    n_img = len(split)
    owner = np.repeat(np.arange(n_img, dtype=np.int64), CAPTIONS_PER_IMAGE)  # (M,)
    n_cap = len(owner)
    images = pl.DataFrame(
        {
            "path": [f"images/{i:012d}.jpg" for i in range(n_img)],  # never opened
            "split": split,
            "sha256": [f"{i:064x}" for i in range(n_img)],
        }
    )
    captions = pl.DataFrame(
        {"image_id": owner, "caption": [f"synthetic caption {j}" for j in range(n_cap)]}
    )
    data = Path(root) / "data"
    data.mkdir(parents=True)
    meta = write_dataset(data, images, captions, {"kind": "synthetic", "scale": scale})
    t_data = time.perf_counter() - t_start

    # Candidates of the train split, as mine-candidates --split train --k K finds them.
    train = np.flatnonzero(split == "train")  # (Nt,) image ids
    train_caps = (train[:, None] * CAPTIONS_PER_IMAGE + np.arange(CAPTIONS_PER_IMAGE)).ravel()
    t2i_img = train[rng.integers(0, len(train), (len(train_caps), k))]  # (Mt, K)
    t2i_img[:, 0] = owner[train_caps]  # the positive, as the miner finds it
    i2t_cap = train_caps[rng.integers(0, len(train_caps), (len(train), k))]  # (Nt, K)
    i2t_cap[:, :CAPTIONS_PER_IMAGE] = train_caps.reshape(len(train), CAPTIONS_PER_IMAGE)
    candidate_rows = t2i_img.size + i2t_cap.size
    t2i_keys = (t2i_img * n_cap + train_caps[:, None]).ravel()  # one int64 per pair
    i2t_keys = (train[:, None] * n_cap + i2t_cap).ravel()
    keys = np.concatenate([t2i_keys, i2t_keys])
    del t2i_keys, i2t_keys, t2i_img, i2t_cap
    keys.sort()  # unique pairs, sorted, as score-teacher's unique_pairs (np.unique hashes: slow)
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    img, cap = keys // n_cap, keys % n_cap
    del keys
    score = (rng.standard_normal(len(img), dtype=np.float32) * 2 - 4).astype(np.float32)
    score[owner[cap] == img] += 8  # positives score high, as the ITM head's logits do
    prob = (1 / (1 + np.exp(-score))).astype(np.float32)

    identity = {
        "spec": "synthetic",
        "weights_sha256": "0" * 64,
        "preprocessing": {"image_size": 384, "max_text_len": 35},
        "precision": "fp32",
    }
    key, fields = cache.cache_key(meta["fingerprint"], identity)
    path = cache.open_cache(Path(root) / "cache", fields, key, shards, identity)
    shard = cache.shard_of(img, cap, shards)
    order = np.argsort(shard, kind="stable")
    bounds = np.searchsorted(shard[order], np.arange(shards + 1))
    for s in range(shards):
        at = order[bounds[s] : bounds[s + 1]]
        cache.write_shard(
            path,
            s,
            pl.DataFrame(
                {"image_id": img[at], "caption_id": cap[at], "score": score[at], "prob": prob[at]}
            ),
        )
    manifest = cache.finalize(path)
    assert manifest is not None and manifest["pairs"] == len(img)
    cache_bytes = sum(f.stat().st_size for f in path.glob("*.parquet"))
    out.put(
        {
            "data": str(data),
            "cache": str(path),
            "images": n_img,
            "captions": n_cap,
            "train_images": len(train),
            "train_captions": len(train_caps),
            "candidate_rows": int(candidate_rows),
            "pairs": int(len(img)),
            "cache_mb": cache_bytes / 2**20,
            "write_dataset_s": t_data,
            "write_s": time.perf_counter() - t_start,
            "writer_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def _measure_lookup(
    data: str, cache_path: str, hard_k: int, batch_size: int, steps: int, out: mp.Queue
) -> None:
    """Child: load the lookup as train-student does; time it, its peak memory and its use."""
    import polars as pl

    from pipeline.core.dataset import Dataset
    from student.sampler import BatchPlanner, batch_lists
    from student.teacher_lookup import load_lookup

    rss_start = status_kb("VmRSS")
    load_avg = os.getloadavg()[0]  # other processes on the machine slow every timing below
    t0 = time.perf_counter()
    ds = Dataset.load(data)
    dataset_s = time.perf_counter() - t0
    rss_before = status_kb("VmRSS")
    exact = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    lookup = load_lookup(ds, hard_k, teacher_scores=cache_path)
    load_s, load_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_after = status_kb("VmRSS")
    arrays = [lookup.pos_score, lookup.pos_prob, lookup.caption_owner]
    for lists in (lookup.i2t, lookup.t2i):
        arrays += [lists.offsets, lists.cand, lists.score, lists.prob]
    lookup_mb = sum(a.nbytes for a in arrays) / 2**20

    # Per step: one epoch of hard batches (planned up front, as train-student does), then the
    # teacher lists of the first `steps` batches, in-batch and with explicit negatives.
    planner = BatchPlanner(
        ds.split("train")[0]["image_id"].to_numpy(),
        ds.captions["image_id"].to_numpy(),
        batch_size,
        batching="hard",
        lookup=lookup,
    )
    t0 = time.perf_counter()
    batches = planner.epoch(0)
    epoch_s = time.perf_counter() - t0
    sample = batches[:steps]
    present = []
    t0 = time.perf_counter()
    for b in sample:
        i2t, t2i = batch_lists(lookup, b)
        _ = lookup.pos_score[b.captions]
        present.append((i2t.present.mean() + t2i.present.mean()) / 2)
    lists_s = time.perf_counter() - t0
    extras = []
    t0 = time.perf_counter()
    for b in sample:
        e = planner._with_extras(b)  # what epoch() adds per batch with --negatives explicit
        batch_lists(lookup, e)
        extras.append(len(e.extra_images) + len(e.extra_captions))
    explicit_s = time.perf_counter() - t0
    out.put(
        {
            "hard_k": hard_k,
            "load_avg_1min": load_avg,
            "polars_threads": pl.thread_pool_size(),
            "dataset_load_s": dataset_s,
            "seconds": load_s,  # load_lookup: stream + check the shards, build the lists
            "cpu_seconds": load_cpu_s,
            "rss_start_mb": rss_start / 1024,
            "rss_before_mb": rss_before / 1024,
            "peak_rss_mb": peak / 1024,
            "peak_mb": (peak - rss_before) / 1024,  # above the loaded dataset
            "resident_mb": (rss_after - rss_before) / 1024,  # still held once it returned
            "peak_exact": exact,
            "lookup_mb": lookup_mb,
            "summary": lookup.summary(),
            "batch_size": planner.batch_size,
            "steps_per_epoch": len(batches),
            "plan_epoch_s": epoch_s,
            "plan_ms_per_step": 1e3 * epoch_s / len(batches),
            "lists_steps": len(sample),
            "lists_ms_per_step": 1e3 * lists_s / len(sample),
            "present_per_query": float(np.mean(present)),
            "explicit_ms_per_step": 1e3 * explicit_s / len(sample),
            "explicit_extra_items": float(np.mean(extras)),
        }
    )


def measure_lookup(
    scale: float, k: int, shards: int, hard_k: int, batch_size: int, steps: int, keep: str | None
) -> dict:
    """Write the synthetic data in one child, measure the lookup in a fresh one; one row."""
    root = Path(keep) / f"scale-{scale:g}" if keep else Path(tempfile.mkdtemp(prefix="lookup-"))
    if keep and root.exists():
        shutil.rmtree(root)
    try:
        written = in_child(_write_lookup_data, str(root), scale, k, shards)
        measured = in_child(
            _measure_lookup, written["data"], written["cache"], hard_k, batch_size, steps
        )
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    del written["data"], written["cache"]  # temporary paths
    return {"scale": scale, "k": k, "shards": shards, **written, **measured}


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _growth(rows: list[dict]) -> list[str]:
    """Each row's pairs and load_lookup seconds as multiples of the previous row's."""
    out = ["-"]
    for prev, r in zip(rows, rows[1:], strict=False):
        out.append(f"{r['pairs'] / prev['pairs']:.1f}x / {r['seconds'] / prev['seconds']:.1f}x")
    return out


def lookup_table(rows: list[dict]) -> str:
    lines = [
        "| scale | train images | train captions | cached pairs | cache MB | write s | "
        "load_lookup s (CPU s) | pairs / time vs previous | peak MB above dataset | "
        "resident MB after | lookup MB | peak / lookup | plan epoch s (steps) | "
        "batch_lists ms/step | explicit ms/step | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
        "--- | --- |",
    ]
    lines += [
        f"| {r['scale']:g} | {r['train_images']:,} | {r['train_captions']:,} | {r['pairs']:,} | "
        f"{r['cache_mb']:.0f} | {r['write_s']:.1f} | {r['seconds']:.1f} ({r['cpu_seconds']:.1f}) "
        f"| {growth} | {r['peak_mb']:.0f} | {r['resident_mb']:.0f} | {r['lookup_mb']:.0f} | "
        f"{r['peak_mb'] / r['lookup_mb']:.1f}x | "
        f"{r['plan_epoch_s']:.1f} ({r['steps_per_epoch']:,}) | {r['lists_ms_per_step']:.2f} | "
        f"{r['explicit_ms_per_step']:.2f} | {r['load_avg_1min']:.1f} |"
        for r, growth in zip(rows, _growth(rows), strict=True)
    ]
    return "\n".join(lines)


def write_lookup_section(rows: list[dict]) -> Path:
    """Replace (or add) the lookup section at the end of mine_scale.md, keeping the rest."""
    r = rows[-1]
    cores = len(os.sched_getaffinity(0))
    section = (
        f"{LOOKUP_HEADING}\n\n"
        f"Command: `{command()}`\n\n"
        f"Machine: {machine()}; nproc {cores}, {_memory_gib():.0f} GiB RAM; polars "
        f"{r['polars_threads']} threads\n\n"
        f"Synthetic datasets of COCO Karpathy size times `scale` (scale 1: 113,287 train images), "
        f"each with a complete teacher cache in the real format (the cache module's writers, "
        f"{r['shards']} shards) holding the unique pairs of k = {r['k']} candidates per train "
        f"caption (t2i) and per train image (i2t); `load_lookup(..., hard_k={r['hard_k']})` in a "
        f"fresh process, as train-student calls it: the shards are streamed (each read once for "
        f"its checksum and its projected columns) into per-query top-k accumulators "
        f"(`student/topk_stream.py`). Peak / resident: RSS during / after load_lookup above the "
        f"RSS after `Dataset.load`. Pairs / time vs previous: how much more of each the row has "
        f"than the row above (linear: equal). Plan epoch: `BatchPlanner.epoch` (hard batching, "
        f"{r['batch_size']} pairs, 3 neighbours per seed). batch_lists: per step over the first "
        f"{r['lists_steps']} batches of that epoch; explicit adds each batch's missing "
        f"top-{r['hard_k']} negatives to its pools. Load: the machine's 1-minute load average "
        f"before the measurement (shared machine: wall times inflate once it passes the core "
        f"count; the CPU seconds inflate less).\n\n"
        f"{lookup_table(rows)}\n\n"
        f"```json\n{json.dumps(rows, indent=2, sort_keys=True)}\n```\n"
    )
    path = RESULTS / "mine_scale.md"
    old = path.read_text() if path.is_file() else ""
    keep = old.split("\n" + LOOKUP_HEADING)[0].rstrip("\n")
    path.write_text((keep + "\n\n" if keep else "") + section)
    return path
