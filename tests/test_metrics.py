"""Retrieval recall: chunked metrics against a naive full-matrix reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.metrics import (
    METRIC_KEYS,
    i2t_ranks,
    retrieval_metrics,
    retrieval_metrics_from_ranks,
    t2i_ranks,
)


def naive_metrics(sim: np.ndarray, caption_to_image: np.ndarray) -> dict[str, float]:
    """Double loop; a tie with a negative counts against the query, as documented."""
    n_images, n_captions = sim.shape
    i2t, t2i = [], []
    for i in range(n_images):
        positives = [c for c in range(n_captions) if caption_to_image[c] == i]
        best = max(sim[i, c] for c in positives)
        i2t.append(sum(1 for c in range(n_captions) if c not in positives and sim[i, c] >= best))
    for c in range(n_captions):
        own = caption_to_image[c]
        t2i.append(sum(1 for i in range(n_images) if i != own and sim[i, c] >= sim[own, c]))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


def random_case(seed: int, n_images: int, per_image: int, ties: bool):
    rng = np.random.default_rng(seed)
    caption_to_image = np.repeat(np.arange(n_images), per_image)
    rng.shuffle(caption_to_image)
    sim = rng.normal(size=(n_images, n_images * per_image)).astype(np.float32)
    # Make the problem partly solvable so recalls are neither 0 nor 100.
    sim[caption_to_image, np.arange(sim.shape[1])] += 1.5
    if ties:
        sim = np.round(sim * 2) / 2  # coarse grid: many exact ties, also with positives
    return sim, caption_to_image


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_matches_naive_reference(ties, chunk_size):
    """Chunked metrics equal the double-loop reference, ties included, for any chunk size."""
    for seed in range(3):
        sim, c2i = random_case(seed, n_images=23, per_image=3 + seed % 3, ties=ties)
        got = retrieval_metrics(sim, c2i, chunk_size=chunk_size)
        want = naive_metrics(sim, c2i)
        assert list(got) == list(METRIC_KEYS)
        for key in METRIC_KEYS:
            assert got[key] == pytest.approx(want[key]), key


def test_accepts_torch_and_lists():
    """A torch tensor and a Python list give the same result as numpy inputs."""
    sim, c2i = random_case(7, n_images=11, per_image=2, ties=False)
    want = retrieval_metrics(sim, c2i)
    assert retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(c2i), chunk_size=4) == want
    assert retrieval_metrics(sim, c2i.tolist()) == want


def test_perfect_scores():
    """Positives scoring above every negative give 100 everywhere and rsum 600."""
    c2i = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    sim = np.zeros((4, 8), dtype=np.float32)
    sim[c2i, np.arange(8)] = 1.0
    got = retrieval_metrics(sim, c2i, chunk_size=3)
    assert all(v == 100.0 for k, v in got.items() if k != "rsum")
    assert got["rsum"] == 600.0


def test_collapsed_model_is_not_perfect():
    """Constant scores (a collapsed encoder) are ties, which count against the query."""
    got = retrieval_metrics(np.ones((20, 40)), np.repeat(np.arange(20), 2))
    assert got["i2t_R@1"] == 0.0 and got["t2i_R@1"] == 0.0 and got["t2i_R@10"] == 0.0


def test_hand_made_two_images():
    """Two images, three captions: recalls worked out by hand."""
    # captions 0, 1 belong to image 0; caption 2 to image 1.
    sim = np.array(
        [
            [0.1, 0.9, 0.5],  # image 0: best positive (0.9) ranked first -> i2t rank 0
            [0.8, 0.2, 0.3],  # image 1: its caption (0.3) behind caption 0 (0.8) -> rank 1
        ]
    )
    c2i = [0, 0, 1]
    # t2i: caption 0 -> image 0 scores 0.1 < 0.8 -> rank 1; caption 1 -> 0.9 > 0.2 -> rank 0;
    # caption 2 -> image 1 scores 0.3 < 0.5 -> rank 1.
    np.testing.assert_array_equal(i2t_ranks(sim, [0, 1], c2i), [0, 1])
    np.testing.assert_array_equal(t2i_ranks(sim.T, c2i), [1, 0, 1])
    got = retrieval_metrics(sim, c2i)
    assert got["i2t_R@1"] == pytest.approx(50.0)
    assert got["i2t_R@5"] == pytest.approx(100.0)
    assert got["t2i_R@1"] == pytest.approx(100.0 / 3)
    assert got["t2i_R@5"] == pytest.approx(100.0)
    assert got["rsum"] == pytest.approx(50 + 100 + 100 + 100 / 3 + 100 + 100)


def test_streaming_equals_full_matrix():
    """Ranks computed chunk by chunk from embeddings give the full-matrix metrics."""
    rng = np.random.default_rng(3)
    img = torch.from_numpy(rng.normal(size=(9, 8)).astype(np.float32))
    c2i = torch.from_numpy(np.repeat(np.arange(9), 3))
    txt = img[c2i] + 0.8 * torch.randn(27, 8, generator=torch.Generator().manual_seed(0))
    i2t = np.concatenate(
        [
            i2t_ranks(img[s : s + 4] @ txt.T, torch.arange(s, min(s + 4, 9)), c2i)
            for s in range(0, 9, 4)
        ]
    )
    t2i = np.concatenate(
        [t2i_ranks(txt[s : s + 5] @ img.T, c2i[s : s + 5]) for s in range(0, 27, 5)]
    )
    assert retrieval_metrics_from_ranks(i2t, t2i) == retrieval_metrics(img @ txt.T, c2i)


def test_shape_errors():
    """Bad shapes and values raise ValueError naming the problem."""
    sim = np.zeros((3, 8))
    with pytest.raises(ValueError, match="caption_to_image has 7 entries but sim has 8 captions"):
        retrieval_metrics(sim, [0] * 7)
    with pytest.raises(ValueError, match="sim must be 2-D"):
        retrieval_metrics(np.zeros(8), [0] * 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        retrieval_metrics(sim, [0, 1, 2, 3, 0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"image\(s\) \[2\] have no caption"):
        retrieval_metrics(sim, [0, 1, 0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((2, 2), np.nan), [0, 1])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        retrieval_metrics(np.eye(2), [0, 1], chunk_size=0)
    with pytest.raises(ValueError, match="caption_image has 2 entries but sim_chunk has 3 rows"):
        t2i_ranks(np.zeros((3, 4)), [0, 1])
