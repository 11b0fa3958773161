"""Approximate top-k search with its settings on the command line and an optional recall target.

``search_ann`` builds one faiss index over the gallery, measures exact top-k on a seeded sample of
the queries, and (with ``target_recall``) doubles the index's search knob (IVF ``nprobe``, HNSW
``efSearch``) until the sample's recall@k reaches the target or the knob its maximum; then it
searches every query with the setting found and reports the index, its settings as used and the
measured sample recall. Exact flat search reports recall 1.0.

Letters used in shape comments: Q queries, G gallery items, S sampled queries, k results.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np

from pipeline.core.search import (
    GPU_MAX_NPROBE,
    INDEXES,
    KNOBS,
    _check_inputs,
    _resolve_backend,
    build_index,
    exact_sample,
    index_settings,
    recall_of,
    search_index,
    set_knob,
    topk_search,
)

log = logging.getLogger(__name__)

HNSW_MAX_EF = 4096  # efSearch beyond this costs more than exact search on any gallery we mine
FLAGS = {  # setting -> (its flag, the index it applies to)
    "nlist": ("--nlist", "ivf"),
    "nprobe": ("--nprobe", "ivf"),
    "hnsw_m": ("--hnsw-m", "hnsw"),
    "ef_construction": ("--ef-construction", "hnsw"),
    "ef_search": ("--ef-search", "hnsw"),
}


@dataclass(frozen=True)
class AnnSettings:
    """How an approximate index is built and searched; None: the default noted per field."""

    nlist: int | None = None  # IVF lists; None: about sqrt(gallery size)
    nprobe: int | None = None  # IVF lists searched per query; None: 32, or 1 to start tuning
    hnsw_m: int | None = None  # HNSW links per node; None: 32
    ef_construction: int | None = None  # HNSW candidate list while building; None: 80
    ef_search: int | None = None  # HNSW candidate list per query; None: 128, or k to start tuning
    target_recall: float | None = None  # tune nprobe / ef_search until sampled recall@k >= this
    sample: int = 1000  # queries sampled (seeded) to measure recall against exact search

    def check(self, index: str) -> None:
        """Raise ValueError naming the flag when a value is out of range or for another index."""
        if index not in INDEXES:
            raise ValueError(f"--index must be one of {', '.join(INDEXES)}, got '{index}'")
        for name, (flag, owner) in FLAGS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
            if owner != index:
                raise ValueError(
                    f"{flag} applies to --index {owner}, not {index}; drop it or pass "
                    f"--index {owner}"
                )
        r = self.target_recall
        if r is not None and not 0 < r <= 1:
            raise ValueError(f"--target-recall must be in (0, 1], got {r}; e.g. 0.95")
        if self.sample < 1:
            raise ValueError(f"the recall sample must be >= 1 query, got {self.sample}")


def _ladder(start: int, top: int) -> list[int]:
    """start, 2 start, 4 start, ... up to and including ``top`` (the knob's maximum)."""
    values = [min(start, top)]
    while values[-1] < top:
        values.append(min(2 * values[-1], top))
    return values


def search_ann(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    index: str = "flat",
    settings: AnnSettings = AnnSettings(),
    *,
    seed: int = 0,
    chunk_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return (scores (Q, k), ids (Q, k), report): each query's top-k gallery rows, best first.

    The report holds ``index``, ``device``, ``settings`` (as used), ``recall`` (recall@k on the
    sampled queries against exact search; 1.0 for flat), ``sample`` (queries in it), and with a
    target: ``target_recall``, ``reached`` and ``tried`` (each knob value and its recall), plus
    ``build_s``, ``tune_s`` (exact search on the sample, and the tuning) and ``search_s``.
    """
    settings.check(index)
    q, g, k = _check_inputs(queries, gallery, k)
    if index == "flat":
        t0 = time.perf_counter()
        scores, ids = topk_search(q, g, k, chunk_size=chunk_size)
        report = {"index": "flat", "settings": {}, "recall": 1.0, "sample": 0}
        if settings.target_recall is not None:  # exact search meets any target
            report |= {"target_recall": settings.target_recall, "reached": True, "tried": []}
        return scores, ids, {**report, "search_s": time.perf_counter() - t0}
    _, device = _resolve_backend("faiss", index)
    knob = KNOBS[index]
    tuning = settings.target_recall is not None
    # Tuning starts low (the knob's flag, else IVF 1 list / HNSW k) and doubles.
    start = (getattr(settings, knob) or (1 if index == "ivf" else k)) if tuning else None
    t0 = time.perf_counter()
    built = build_index(
        g,
        index,
        nlist=settings.nlist,
        nprobe=settings.nprobe or (start if tuning else 32),
        hnsw_m=settings.hnsw_m or 32,
        ef_construction=settings.ef_construction or 80,
        ef_search=settings.ef_search or (start if tuning else 128),
        device=device,
    )
    build_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows, exact = exact_sample(q, g, k, sample=settings.sample, seed=seed)  # (S,), (S, k)
    n = len(rows)
    report: dict = {"index": index, "device": device, "sample": n}
    if tuning:
        if index == "ivf":
            top = min(built.nlist, GPU_MAX_NPROBE) if device == "cuda" else built.nlist
        else:
            top = max(HNSW_MAX_EF, k)
        tried = []
        for value in _ladder(start, top):
            set_knob(built, index, value, k)
            _, got = search_index(built, q[rows], k, chunk_size=chunk_size, warn=False)
            recall = recall_of(exact, got)
            tried.append({knob: value, "recall": recall})
            log.info("%s %s=%d: recall@%d %.4f on %d queries", index, knob, value, k, recall, n)
            if recall >= settings.target_recall:
                break
        reached = tried[-1]["recall"] >= settings.target_recall
        report |= {"target_recall": settings.target_recall, "reached": reached, "tried": tried}
        if not reached:
            msg = (
                f"--target-recall {settings.target_recall} not reached: {index} recall@{k} is "
                f"{tried[-1]['recall']:.4f} at its largest {knob}={tried[-1][knob]}; use "
                "--index flat (exact), or build a finer index ("
                # IVF misses only where the GPU caps nprobe below nlist
                + ("fewer --nlist" if index == "ivf" else "larger --hnsw-m / --ef-construction")
                + ")"
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
    tune_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores, ids = search_index(built, q, k, chunk_size=chunk_size, index=index)
    search_s = time.perf_counter() - t0
    report |= {
        "settings": index_settings(built, index),
        "recall": recall_of(exact, ids[rows]),
        "build_s": build_s,
        "tune_s": tune_s,
        "search_s": search_s,
    }
    log.info(
        "%s index %s: recall@%d %.4f vs exact search on %d sampled queries",
        index,
        report["settings"],
        k,
        report["recall"],
        len(rows),
    )
    return scores, ids, report
