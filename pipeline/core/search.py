"""Top-k inner-product search between L2-normalised embeddings, in bounded memory.

Letters used in shape comments: Q queries, G gallery items, D embedding dim, B queries in a chunk.

Backends:
- ``faiss``: ``IndexFlatIP`` (exact), ``IndexIVFFlat`` or ``IndexHNSWFlat`` (approximate, for big
  galleries; measure what they lose with ``approximate_recall``, or tune them to a recall target
  with ``pipeline.core.ann``). Flat and IVF run on the GPU when this faiss build sees one
  (``faiss_device``); HNSW has no faiss GPU version and runs on the CPU.
- ``torch``: ``queries_chunk @ gallery.T`` then ``torch.topk``, on CUDA when available. Exact; the
  reference for tests, and the path taken when faiss is missing or cannot use the GPU.

Queries are searched ``chunk_size`` at a time, so no (Q, G) matrix is ever held; the torch path
also shrinks its chunk so one (B, G) score block stays under ``TORCH_BLOCK_ELEMENTS``.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
INDEXES = ("flat", "ivf", "hnsw")
KNOBS = {"ivf": "nprobe", "hnsw": "ef_search"}  # search-time knob: raise it for recall, pay speed
GPU_MAX_NPROBE = 2048  # faiss GPU IVF searches at most this many lists per query
TORCH_BLOCK_ELEMENTS = 1 << 28  # 1 GiB of float32 scores per (B, G) block


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) array, got shape {arr.shape}")
    return arr


def _check_inputs(
    queries: np.ndarray, gallery: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, int]:
    q, g = _as_matrix(queries, "queries"), _as_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"queries have dim {q.shape[1]} but gallery has dim {g.shape[1]}; "
            "encode both with the same model"
        )
    if g.shape[0] == 0:
        raise ValueError("gallery is empty; there is nothing to search")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > g.shape[0]:
        n = g.shape[0]
        msg = f"k={k} is larger than the gallery ({n} items); returning {n} per query"
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)
        k = g.shape[0]
    return q, g, k


def _resolve_backend(backend: str, index: str) -> tuple[str, str]:
    """Return (backend, device) actually used: ("faiss" | "torch", "cpu" | "cuda")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
    cuda = torch.cuda.is_available()
    if backend == "torch":
        if index != "flat":
            raise ValueError(
                f"index={index!r} needs backend 'faiss'; the torch backend is exact (index='flat')"
            )
        return "torch", "cuda" if cuda else "cpu"
    try:
        import faiss
    except ImportError as e:
        if backend == "faiss" or index != "flat":
            raise ImportError(
                f"backend={backend!r}, index={index!r} needs faiss, which failed to import ({e}); "
                "install faiss-cpu (or faiss-gpu), or use index='flat' with backend='torch'"
            ) from e
        log.info(
            "faiss is not importable (%s); using exact torch search on %s",
            e,
            "cuda" if cuda else "cpu",
        )
        return "torch", "cuda" if cuda else "cpu"
    device = faiss_device(index, cuda, faiss.get_num_gpus())
    if cuda and index == "flat" and device == "cpu" and backend == "auto":
        log.info("this faiss build has no GPU support; using exact torch search on cuda instead")
        return "torch", "cuda"
    return "faiss", device


def faiss_device(index: str, cuda: bool, faiss_gpus: int) -> str:
    """Where faiss runs ``index``: "cuda" for flat and ivf when torch sees CUDA and this faiss build
    sees a GPU (faiss-gpu), else "cpu" (faiss-cpu; and HNSW, which faiss has no GPU version of)."""
    return "cuda" if cuda and faiss_gpus > 0 and index in ("flat", "ivf") else "cpu"


def default_nlist(n: int) -> int:
    """IVF lists for a gallery of ``n``: about sqrt(n), capped so k-means sees >= 39 points per
    centroid (faiss's minimum). Not faiss's 4 sqrt(n): on 2 cores a 1M-item mixture built in 10 s
    with 1000 lists against 83 s with 4000, more than exact search of 20k queries saves."""
    return max(1, min(round(math.sqrt(n)), n // 39))


def _faiss_index(
    gallery: np.ndarray,
    index: str,
    device: str,
    *,
    k: int,
    nlist: int | None,
    nprobe: int,
    hnsw_m: int,
    ef_construction: int,
    ef_search: int,
):
    import faiss

    n, dim = gallery.shape
    if index == "flat":
        built = faiss.IndexFlatIP(dim)
        if device == "cuda":
            built = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, built)
    elif index == "ivf":
        nlist = nlist or default_nlist(n)
        if nlist > n:
            raise ValueError(
                f"--nlist {nlist} exceeds the gallery size {n}; pass a smaller --nlist"
            )
        quantizer = faiss.IndexFlatIP(dim)
        built = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on 64 points per list, not faiss's 256: a quarter of the training time (1M
        # mixture, nlist 1000: 3.4 s vs 13.6 s; recall@32 at nprobe 4 0.89 vs 0.92).
        built.cp.max_points_per_centroid = 64
        if device == "cuda":  # trained, filled and searched on the GPU (faiss-gpu)
            built = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, built)
        built.train(gallery)
    else:
        built = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efConstruction = ef_construction
    set_knob(built, index, nprobe if index == "ivf" else ef_search, k)
    built.add(gallery)
    log.info("faiss %s on %s: %s", index, device, index_settings(built, index))
    return built


def set_knob(built, index: str, value: int, k: int = 1) -> None:
    """Set ``built``'s search-time knob (KNOBS): IVF nprobe (at most nlist; GPU_MAX_NPROBE on the
    GPU), HNSW efSearch (at least k). Flat has none."""
    if index == "ivf":
        gpu = type(built).__name__.startswith("Gpu")
        built.nprobe = min(value, built.nlist, GPU_MAX_NPROBE if gpu else built.nlist)
    elif index == "hnsw":
        built.hnsw.efSearch = max(value, k)


def index_settings(built, index: str) -> dict:
    """The settings ``built`` was built and is searched with, as recorded in manifests."""
    if index == "ivf":
        return {"nlist": int(built.nlist), "nprobe": int(built.nprobe)}
    if index == "hnsw":
        h = built.hnsw
        m = int(h.nb_neighbors(1))  # level-1 links are M (level 0 has 2M)
        return {"hnsw_m": m, "ef_construction": int(h.efConstruction), "ef_search": int(h.efSearch)}
    return {}


def search_index(
    built, queries: np.ndarray, k: int, *, chunk_size: int = 4096, index: str = "", warn=True
):
    """Return (scores (Q, k) float32, ids (Q, k) int64) of a built faiss index, ``chunk_size``
    queries at a time; slots an approximate index left empty hold id -1 and score -inf (warned,
    unless ``warn`` is False: a tuning step expects them)."""
    q = _as_matrix(queries, "queries")
    scores = np.empty((q.shape[0], k), dtype=np.float32)  # (Q, k)
    ids = np.empty((q.shape[0], k), dtype=np.int64)  # (Q, k)
    for s in range(0, q.shape[0], chunk_size):
        top_s, top_i = built.search(q[s : s + chunk_size], k)  # (B, k) each
        scores[s : s + chunk_size] = top_s
        ids[s : s + chunk_size] = top_i
    missing = ids < 0
    scores[missing] = -np.inf
    if warn and missing.any():
        msg = (
            f"{index} index returned fewer than k={k} results for {int(missing.any(1).sum())} "
            "queries (id -1); raise nprobe/ef_search or use index='flat'"
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return scores, ids


def build_index(
    gallery: np.ndarray,
    index: str = "flat",
    *,
    nlist: int | None = None,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    ef_search: int = 128,
    device: str = "cpu",
):
    """A faiss index over the rows of ``gallery`` (row r gets id r), built as ``topk_search``
    does: ``flat`` (exact), ``ivf`` or ``hnsw``; on ``device`` "cpu" it is ready for
    ``faiss.write_index`` (which stores nprobe / efSearch with it)."""
    if index not in INDEXES:
        raise ValueError(f"--index must be one of {', '.join(INDEXES)}, got '{index}'")
    g = _as_matrix(gallery, "gallery")
    if g.shape[0] == 0:
        raise ValueError("gallery is empty; there is nothing to index")
    return _faiss_index(
        g,
        index,
        device,
        k=1,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
    )


def topk_search(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    index: str = "flat",
    chunk_size: int = 4096,
    nlist: int | None = None,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_construction: int = 80,
    ef_search: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores (Q, k) float32, ids (Q, k) int64): each query's top-k rows, best first.

    Scores are inner products (cosine similarity for L2-normalised inputs). ``k`` larger than
    the gallery is clamped to its size with a warning. Approximate indexes (``ivf``, ``hnsw``)
    may find fewer than k items for a query: those slots hold id -1 and score -inf, with a
    warning. ``nlist``/``nprobe`` tune IVF; ``hnsw_m``/``ef_construction``/``ef_search`` HNSW.
    """
    q, g, k = _check_inputs(queries, gallery, k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    which, device = _resolve_backend(backend, index)
    log.info(
        "top-%d search: %d queries x %d gallery (dim %d) with %s %s on %s",
        k,
        q.shape[0],
        g.shape[0],
        g.shape[1],
        which,
        index,
        device,
    )
    if which == "torch":
        scores = np.empty((q.shape[0], k), dtype=np.float32)  # (Q, k)
        ids = np.empty((q.shape[0], k), dtype=np.int64)  # (Q, k)
        chunk = max(1, min(chunk_size, TORCH_BLOCK_ELEMENTS // g.shape[0]))
        g_t = torch.from_numpy(g).to(device)  # (G, D)
        with torch.no_grad():
            for s in range(0, q.shape[0], chunk):
                q_t = torch.from_numpy(q[s : s + chunk]).to(device)  # (B, D)
                top_s, top_i = torch.topk(q_t @ g_t.T, k, dim=1)  # (B, k), sorted best first
                scores[s : s + chunk] = top_s.cpu().numpy()
                ids[s : s + chunk] = top_i.cpu().numpy()
        return scores, ids

    built = _faiss_index(
        g,
        index,
        device,
        k=k,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
    )
    return search_index(built, q, k, chunk_size=chunk_size, index=index)


def approximate_recall(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    ids_approx: np.ndarray,
    *,
    sample: int = 1000,
    seed: int = 0,
    backend: str = "auto",
) -> float:
    """Return recall@k in [0, 1] of ``ids_approx`` (Q, k) against exact search on sampled queries.

    Recall is the mean, over up to ``sample`` queries drawn with ``seed``, of the fraction of
    the exact top-k ids that the approximate top-k also contains.
    """
    q, g, k = _check_inputs(queries, gallery, k)
    approx = np.asarray(ids_approx)
    if approx.shape != (q.shape[0], k):
        raise ValueError(
            f"ids_approx has shape {approx.shape} but expected {(q.shape[0], k)} "
            "(one row of top-k ids per query, k clamped to the gallery size)"
        )
    rows, exact = exact_sample(q, g, k, sample=sample, seed=seed, backend=backend)
    return recall_of(exact, approx[rows])


def exact_sample(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    sample: int = 1000,
    seed: int = 0,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Return (rows (S,), exact ids (S, k)): up to ``sample`` query rows drawn with ``seed``,
    sorted, and their exact top-k, the reference ``recall_of`` compares against."""
    q, g, k = _check_inputs(queries, gallery, k)
    if sample < 1 or q.shape[0] == 0:
        raise ValueError(
            f"need sample >= 1 and at least one query, got sample={sample}, {q.shape[0]} queries"
        )
    rows = np.sort(
        np.random.default_rng(seed).choice(q.shape[0], min(sample, q.shape[0]), replace=False)
    )
    _, exact = topk_search(q[rows], g, k, backend=backend, index="flat")  # (S, k)
    return rows, exact


def recall_of(exact: np.ndarray, approx: np.ndarray) -> float:
    """Mean over rows of the fraction of ``exact`` (S, k) ids that ``approx`` (S, k) also holds."""
    hits = [np.isin(e, a).sum() for e, a in zip(exact, approx, strict=True)]
    return float(np.sum(hits) / exact.size)
