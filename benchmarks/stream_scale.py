"""Streaming evaluation and the feature store at scale: memory and time, before and after.

**Re-ranking** (``evaluate --rerank-teacher``) at COCO 5k test size: N images, M = 5N captions,
the dual encoder's top K = 128 both ways, with the full relation (the labels plus N extra true
pairs). The teacher is a stand-in: random float32 scores for every pair (the tiny BLIP teacher
would need hours for the ~3.8M pairs on 2 CPU cores), so only the ranking that follows the
teacher is measured: ``before`` is the former code (a Python dict of pair scores, dense (N, M)
and (M, N) rows of -inf, the metric's rank functions on them, kept here verbatim), ``after`` is
``pipeline.stages.rerank.reranked_metrics``. Each runs in a fresh child process that loads the
same inputs, resets its peak RSS and reports the peak above that baseline; the two must return
the same metrics.

**Feature store open**: a store of P parts (64 items each) is opened with its index
(``after``), and the same parts are read the way every open did before (each part's keys into a
dict, ``before``), best of 3 in one process.

    python benchmarks/stream_scale.py --quick --json   # N = 1000, 100 and 1000 parts
    python benchmarks/stream_scale.py                  # N = 5000 (COCO 5k), writes the results
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import best_of, in_child, status_kb, write_result  # noqa: E402


def _prepare(root: str, n: int, k: int, out: mp.Queue) -> None:
    """Embeddings, both top-K lists, stand-in teacher scores and a relation, saved under root."""
    import polars as pl

    from pipeline.core.candidates import candidate_pairs
    from pipeline.core.search import topk_search

    rng = np.random.default_rng(0)
    m, d = 5 * n, 256
    owner = np.repeat(np.arange(n), 5)
    image = rng.normal(size=(n, d)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    caption = image[owner] + 0.9 * rng.normal(size=(m, d)).astype(np.float32) / np.sqrt(d)
    caption /= np.linalg.norm(caption, axis=1, keepdims=True)
    _, top_c = topk_search(image, caption, k)  # (N, K)
    _, top_i = topk_search(caption, image, k)  # (M, K)
    top = pl.concat(
        [
            pl.DataFrame({"query_id": np.repeat(np.arange(n), k), "candidate_id": top_c.ravel()})
            .with_columns(direction=pl.lit("i2t")),
            pl.DataFrame({"query_id": np.repeat(np.arange(m), k), "candidate_id": top_i.ravel()})
            .with_columns(direction=pl.lit("t2i")),
        ]
    )  # fmt: skip
    pairs = candidate_pairs(top)
    own = (pairs["caption_id"].to_numpy() // 5) == pairs["image_id"].to_numpy()
    score = rng.normal(size=pairs.height) + 2.0 * own  # positives score higher, as a teacher's
    pairs.with_columns(score=pl.Series(score.astype(np.float32))).write_parquet(f"{root}/s.pq")
    extra = rng.integers(0, [n, m], (n, 2))
    rel_i, rel_c = np.concatenate([owner, extra[:, 0]]), np.concatenate([np.arange(m), extra[:, 1]])
    np.savez(f"{root}/in.npz", image=image, caption=caption, owner=owner, top_c=top_c,
             top_i=top_i, rel_i=rel_i, rel_c=rel_c)  # fmt: skip
    out.put({"pairs": pairs.height})


def before(image, caption, owner, top_c, top_i, scored, relation):
    """The former ranking of rerank_both (score "itm"), verbatim: dense rows of -inf."""
    import torch

    from pipeline.core.metrics import (
        i2t_ranks,
        relation_mask,
        relation_ranks,
        retrieval_metrics_from_ranks,
        sort_pairs,
        t2i_ranks,
    )

    scores = {(i, c): s for i, c, s in scored.select("image_id", "caption_id", "score").iter_rows()}
    i2t_sim = np.full((len(image), len(caption)), -np.inf, dtype=np.float32)  # (N, M)
    i2t_vals = [[scores[(r, c)] for c in top_c[r]] for r in range(len(image))]
    np.put_along_axis(i2t_sim, top_c, np.array(i2t_vals, dtype=np.float32), 1)
    t2i_sim = np.full((len(caption), len(image)), -np.inf, dtype=np.float32)  # (M, N)
    t2i_vals = [[scores[(i, r)] for i in top_i[r]] for r in range(len(caption))]
    np.put_along_axis(t2i_sim, top_i, np.array(t2i_vals, dtype=np.float32), 1)
    owner_t = torch.as_tensor(owner)
    i2t = i2t_ranks(i2t_sim, torch.arange(len(image)), owner_t)
    t2i = t2i_ranks(t2i_sim, owner_t)
    labelled = retrieval_metrics_from_ranks(i2t, t2i)
    i_mask = relation_mask(*sort_pairs(*relation, by="image"), 0, len(image), len(caption))
    c_mask = relation_mask(*sort_pairs(*relation, by="caption"), 0, len(caption), len(image))
    full = retrieval_metrics_from_ranks(
        relation_ranks(i2t_sim, i_mask), relation_ranks(t2i_sim, c_mask)
    )
    return labelled, full


def _rank(root: str, which: str, out: mp.Queue) -> None:
    """Load the inputs, then time one ranking and its peak RSS above the loaded inputs."""
    import polars as pl

    from pipeline.stages.rerank import reranked_metrics

    z = dict(np.load(f"{root}/in.npz"))
    scored = pl.read_parquet(f"{root}/s.pq")
    args = (z["image"], z["caption"], z["owner"], z["top_c"], z["top_i"], scored)
    relation = (z["rel_i"], z["rel_c"])
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    base = status_kb("VmRSS")
    t0 = time.perf_counter()
    if which == "before":
        metrics = before(*args, relation)
    else:
        metrics = reranked_metrics(*args, relation)
    seconds = time.perf_counter() - t0
    peak = status_kb("VmHWM") - base
    out.put({"seconds": round(seconds, 2), "peak_mb": round(peak / 1024), "metrics": metrics})


def measure_rerank(n: int, k: int) -> dict:
    """One row: the pair count, and seconds and peak MB of the ranking before and after."""
    root = tempfile.mkdtemp(prefix="rerank-")
    try:
        prepared = in_child(_prepare, root, n, k)
        runs = {which: in_child(_rank, root, which) for which in ("after", "before")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if runs["before"]["metrics"] != runs["after"]["metrics"]:
        raise AssertionError(f"before and after disagree: {runs}")
    row = {"images": n, "captions": 5 * n, "k": k, **prepared}
    for which, r in runs.items():
        row[f"{which}_seconds"], row[f"{which}_peak_mb"] = r["seconds"], r["peak_mb"]
    row["rsum"], row["rsum_full"] = (round(m["rsum"], 2) for m in runs["after"]["metrics"])
    return row


def _legacy_open(store_dir: Path) -> dict:
    """What every open did before the index: read each part's keys into one dict."""
    index: dict = {}
    for part in sorted(store_dir.glob("part-*.npz")):
        with np.load(part, allow_pickle=False) as z:
            for row, key in enumerate(z["keys"].tolist()):
                index.setdefault(key, (part, row))
    return index


def measure_open(parts: int, per_part: int = 64) -> dict:
    """One row: seconds to open a store of ``parts`` parts before (every part) and after (index)."""
    from pipeline.torchkit.features import FeatureStore

    root = Path(tempfile.mkdtemp(prefix="features-"))
    ident = {"bench": "open", "parts": parts}
    try:
        keys = [f"{i:064x}" for i in range(parts * per_part)]  # sha256-like hex keys
        rng = np.random.default_rng(0)
        FeatureStore(ident, root).get(
            keys,
            lambda rows: list(rng.normal(size=(len(rows), 1, 512)).astype(np.float16)),
            batch_size=per_part,
        )
        store_dir = FeatureStore(ident, root).dir
        assert len(list(store_dir.glob("part-*.npz"))) == parts
        t_before = best_of(lambda: _legacy_open(store_dir), 3)
        t_after = best_of(lambda: FeatureStore(ident, root), 3)
        opened = FeatureStore(ident, root)
        t0 = time.perf_counter()
        opened.get([keys[-1]], lambda rows: [])  # the first row read opens its one part
        t_row = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "parts": parts,
        "items": parts * per_part,
        "before_seconds": round(t_before, 4),
        "after_seconds": round(t_after, 4),
        "speedup": round(t_before / t_after, 1),
        "first_row_seconds": round(t_row, 4),
    }


def body(rerank: list[dict], opens: list[dict]) -> str:
    lines = [
        "## Re-ranking evaluation (ranking after the teacher; stand-in teacher scores)",
        "",
        "| images | captions | K | pairs | before s | before peak MB | after s | after peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rerank:
        lines.append(
            f"| {r['images']} | {r['captions']} | {r['k']} | {r['pairs']} | "
            f"{r['before_seconds']} | {r['before_peak_mb']} | {r['after_seconds']} | "
            f"{r['after_peak_mb']} |"
        )
    lines += [
        "",
        "Both return identical metrics (labels and full relation); peak is VmHWM above the "
        "loaded inputs in a fresh child process.",
        "",
        "## Feature store open",
        "",
        "| parts | items | before s (read every part) | after s (index) | speedup | first row s |",
        "|---|---|---|---|---|---|",
    ]
    for r in opens:
        lines.append(
            f"| {r['parts']} | {r['items']} | {r['before_seconds']} | {r['after_seconds']} | "
            f"{r['speedup']}x | {r['first_row_seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1000 instead of 5000")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    ap.add_argument("--parts", type=int, nargs="+", default=[100, 1000], help="store sizes")
    args = ap.parse_args()
    n = 1000 if args.quick else 5000
    rerank = [measure_rerank(n, 128)]
    opens = [measure_open(p) for p in args.parts]
    text = body(rerank, opens)
    print(text)
    if not args.quick:
        data = {"rerank": rerank, "open": opens}
        path = write_result("stream_scale", "Streaming evaluation and feature store", text, data)
        print(f"wrote {path}")
    if args.json:
        print(json.dumps({"rerank": rerank, "open": opens}))


if __name__ == "__main__":
    main()
