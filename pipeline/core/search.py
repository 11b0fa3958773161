"""Top-k inner-product search between L2-normalised embeddings, in bounded memory.

Letters used in shape comments: Q queries, G gallery items, D embedding dim, B queries in a chunk.

Backends:
- ``faiss``: ``IndexFlatIP`` (exact), ``IndexIVFFlat`` or ``IndexHNSWFlat`` (approximate, for big
  galleries; measure what they lose with ``approximate_recall``). Flat runs on the GPU when this
  faiss build has GPU support; IVF and HNSW run on the CPU.
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
    faiss_gpu = cuda and faiss.get_num_gpus() > 0
    if cuda and index == "flat" and not faiss_gpu and backend == "auto":
        log.info("this faiss build has no GPU support; using exact torch search on cuda instead")
        return "torch", "cuda"
    return "faiss", "cuda" if (faiss_gpu and index == "flat") else "cpu"


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
        # ~4 sqrt(G) lists, capped so k-means sees >= 39 points per centroid (faiss's minimum).
        nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            raise ValueError(f"nlist={nlist} exceeds the gallery size {n}; pass a smaller nlist")
        quantizer = faiss.IndexFlatIP(dim)
        built = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        built.train(gallery)
        built.nprobe = min(nprobe, nlist)
        log.info("faiss IVF: nlist=%d nprobe=%d", nlist, built.nprobe)
    else:
        built = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efConstruction = ef_construction
        built.hnsw.efSearch = max(ef_search, k)
        log.info(
            "faiss HNSW: M=%d efConstruction=%d efSearch=%d",
            hnsw_m,
            ef_construction,
            built.hnsw.efSearch,
        )
    built.add(gallery)
    return built


def build_index(
    gallery: np.ndarray,
    index: str = "flat",
    *,
    nlist: int | None = None,
    hnsw_m: int = 32,
    ef_construction: int = 80,
):
    """A CPU faiss index over the rows of ``gallery`` (row r gets id r), ready for
    ``faiss.write_index``: ``flat`` (exact), ``ivf`` or ``hnsw`` built as ``topk_search`` does."""
    if index not in INDEXES:
        raise ValueError(f"--index must be one of {', '.join(INDEXES)}, got '{index}'")
    g = _as_matrix(gallery, "gallery")
    if g.shape[0] == 0:
        raise ValueError("gallery is empty; there is nothing to index")
    return _faiss_index(
        g,
        index,
        "cpu",
        k=1,
        nlist=nlist,
        nprobe=32,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=128,
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
    scores = np.empty((q.shape[0], k), dtype=np.float32)  # (Q, k)
    ids = np.empty((q.shape[0], k), dtype=np.int64)  # (Q, k)

    if which == "torch":
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
    for s in range(0, q.shape[0], chunk_size):
        top_s, top_i = built.search(q[s : s + chunk_size], k)  # (B, k) each
        scores[s : s + chunk_size] = top_s
        ids[s : s + chunk_size] = top_i
    missing = ids < 0
    if missing.any():
        scores[missing] = -np.inf
        msg = (
            f"{index} index returned fewer than k={k} results for {int(missing.any(1).sum())} "
            "queries (id -1); raise nprobe/ef_search or use index='flat'"
        )
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return scores, ids


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
    if sample < 1 or q.shape[0] == 0:
        raise ValueError(
            f"need sample >= 1 and at least one query, got sample={sample}, {q.shape[0]} queries"
        )
    rows = np.sort(
        np.random.default_rng(seed).choice(q.shape[0], min(sample, q.shape[0]), replace=False)
    )
    _, exact = topk_search(q[rows], g, k, backend=backend, index="flat")  # (S, k)
    hits = [np.isin(exact[i], approx[r]).sum() for i, r in enumerate(rows)]
    return float(np.sum(hits) / (len(rows) * k))
