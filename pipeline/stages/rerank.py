"""Two-stage retrieval: the dual encoder's top-K per query, re-ranked by the teacher's ITM score.

This is the accuracy the student tries to reach at dual-encoder cost (LAVIS uses K = 128 for
Flickr30K, 256 for COCO). Letters in shape comments: N images, M captions, K re-ranked, B chunk.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from pipeline.core.candidates import candidate_pairs
from pipeline.core.metrics import (
    i2t_ranks,
    relation_mask,
    relation_ranks,
    retrieval_metrics_from_ranks,
    sort_pairs,
    t2i_ranks,
)
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
    scores = {(i, c): s for i, c, s in scored.select("image_id", "caption_id", "score").iter_rows()}
    if score == "itm+itc":
        scores = {(i, c): s + float(image[i] @ caption[c]) for (i, c), s in scores.items()}

    # Dense rows with -inf outside each query's own top-K: the metric's pessimistic ties then
    # rank every item the dual encoder did not retrieve behind all re-ranked ones.
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
    if relation is None:
        return labelled, None
    i_mask = relation_mask(*sort_pairs(*relation, by="image"), 0, len(image), len(caption))
    c_mask = relation_mask(*sort_pairs(*relation, by="caption"), 0, len(caption), len(image))
    full = retrieval_metrics_from_ranks(
        relation_ranks(i2t_sim, i_mask), relation_ranks(t2i_sim, c_mask)
    )
    return labelled, full
