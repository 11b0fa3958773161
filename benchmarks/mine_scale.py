"""Mining at scale: top-k search time and peak memory as the gallery grows, exact vs approximate.

Each configuration runs in a fresh child process so its peak RSS is its own. Vectors are random
unit vectors (D = 128) with a planted near-duplicate per query, so recall is meaningful.

    python benchmarks/mine_scale.py --quick --json
    python benchmarks/mine_scale.py                      # 10k, 100k, 1M gallery
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import write_result  # noqa: E402


def _vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _run(gallery_size: int, queries: int, k: int, index: str, out: mp.Queue) -> None:
    from pipeline.search import approximate_recall, topk_search

    g = _vectors(gallery_size, 128, 0)
    q = g[:queries] + 0.05 * _vectors(queries, 128, 1)  # each query has a near-duplicate
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t0 = time.perf_counter()
    _, ids = topk_search(q, g, k, index=index)
    seconds = time.perf_counter() - t0
    recall = 1.0 if index == "flat" else approximate_recall(q, g, k, ids, sample=200)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put(
        {
            "gallery": gallery_size,
            "queries": queries,
            "k": k,
            "index": index,
            "seconds": seconds,
            "queries_per_s": queries / seconds,
            "recall": recall,
            "peak_rss_mb": peak_mb,
            "gallery_mb": g.nbytes / 2**20,
        }
    )


def measure(gallery_size: int, queries: int, k: int, index: str) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_run, args=(gallery_size, queries, k, index, out))
    p.start()
    result = out.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--indexes", default="flat,hnsw,ivf")
    ap.add_argument("--quick", action="store_true", help="10k and 50k galleries, 1k queries")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.queries = "10000,50000", 1000
    rows = [
        measure(int(n), args.queries, args.k, ix)
        for n in args.sizes.split(",")
        for ix in args.indexes.split(",")
    ]
    flat = {r["gallery"]: r["seconds"] for r in rows if r["index"] == "flat"}
    for r in rows:
        r["speedup_vs_flat"] = flat[r["gallery"]] / r["seconds"]
    lines = [
        "| gallery | index | queries/s | vs flat | recall@k | peak RSS MB | gallery MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['gallery']:,} | {r['index']} | {r['queries_per_s']:.0f} | "
        f"{r['speedup_vs_flat']:.2f}x | {r['recall']:.3f} | {r['peak_rss_mb']:.0f} | "
        f"{r['gallery_mb']:.0f} |"
        for r in rows
    ]
    body = "\n".join(lines)
    result = {"rows": rows}
    if not args.quick:
        write_result(
            "mine_scale", f"Mining at scale ({args.queries} queries, k = {args.k})", body, result
        )
    print(json.dumps(result, sort_keys=True) if args.json else body)


if __name__ == "__main__":
    main()
