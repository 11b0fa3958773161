"""Mining at scale: top-k search time and peak memory as the gallery grows, exact vs approximate;
and the teacher lookup that train-student builds, at COCO scale.

Each configuration runs in a fresh child process so its peak RSS is its own.

**Mining** (``--mine``, on by default): for each gallery size and data set, exact flat search
against the approximate indexes as ``cprd mine-candidates --index ivf|hnsw --target-recall R``
runs them (``pipeline.core.ann.search_ann``: build the index once, measure exact top-k on 1000
seeded sample queries, double nprobe / efSearch until the sample's recall@k >= R, search every
query). The speedup is the whole cost a user pays (build + exact sample + tuning + search of all
the queries) over exact flat search of the same queries; search-only is reported too. Data, D =
128, unit norm: ``mixture``, a two-level mixture of Gaussians on the sphere (MIXTURE: 50 topics,
40 sub-centres each, points = sub-centre + noise), gallery and queries drawn independently from
it, as images and captions of one data set are; and ``random``, uniform on the sphere (no
neighbourhood structure: the worst case for any index).

**Lookup** (``--lookup``, on by default): a child process writes a synthetic dataset of COCO's
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

    python benchmarks/mine_scale.py --lookup --quick --json
    python benchmarks/mine_scale.py                      # 10k, 100k, 1M gallery; 1M-100M pairs
    python benchmarks/mine_scale.py --no-lookup          # the mining table only (keeps the lookup)
    python benchmarks/mine_scale.py --no-mine            # the lookup only (keeps the mining table)
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    command,
    in_child,
    machine,
    status_kb,
    write_result,
)

# Two-level mixture on the sphere; point noise is per coordinate / sqrt(D), so a point's cosine
# to its sub-centre is about 1 / sqrt(1 + point_noise^2) = 0.71.
MIXTURE = {"topics": 50, "per_topic": 40, "centre_noise": 0.6, "point_noise": 1.0, "dim": 128}


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _points(data: str, n: int, seed: int) -> np.ndarray:
    """``n`` unit vectors of ``data`` ("mixture" or "random"); the mixture's centres are fixed."""
    d = MIXTURE["dim"]
    rng = np.random.default_rng(seed)
    if data == "random":
        return _unit(rng.standard_normal((n, d), dtype=np.float32))
    fixed = np.random.default_rng(0)
    topics = _unit(fixed.standard_normal((MIXTURE["topics"], d)))
    centres = np.repeat(topics, MIXTURE["per_topic"], axis=0)
    centres = _unit(
        centres + MIXTURE["centre_noise"] * fixed.standard_normal(centres.shape) / d**0.5
    )
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 18):  # bounded temporaries at 1M
        m = min(n - s, 1 << 18)
        noise = rng.standard_normal((m, d), dtype=np.float32) * (MIXTURE["point_noise"] / d**0.5)
        out[s : s + m] = _unit(centres[rng.integers(0, len(centres), m)] + noise)
    return out


def _run(gallery_size: int, queries: int, k: int, index: str, data: str, target: float, out):
    """Child: one (gallery, data, index) row, timed as mine-candidates runs it."""
    from pipeline.core.ann import AnnSettings, search_ann

    load_avg = os.getloadavg()[0]  # other processes on the machine slow every timing below
    g = _points(data, gallery_size, 1)
    q = _points(data, queries, 2)
    settings = AnnSettings(target_recall=None if index == "flat" else target)
    t0 = time.perf_counter()
    _, _, report = search_ann(q, g, k, index, settings)
    total = time.perf_counter() - t0
    out.put(
        {
            "gallery": gallery_size,
            "queries": queries,
            "k": k,
            "data": data,
            "index": index,
            "target_recall": settings.target_recall,
            "settings": report["settings"],
            "tried": report.get("tried"),
            "reached": report.get("reached"),
            "recall": report["recall"],
            "recall_sample": report["sample"],
            "build_s": report.get("build_s", 0.0),
            "tune_s": report.get("tune_s", 0.0),
            "search_s": report["search_s"],
            "seconds": total,
            "queries_per_s": queries / report["search_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gallery_mb": g.nbytes / 2**20,
            "load_avg_1min": load_avg,
            "load_avg_1min_after": os.getloadavg()[0],
        }
    )


def measure(gallery_size: int, queries: int, k: int, index: str, data: str, target: float) -> dict:
    return in_child(_run, gallery_size, queries, k, index, data, target)


def mining_rows(args) -> list[dict]:
    """Every (gallery, data, index) row, with its speedup over exact flat search."""
    rows = []
    approximate = [ix for ix in args.indexes.split(",") if ix != "flat"]
    for n, queries, data in itertools.product(
        [int(x) for x in args.sizes.split(",")],
        [int(x) for x in str(args.queries).split(",")],
        args.data.split(","),
    ):
        if data == "random" and queries > args.random_max_queries:
            continue
        group = []
        # Exact search before and after the indexes: the baseline is their mean, so a load
        # that drifts on the shared machine does not favour either side.
        for ix in ["flat", *approximate, "flat"]:
            if ix == "hnsw" and n > args.hnsw_max_gallery:
                continue
            group.append(measure(n, queries, args.k, ix, data, args.target_recall))
            print(json.dumps(group[-1], sort_keys=True), file=sys.stderr, flush=True)
        before, after = group[0], group.pop()
        before["seconds_runs"] = [before["seconds"], after["seconds"]]
        for key in ("seconds", "search_s"):
            before[key] = (before[key] + after[key]) / 2
        before["queries_per_s"] = before["queries"] / before["search_s"]
        before["load_avg_1min_after"] = after["load_avg_1min_after"]
        base = group[0]
        for r in group:
            r["speedup_vs_exact"] = base["seconds"] / r["seconds"]
            r["search_speedup_vs_exact"] = base["search_s"] / r["search_s"]
        rows += group
    return rows


def mining_table(rows: list[dict]) -> str:
    columns = [
        "gallery", "queries", "data", "index", "settings (tuned)", "recall@k", "build s",
        "sample + tune s", "search s", "total s", "speedup (total)", "speedup (search)",
        "peak RSS MB", "load",
    ]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += [
        f"| {r['gallery']:,} | {r['queries']:,} | {r['data']} | {r['index']} | "
        f"{', '.join(f'{k}={v}' for k, v in r['settings'].items()) or '-'} | "
        f"{r['recall']:.3f}{'' if r['reached'] is not False else ' (target missed)'} | "
        f"{r['build_s']:.2f} | {r['tune_s']:.2f} | {r['search_s']:.2f} | {r['seconds']:.2f} | "
        f"{r['speedup_vs_exact']:.2f}x | {r['search_speedup_vs_exact']:.2f}x | "
        f"{r['peak_rss_mb']:.0f} | {r['load_avg_1min']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def ann_summary(rows: list[dict]) -> list[dict]:
    """The ``ann`` list of the JSON line: one entry per approximate row."""
    keep = ("gallery", "queries", "data", "index", "settings", "recall", "speedup_vs_exact")
    return [
        {**{k: r[k] for k in keep}, "search_speedup_vs_exact": r["search_speedup_vs_exact"]}
        for r in rows
        if r["index"] != "flat"
    ]


def mining_body(rows: list[dict], args) -> str:
    cores = len(os.sched_getaffinity(0))
    return (
        f"Queries: {args.queries} per gallery (a mining run queries a whole split: 20k "
        f"captions is a small data set, and a 1M-image gallery comes with millions of caption "
        f"queries), k = {args.k}, nproc {cores}, faiss with its default "
        f"OpenMP threads. Approximate rows as `mine-candidates --target-recall "
        f"{args.target_recall}` runs them: recall@k on 1000 seeded sample queries against exact "
        f"search. Total: build + sample (exact search of the 1000) + tuning + search of every "
        f"query; exact flat is its search alone. Speedups are over exact flat search of the same "
        f"queries on the same data, run before and after the indexes (its row: the mean; "
        f"`seconds_runs` in the JSON: both). Mixture: {json.dumps(MIXTURE)}. Load: the "
        f"machine's 1-minute load average when the row started (shared machine: timings "
        f"inflate once it passes the core count). HNSW rows stop at galleries of "
        f"{args.hnsw_max_gallery:,}; random-data rows at {args.random_max_queries:,} queries "
        f"(there IVF needs every list: 75 queries/s at 1M, so 100k queries take 20 min).\n\n"
        f"{mining_table(rows)}"
    )


# ---- the teacher lookup at COCO scale ----------------------------------------------------------

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument(
        "--queries", default="20000", help="queries per mining run; a list: 20000,100000"
    )
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--indexes", default="flat,ivf,hnsw")
    ap.add_argument("--data", default="mixture,random", help="mixture and/or random")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--hnsw-max-gallery", type=int, default=100_000, help="no HNSW row above")
    ap.add_argument(
        "--random-max-queries", type=int, default=20_000, help="no random-data row above"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="10k and 50k galleries, 2k queries; lookup at about 1M and 10M pairs",
    )
    ap.add_argument(
        "--mine", action=argparse.BooleanOptionalAction, default=True, help="the mining table"
    )
    ap.add_argument(
        "--lookup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the teacher lookup at COCO scale",
    )
    ap.add_argument(
        "--lookup-scales",
        default="0.0233,0.233,1,2.33",
        help="fractions of COCO's size (at k 64: about 1M, 10M, 43M and 100M cached pairs)",
    )
    ap.add_argument("--lookup-k", type=int, default=64, help="candidates per query")
    ap.add_argument("--lookup-shards", type=int, default=64)
    ap.add_argument("--hard-k", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lookup-steps", type=int, default=300, help="steps timed for batch_lists")
    ap.add_argument("--lookup-dir", help="keep the synthetic data here (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.queries, args.lookup_scales = "10000,50000", "2000", "0.0233,0.233"
    rows = mining_rows(args) if args.mine else []
    body = mining_body(rows, args) if rows else ""
    result = {"rows": rows, "ann": ann_summary(rows)}
    if rows and not args.quick:
        path = RESULTS / "mine_scale.md"
        lookup_part = ""
        if path.is_file() and ("\n" + LOOKUP_HEADING) in path.read_text():
            lookup_part = LOOKUP_HEADING + path.read_text().split("\n" + LOOKUP_HEADING, 1)[1]
        write_result(
            "mine_scale", f"Mining at scale ({args.queries} queries, k = {args.k})", body, result
        )
        if lookup_part:  # write_result replaced the file: keep the lookup section below
            path.write_text(path.read_text().rstrip("\n") + "\n\n" + lookup_part)
    if args.lookup:
        lookup = [
            measure_lookup(
                float(s),
                args.lookup_k,
                args.lookup_shards,
                args.hard_k,
                args.batch_size,
                args.lookup_steps,
                args.lookup_dir,
            )
            for s in args.lookup_scales.split(",")
        ]
        result["lookup"] = lookup
        body = "\n\n".join(b for b in (body, lookup_table(lookup)) if b)
        if not args.quick:
            write_lookup_section(lookup)
    print(json.dumps(result, sort_keys=True) if args.json else body)


if __name__ == "__main__":
    main()
