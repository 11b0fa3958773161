"""Two-stage retrieval: the dual encoder's top-K per query, re-ranked by the teacher's ITM score.

This is the accuracy the student tries to reach at dual-encoder cost (LAVIS uses K = 128 for
Flickr30K, 256 for COCO). Letters in shape comments: N images, M captions, K re-ranked, B chunk.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from tqdm import tqdm

from pipeline.core.candidates import candidate_pairs
from pipeline.core.metrics import retrieval_metrics_from_ranks, topk_ranks
from pipeline.core.search import topk_search
from teacher.scoring import score_pairs

RERANK_SCORES = ("itm", "itm+itc")  # LAVIS ranks by itm+itc; cprd's default stays itm


def rerank_metrics(
    image: np.ndarray,
    caption: np.ndarray,
    owner: np.ndarray,
    teacher,
    image_paths: list,
    texts: list[str],
    k: int,
    batch_size: int = 64,
    progress: bool = True,
    score: str = "itm",
) -> dict[str, float]:
    """Recall of the dual encoder's top-``k`` re-ranked by the teacher (items beyond k: misses).

    ``image`` (N, D) and ``caption`` (M, D) are unit-norm embeddings, ``owner`` (M,) the image
    row of each caption, ``image_paths``/``texts`` the files and texts of those rows.
    ``score``: ``itm`` ranks by the teacher's ITM match logit alone; ``itm+itc`` by that logit
    plus the first stage's cosine similarity, LAVIS's protocol (its BLIP/ALBEF retrieval
    evaluation adds the ITC similarity that chose the top-K to the ITM logit).
    """
    return rerank_both(
        image, caption, owner, teacher, image_paths, texts, k, None, batch_size, progress, score
    )[0]


def rerank_both(
    image: np.ndarray,
    caption: np.ndarray,
    owner: np.ndarray,
    teacher,
    image_paths: list,
    texts: list[str],
    k: int,
    relation: tuple[np.ndarray, np.ndarray] | None,
    batch_size: int = 64,
    progress: bool = True,
    score: str = "itm",
) -> tuple[dict[str, float], dict[str, float] | None]:
    """(``rerank_metrics`` on the labels, the same on the full relation or None without one).

    ``relation`` is (image rows (P,), caption rows (P,)) of every true match among these rows.
    """
    if score not in RERANK_SCORES:
        raise ValueError(f"--rerank-score must be one of {', '.join(RERANK_SCORES)}, got {score!r}")
    k_i2t, k_t2i = min(k, len(caption)), min(k, len(image))
    _, top_c = topk_search(image, caption, k_i2t)  # (N, K) caption rows per image
    _, top_i = topk_search(caption, image, k_t2i)  # (M, K) image rows per caption
    top = pl.concat(
        [
            pl.DataFrame(
                {"query_id": np.repeat(np.arange(len(image)), k_i2t), "candidate_id": top_c.ravel()}
            ).with_columns(direction=pl.lit("i2t")),
            pl.DataFrame(
                {
                    "query_id": np.repeat(np.arange(len(caption)), k_t2i),
                    "candidate_id": top_i.ravel(),
                }
            ).with_columns(direction=pl.lit("t2i")),
        ]
    )
    pairs = candidate_pairs(top)  # rows as ids; a pair met from both sides is scored once
    bar = tqdm(total=pairs.height, desc="teacher re-ranking", unit="pair", disable=not progress)
    scored = score_pairs(
        teacher,
        pairs,
        image_paths,
        texts,
        batch_size=batch_size,
        bar=bar,
    )
    bar.close()
    return reranked_metrics(image, caption, owner, top_c, top_i, scored, relation, score)


def reranked_metrics(
    image: np.ndarray,
    caption: np.ndarray,
    owner: np.ndarray,
    top_c: np.ndarray,
    top_i: np.ndarray,
    scored: pl.DataFrame,
    relation: tuple[np.ndarray, np.ndarray] | None,
    score: str = "itm",
    chunk_size: int = 4096,
) -> tuple[dict[str, float], dict[str, float] | None]:
    """``rerank_both``'s result from the top-K and the teacher's scores, in (B, K) chunks.

    ``top_c`` (N, K) are each image's caption rows, ``top_i`` (M, K) each caption's image rows,
    ``scored`` holds ``image_id, caption_id, score`` (rows) for every pair among them. Nothing
    (N, M) is built: each query is ranked among its own top-K (``metrics.topk_ranks``), items it
    did not retrieve rank behind all of them.
    """
    n, m = len(image), len(caption)
    keys, values = _pair_scores(image, caption, scored, score)
    owner = np.asarray(owner, dtype=np.int64)  # (M,)
    rel, rel_i, rel_c = None, None, None
    if relation is not None:
        rel = np.unique(_pair_key(*(np.asarray(r, dtype=np.int64) for r in relation), m))  # (P,)
        rel_i, rel_c = np.divmod(rel, m)  # (P,), (P,)
    # Per direction: the query's candidates, whether each is its labelled match, how many
    # labelled and truly matching items the whole gallery holds for it.
    directions = (
        ("i2t", top_c, n, m, np.bincount(owner, minlength=n), rel_i),
        ("t2i", top_i, m, n, np.ones(m, dtype=np.int64), rel_c),
    )
    labelled: dict[str, list[np.ndarray]] = {"i2t": [], "t2i": []}
    full: dict[str, list[np.ndarray]] = {"i2t": [], "t2i": []}
    for direction, top, n_query, n_gallery, n_own, rel_query in directions:
        n_true = None if rel_query is None else np.bincount(rel_query, minlength=n_query)
        for s in range(0, n_query, chunk_size):
            rows = np.arange(s, min(s + chunk_size, n_query))  # (B,)
            cand = np.asarray(top[s : s + chunk_size], dtype=np.int64)  # (B, K)
            if direction == "i2t":
                pair = _pair_key(rows[:, None], cand, m)  # (B, K)
                own = owner[cand] == rows[:, None]  # (B, K)
            else:
                pair = _pair_key(cand, rows[:, None], m)  # (B, K)
                own = cand == owner[rows, None]  # (B, K)
            vals = _lookup(keys, values, pair)  # (B, K)
            labelled[direction].append(topk_ranks(vals, own, n_own[rows], n_gallery))
            if n_true is not None:
                true = _isin_sorted(rel, pair)  # (B, K)
                full[direction].append(topk_ranks(vals, true, n_true[rows], n_gallery))
    result = retrieval_metrics_from_ranks(*(np.concatenate(labelled[d]) for d in ("i2t", "t2i")))
    if relation is None:
        return result, None
    return result, retrieval_metrics_from_ranks(*(np.concatenate(full[d]) for d in ("i2t", "t2i")))


def _pair_key(image_rows: np.ndarray, caption_rows: np.ndarray, n_captions: int) -> np.ndarray:
    """One int64 per (image row, caption row): sorting it sorts the pairs by image, then caption."""
    return image_rows * n_captions + caption_rows


def _pair_scores(
    image: np.ndarray, caption: np.ndarray, scored: pl.DataFrame, score: str, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted pair keys (P,), float32 ranking score of each (P,)) from the teacher's scores.

    ``itm+itc`` adds the pair's cosine, summed in float64 and rounded once to float32 (the ranks
    compare float32 scores), computed per pair in chunks so no (P, D) gather is held.
    """
    i = scored["image_id"].to_numpy().astype(np.int64)  # (P,)
    c = scored["caption_id"].to_numpy().astype(np.int64)  # (P,)
    total = scored["score"].to_numpy().astype(np.float64)  # (P,)
    if score == "itm+itc":
        for s in range(0, len(i), chunk):
            a, b = image[i[s : s + chunk]], caption[c[s : s + chunk]]  # (B, D), (B, D)
            total[s : s + chunk] += np.einsum("bd,bd->b", a, b)
    keys = _pair_key(i, c, len(caption))
    order = np.argsort(keys, kind="stable")
    return keys[order], total[order].astype(np.float32)


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``values`` at each of ``query``'s keys (any shape); every key must be among ``keys``."""
    at = np.searchsorted(keys, query).clip(max=max(len(keys) - 1, 0))
    if query.size and (len(keys) == 0 or not (keys[at] == query).all()):
        raise ValueError("the teacher returned no score for some re-ranked pairs; re-run evaluate")
    return values[at]


def _isin_sorted(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Bool of ``query``'s shape: whether each key is in the sorted ``keys``."""
    if len(keys) == 0:
        return np.zeros(query.shape, dtype=bool)
    at = np.searchsorted(keys, query).clip(max=len(keys) - 1)
    return keys[at] == query
