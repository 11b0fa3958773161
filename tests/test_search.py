"""Top-k search: faiss indexes against an exact torch reference."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from pipeline.core.search import approximate_recall, topk_search


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """Random unit vectors: continuous scores, so no ties among the top k."""
    rng = np.random.default_rng(0)
    return unit_rows(rng, 50, 16), unit_rows(rng, 300, 16)


def reference(queries: np.ndarray, gallery: np.ndarray, k: int):
    s, i = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(gallery).T, k, dim=1)
    return s.numpy(), i.numpy()


def test_faiss_flat_equals_torch_reference(data):
    """faiss IndexFlatIP and the torch backend both match a plain torch.topk, best first."""
    queries, gallery = data
    want_s, want_i = reference(queries, gallery, 10)
    for backend in ("faiss", "torch"):
        scores, ids = topk_search(queries, gallery, 10, backend=backend)
        assert scores.dtype == np.float32 and ids.dtype == np.int64
        assert scores.shape == ids.shape == (50, 10)
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
        assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_chunking_does_not_change_results(data, backend):
    """chunk_size 1, 7 and the default give the same ids; scores agree to float rounding."""
    queries, gallery = data
    full = topk_search(queries, gallery, 5, backend=backend)
    for chunk_size in (1, 7):
        got = topk_search(queries, gallery, 5, backend=backend, chunk_size=chunk_size)
        np.testing.assert_array_equal(got[1], full[1])
        # BLAS may round a (1, D) @ (D, G) product differently from a (50, D) one.
        np.testing.assert_allclose(got[0], full[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(index):
    """IVF and HNSW find >= 90% of the exact top-10 on an easy clustered set."""
    rng = np.random.default_rng(1)
    centres = unit_rows(rng, 20, 32)
    gallery = centres[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32))
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32)
    queries = gallery[rng.choice(2000, 100, replace=False)] + 0.05 * rng.normal(size=(100, 32))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)

    _, ids = topk_search(queries, gallery, 10, index=index, nprobe=8, chunk_size=33)
    recall = approximate_recall(queries, gallery, 10, ids, sample=40, seed=5)
    assert recall >= 0.9

    # Manual recall on the same sampled rows.
    rows = np.sort(np.random.default_rng(5).choice(100, 40, replace=False))
    _, exact = reference(queries[rows], gallery, 10)
    manual = np.mean([len(set(exact[j]) & set(ids[r])) / 10 for j, r in enumerate(rows)])
    assert recall == pytest.approx(manual)


def test_approximate_recall_of_wrong_ids_is_low(data):
    """Ids that miss the exact neighbours score a recall of 0."""
    queries, gallery = data
    _, exact = reference(queries, gallery, 3)
    worst = np.argsort(queries @ gallery.T, axis=1)[:, :3]  # the three lowest scores
    assert approximate_recall(queries, gallery, 3, worst) == 0.0
    assert approximate_recall(queries, gallery, 3, exact) == 1.0
    with pytest.raises(ValueError, match=r"ids_approx has shape \(50, 2\) but expected \(50, 3\)"):
        approximate_recall(queries, gallery, 3, exact[:, :2])


def test_k_larger_than_gallery_is_clamped(data):
    """k > G returns all G items per query, with a warning."""
    queries, gallery = data
    with pytest.warns(UserWarning, match="k=500 is larger than the gallery"):
        scores, ids = topk_search(queries, gallery, 500)
    assert ids.shape == (50, 300)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(300), (50, 1)))


def test_bad_arguments(data):
    """k <= 0, mismatched dims and unknown options raise ValueError naming the fix."""
    queries, gallery = data
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        topk_search(queries, gallery, 0)
    with pytest.raises(ValueError, match="queries have dim 16 but gallery has dim 8"):
        topk_search(queries, gallery[:, :8], 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_search(queries, gallery, 3, backend="annoy")
    with pytest.raises(ValueError, match="needs backend 'faiss'"):
        topk_search(queries, gallery, 3, backend="torch", index="hnsw")


def test_without_faiss_auto_falls_back_to_torch_and_says_so(data, monkeypatch, caplog):
    """With faiss unimportable, auto uses torch and logs it; ivf/hnsw raise ImportError."""
    queries, gallery = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
    with caplog.at_level("INFO", logger="pipeline.core.search"):
        _, ids = topk_search(queries, gallery, 4)
    assert "faiss is not importable" in caplog.text
    np.testing.assert_array_equal(ids, reference(queries, gallery, 4)[1])
    with pytest.raises(ImportError, match="install faiss-cpu"):
        topk_search(queries, gallery, 4, index="hnsw")
