"""Approximate search tuned to a recall target (pipeline.core.ann) against exact torch top-k."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from pipeline.core import ann
from pipeline.core.ann import AnnSettings, search_ann
from pipeline.core.search import faiss_device


def clustered(n: int, q: int, dim: int = 32, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A mixture of 40 Gaussians on the sphere: (queries (q, dim), gallery (n, dim)), fresh draws
    from the same mixture, as captions and images of one dataset are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))

    def draw(m: int) -> np.ndarray:
        x = centres[rng.integers(0, 40, m)] + 0.6 * rng.normal(size=(m, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(q), draw(n)


def exact_ids(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    return torch.topk(torch.from_numpy(queries @ gallery.T), k, dim=1).indices.numpy()


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 300)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_tuning_reaches_the_target_with_the_first_knob_that_does(data, index):
    """The knob doubles from its start; the first value whose sampled recall >= R is kept, the
    one before fell short, and the reported recall is recall@k of the returned ids."""
    queries, gallery = data
    target = 0.97
    scores, ids, report = search_ann(
        queries, gallery, 10, index, AnnSettings(target_recall=target, sample=200), seed=3
    )
    knob = ann.KNOBS[index]
    tried = report["tried"]
    values = [t[knob] for t in tried]
    start = 1 if index == "ivf" else 10
    assert values == [start * 2**i for i in range(len(values))]
    assert report["reached"] and tried[-1]["recall"] >= target
    assert all(t["recall"] < target for t in tried[:-1])
    assert report["settings"][knob] == values[-1]
    if index == "ivf":
        assert report["settings"]["nlist"] == 63  # round(sqrt(4000))
        assert len(tried) > 1  # one list is not enough on this mixture
    else:
        assert report["settings"]["hnsw_m"] == 32

    # The recall reported is the one of the returned ids, on the seeded sample.
    rows = np.sort(np.random.default_rng(3).choice(300, 200, replace=False))
    want = exact_ids(queries[rows], gallery, 10)
    manual = np.mean([len(set(w) & set(ids[r])) / 10 for w, r in zip(want, rows, strict=True)])
    assert report["recall"] == pytest.approx(manual) == pytest.approx(tried[-1]["recall"])
    assert report["sample"] == 200
    np.testing.assert_allclose(  # each returned score is the true inner product
        scores, np.take_along_axis(queries @ gallery.T, ids, axis=1), atol=1e-5
    )


def test_explicit_settings_are_used_and_recorded(data):
    """Without a target, --nlist/--nprobe build and search the index as given."""
    queries, gallery = data
    _, _, report = search_ann(queries, gallery, 5, "ivf", AnnSettings(nlist=20, nprobe=3))
    assert report["settings"] == {"nlist": 20, "nprobe": 3}
    assert "tried" not in report and 0 < report["recall"] <= 1
    _, _, report = search_ann(queries, gallery, 5, "hnsw", AnnSettings(hnsw_m=8, ef_search=40))
    assert report["settings"] == {"hnsw_m": 8, "ef_construction": 80, "ef_search": 40}


def test_flat_is_exact_with_recall_one(data):
    """Flat search returns the exact top-k and reports recall 1.0, target or not."""
    queries, gallery = data
    _, ids, report = search_ann(queries, gallery, 7, "flat", AnnSettings(target_recall=0.99))
    np.testing.assert_array_equal(ids, exact_ids(queries, gallery, 7))
    assert report["recall"] == 1.0 and report["reached"] and report["settings"] == {}


def test_unreached_target_warns_and_keeps_the_largest_knob(monkeypatch):
    """When the knob's maximum still misses the target, the warning says so and how to fix it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2100, 32)).astype(np.float32)  # random: no structure for HNSW
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    monkeypatch.setattr(ann, "HNSW_MAX_EF", 16)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a deterministic graph
    try:
        with pytest.warns(UserWarning, match=r"--target-recall 1.0 not reached: hnsw recall@10"):
            _, _, report = search_ann(
                x[:100], x[100:], 10, "hnsw", AnnSettings(hnsw_m=2, target_recall=1.0)
            )
    finally:
        faiss.omp_set_num_threads(threads)
    assert not report["reached"] and [t["ef_search"] for t in report["tried"]] == [10, 16]
    assert report["settings"]["ef_search"] == 16 and report["recall"] < 1.0


@pytest.mark.parametrize(
    "index,settings,message",
    [
        ("ivf", AnnSettings(target_recall=0.0), "--target-recall must be in (0, 1], got 0.0"),
        ("ivf", AnnSettings(target_recall=1.5), "--target-recall must be in (0, 1], got 1.5"),
        ("ivf", AnnSettings(nprobe=0), "--nprobe must be >= 1, got 0"),
        ("hnsw", AnnSettings(nprobe=4), "--nprobe applies to --index ivf, not hnsw"),
        ("flat", AnnSettings(ef_search=64), "--ef-search applies to --index hnsw, not flat"),
        ("annoy", AnnSettings(), "--index must be one of flat, ivf, hnsw, got 'annoy'"),
    ],
)
def test_bad_settings_name_the_flag(data, index, settings, message):
    """Out-of-range values and settings for another index raise ValueError naming the flag."""
    queries, gallery = data
    with pytest.raises(ValueError) as e:
        search_ann(queries, gallery, 5, index, settings)
    assert message in str(e.value)


def test_faiss_device_decision():
    """Flat and IVF go to the GPU only when torch sees CUDA and faiss sees a GPU; HNSW never."""
    assert faiss_device("ivf", cuda=True, faiss_gpus=1) == "cuda"
    assert faiss_device("flat", cuda=True, faiss_gpus=2) == "cuda"
    assert faiss_device("hnsw", cuda=True, faiss_gpus=1) == "cpu"
    assert faiss_device("ivf", cuda=True, faiss_gpus=0) == "cpu"  # faiss-cpu on a GPU machine
    assert faiss_device("ivf", cuda=False, faiss_gpus=1) == "cpu"
