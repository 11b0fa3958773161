"""Recall on the full caption-image relation: chunked code against a naive double loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.metrics import (
    METRIC_KEYS,
    full_relation_metrics,
    relation_ranks,
    retrieval_metrics,
    retrieval_metrics_from_ranks,
)
from pipeline.stages.evaluate import full_ranks_from_embeddings


def naive_full(sim: np.ndarray, match: np.ndarray) -> dict[str, float]:
    """Double loop: a query's rank is the number of non-matches scoring >= its best match."""
    n_images, n_captions = sim.shape
    i2t, t2i = [], []
    for i in range(n_images):
        best = max(sim[i, c] for c in range(n_captions) if match[i, c])
        i2t.append(sum(1 for c in range(n_captions) if not match[i, c] and sim[i, c] >= best))
    for c in range(n_captions):
        best = max(sim[i, c] for i in range(n_images) if match[i, c])
        t2i.append(sum(1 for i in range(n_images) if not match[i, c] and sim[i, c] >= best))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def relation_case(seed: int, n_images: int, per_image: int, extra: float, ties: bool):
    """(sim, caption_to_image, match): the labels plus random extra true pairs."""
    rng = np.random.default_rng(seed)
    c2i = np.repeat(np.arange(n_images), per_image)
    rng.shuffle(c2i)
    n_captions = len(c2i)
    match = rng.random((n_images, n_captions)) < extra
    match[c2i, np.arange(n_captions)] = True  # every labelled pair is a true match
    sim = rng.normal(size=(n_images, n_captions)).astype(np.float32)
    sim[match] += 1.0
    if ties:
        sim = np.round(sim * 2) / 2
    return sim, c2i, match


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_full_relation_matches_naive_reference(ties, chunk_size):
    """Chunked full-relation metrics equal the double loop, ties included, any chunk size."""
    for seed in range(3):
        sim, _, match = relation_case(seed, 17, 2 + seed, extra=0.15, ties=ties)
        rows, cols = np.nonzero(match)
        perm = np.random.default_rng(seed).permutation(len(rows))  # any pair order will do
        got = full_relation_metrics(sim, rows[perm], cols[perm], chunk_size=chunk_size)
        want = naive_full(sim, match)
        assert list(got) == list(METRIC_KEYS)
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(want[key]), key


def test_relation_of_labels_only_is_the_standard_protocol():
    """With no pair beyond the labels, the full-relation metrics are the usual ones."""
    sim, c2i, _ = relation_case(5, 13, 3, extra=0.0, ties=True)
    got = full_relation_metrics(sim, c2i, np.arange(len(c2i)), chunk_size=5)
    assert got == retrieval_metrics(sim, c2i)


def test_another_true_match_first_counts_only_on_the_full_relation():
    """A caption that fits two images, ranked to the unlabelled one first: a miss on the labels,
    a hit on the relation."""
    # Caption 0 belongs to image 0 but is also true of image 1; caption 1 belongs to image 1.
    sim = np.array([[0.2, 0.1], [0.9, 0.8]], dtype=np.float32)  # (I, T)
    c2i = [0, 1]
    labelled = retrieval_metrics(sim, c2i)
    full = full_relation_metrics(sim, [0, 1, 1], [0, 0, 1])
    assert labelled["t2i_R@1"] == 50.0  # caption 0 retrieves image 1 first: wrong by labels
    assert full["t2i_R@1"] == 100.0
    # Image 1's best match (caption 0, 0.9) is above everything: both protocols agree on i2t
    # for image 1; image 0 has nothing it does not match among captions it fits or not.
    assert full["i2t_R@1"] == 100.0


def test_streaming_full_relation_equals_matrix():
    """Ranks from embeddings chunk by chunk equal the full-matrix relation metrics."""
    rng = np.random.default_rng(4)
    img = rng.normal(size=(10, 8)).astype(np.float32)
    c2i = np.repeat(np.arange(10), 3)
    cap = img[c2i] + 0.9 * rng.normal(size=(30, 8)).astype(np.float32)
    match = rng.random((10, 30)) < 0.1
    match[c2i, np.arange(30)] = True
    rows, cols = np.nonzero(match)
    ranks = full_ranks_from_embeddings(img, cap, rows, cols, chunk_size=3)
    assert retrieval_metrics_from_ranks(*ranks) == full_relation_metrics(img @ cap.T, rows, cols)


def test_relation_ranks_errors():
    """A query without any true match, or a mask of the wrong shape, is refused by name."""
    with pytest.raises(ValueError, match=r"query rows \[1\] of the chunk have no true match"):
        relation_ranks(np.zeros((2, 3)), torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="must have the shape of sim_chunk"):
        relation_ranks(np.zeros((2, 3)), np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="relation rows must lie within"):
        full_relation_metrics(np.zeros((2, 2)), [0, 2], [0, 1])
