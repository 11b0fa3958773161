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

**Lookup** (``--lookup``, on by default): the teacher lookup at about 1M, 10M, 43M and 100M
cached pairs, measured by ``benchmarks/lookup_scale.py`` (its docstring says how).

    python benchmarks/mine_scale.py --lookup --quick --json
    python benchmarks/mine_scale.py                      # 10k, 100k, 1M gallery; 1M-100M pairs
    python benchmarks/mine_scale.py --no-lookup          # the mining table only (keeps the lookup)
    python benchmarks/mine_scale.py --no-mine            # the lookup only (keeps the mining table)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    in_child,
    write_result,
)
from benchmarks.lookup_scale import (  # noqa: E402
    LOOKUP_HEADING,
    lookup_table,
    measure_lookup,
    write_lookup_section,
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
