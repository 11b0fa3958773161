"""Re-ranking evaluation over each query's own top-K against the dense (N, M) computation."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.core.candidates import candidate_pairs
from pipeline.core.metrics import (
    i2t_ranks,
    relation_mask,
    relation_ranks,
    retrieval_metrics_from_ranks,
    sort_pairs,
    t2i_ranks,
    topk_ranks,
)
from pipeline.stages.rerank import reranked_metrics


def dense_reference(image, caption, owner, top_c, top_i, scored, relation, score):
    """The former rerank_both: a dict of pair scores, then (N, M) and (M, N) rows of -inf."""
    scores = {(i, c): s for i, c, s in scored.select("image_id", "caption_id", "score").iter_rows()}
    if score == "itm+itc":
        scores = {(i, c): s + float(image[i] @ caption[c]) for (i, c), s in scores.items()}
    i2t_sim = np.full((len(image), len(caption)), -np.inf, dtype=np.float32)
    i2t_vals = [[scores[(r, c)] for c in top_c[r]] for r in range(len(image))]
    np.put_along_axis(i2t_sim, top_c, np.array(i2t_vals, dtype=np.float32), 1)
    t2i_sim = np.full((len(caption), len(image)), -np.inf, dtype=np.float32)
    t2i_vals = [[scores[(i, r)] for i in top_i[r]] for r in range(len(caption))]
    np.put_along_axis(t2i_sim, top_i, np.array(t2i_vals, dtype=np.float32), 1)
    owner_t = torch.as_tensor(owner)
    labelled = retrieval_metrics_from_ranks(
        i2t_ranks(i2t_sim, torch.arange(len(image)), owner_t), t2i_ranks(t2i_sim, owner_t)
    )
    if relation is None:
        return labelled, None
    i_mask = relation_mask(*sort_pairs(*relation, by="image"), 0, len(image), len(caption))
    c_mask = relation_mask(*sort_pairs(*relation, by="caption"), 0, len(caption), len(image))
    full = retrieval_metrics_from_ranks(
        relation_ranks(i2t_sim, i_mask), relation_ranks(t2i_sim, c_mask)
    )
    return labelled, full


def case(seed: int, n: int = 23, per_image: int = 3, k: int = 6, ties: bool = True):
    """Embeddings on a coarse grid (dot products exact in float32), random top-K, a relation that
    extends the labels, teacher scores with many ties when ``ties``."""
    rng = np.random.default_rng(seed)
    m = n * per_image
    owner = np.repeat(np.arange(n), per_image)
    rng.shuffle(owner)
    image = rng.integers(-4, 5, (n, 8)).astype(np.float32) / 8  # (N, D)
    caption = rng.integers(-4, 5, (m, 8)).astype(np.float32) / 8  # (M, D)
    caption[1::7] = caption[::7][: len(caption[1::7])]  # duplicate captions: ties in the cosine
    image[::4] = 0  # cosine 0 with everything: itm+itc ties wherever the teacher's scores do
    top_c = np.stack([rng.permutation(m)[:k] for _ in range(n)])  # (N, K)
    top_i = np.stack([rng.permutation(n)[:k] for _ in range(m)])  # (M, K)
    # some queries retrieve their labelled match, at a random place of their top-K
    for r in rng.choice(n, n // 2, replace=False):
        if not (owner[top_c[r]] == r).any():
            top_c[r, rng.integers(k)] = rng.choice(np.flatnonzero(owner == r))
    for r in rng.choice(m, m // 2, replace=False):
        if owner[r] not in top_i[r]:
            top_i[r, rng.integers(k)] = owner[r]
    top = pl.concat(
        [
            pl.DataFrame({"query_id": np.repeat(np.arange(n), k), "candidate_id": top_c.ravel()})
            .with_columns(direction=pl.lit("i2t")),
            pl.DataFrame({"query_id": np.repeat(np.arange(m), k), "candidate_id": top_i.ravel()})
            .with_columns(direction=pl.lit("t2i")),
        ]
    )  # fmt: skip
    pairs = candidate_pairs(top)
    raw = rng.integers(0, 4, pairs.height) if ties else rng.normal(size=pairs.height)
    scored = pairs.with_columns(score=pl.Series(raw.astype(np.float32)))
    extra = rng.integers(0, [n, m], (2 * n, 2))  # other true matches beyond the labels
    relation = (
        np.concatenate([owner, extra[:, 0]]),
        np.concatenate([np.arange(m), extra[:, 1]]),
    )
    return image, caption, owner, top_c, top_i, scored, relation


@pytest.mark.parametrize("score", ["itm", "itm+itc"])
@pytest.mark.parametrize("seed,ties", [(0, True), (1, True), (2, False), (3, True)])
def test_topk_rerank_equals_dense(seed, ties, score):
    """Labels and full relation, both score modes, ties, misses: equal to the dense (N, M) way."""
    image, caption, owner, top_c, top_i, scored, relation = case(seed, ties=ties)
    for rel in (None, relation):
        want = dense_reference(image, caption, owner, top_c, top_i, scored, rel, score)
        for chunk_size in (5, 4096):
            got = reranked_metrics(
                image, caption, owner, top_c, top_i, scored, rel, score, chunk_size
            )
            assert got == want


def test_topk_ranks_equals_relation_ranks_bit_for_bit():
    """Every rank, misses included (G - positives), equals relation_ranks on the dense row."""
    rng = np.random.default_rng(4)
    b, g, k = 200, 30, 5
    cand = np.stack([rng.permutation(g)[:k] for _ in range(b)])  # (B, K)
    scores = rng.integers(0, 3, (b, k)).astype(np.float32)  # (B, K), many ties
    scores[rng.random((b, k)) < 0.05] = -np.inf  # a candidate the teacher scored -inf
    positive_dense = rng.random((b, g)) < 0.1  # (B, G)
    positive_dense[np.arange(b), rng.integers(0, g, b)] = True  # every query has a match
    dense = np.full((b, g), -np.inf, dtype=np.float32)
    np.put_along_axis(dense, cand, scores, 1)
    want = relation_ranks(dense, positive_dense)
    positive = np.take_along_axis(positive_dense, cand, 1)
    got = topk_ranks(scores, positive, positive_dense.sum(1), g)
    assert (~positive.any(1)).sum() > 10 and (got == g - positive_dense.sum(1)).any()
    np.testing.assert_array_equal(got, want)


def test_topk_ranks_errors():
    """NaN scores and a query without any true match are refused, as by relation_ranks."""
    with pytest.raises(ValueError, match="NaN"):
        topk_ranks(np.array([[np.nan, 1.0]]), np.array([[True, False]]), np.array([1]), 5)
    with pytest.raises(ValueError, match="no true match"):
        topk_ranks(np.array([[0.0, 1.0]]), np.array([[False, False]]), np.array([0]), 5)
    with pytest.raises(ValueError, match="must be equal"):
        topk_ranks(np.zeros((2, 3)), np.zeros((2, 2), dtype=bool), np.ones(2), 5)
