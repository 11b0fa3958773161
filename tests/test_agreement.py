"""Ranking agreement (cprd evaluate --teacher-scores) against scipy's Kendall tau and a naive
NDCG@10, and its grouping of cached pairs into per-query candidate lists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import kendalltau

from pipeline.core.agreement import ranking_agreement


def naive_ndcg(student: list[float], gain: list[float], at: int = 10) -> float:
    order = sorted(range(len(student)), key=lambda k: (-student[k], k))
    dcg = sum(gain[k] / math.log2(r + 2) for r, k in enumerate(order[:at]))
    ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(gain, reverse=True)[:at]))
    return dcg / ideal


@pytest.mark.parametrize("seed", [0, 1])
def test_agreement_matches_scipy_and_naive_ndcg(seed):
    """Per query tau-b equals scipy's, NDCG@10 the looped formula; both directions, with ties."""
    rng = np.random.default_rng(seed)
    n_img, n_cap, d = 9, 14, 4
    img = rng.normal(size=(n_img, d))
    cap = rng.normal(size=(n_cap, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    img_ids, cap_ids = np.arange(100, 100 + n_img), np.arange(50, 50 + n_cap)
    pairs = {(int(i), int(c)) for i in img_ids for c in rng.choice(cap_ids, 12, replace=False)}
    pairs |= {(int(i), int(c)) for c in cap_ids for i in rng.choice(img_ids, 5, replace=False)}
    pairs |= {(7, 3)}  # an id with no embedding: ignored
    i_arr, c_arr = (np.array(x) for x in zip(*sorted(pairs), strict=True))
    score = np.round(rng.normal(size=len(i_arr)) * 2) / 2  # ties
    frame = pl.DataFrame({"image_id": i_arr, "caption_id": c_arr, "score": score})
    got = ranking_agreement(frame, img, img_ids, cap, cap_ids)
    assert got["pairs"] == len(pairs) - 1
    for name, key in (("i2t", 0), ("t2i", 1)):
        taus, gains = [], []
        queries = img_ids if key == 0 else cap_ids
        for q in queries:
            rows = [
                (i, c, s)
                for i, c, s in zip(i_arr, c_arr, score, strict=True)
                if (i, c)[key] == q and (i, c) != (7, 3)
            ]
            st = [float(img[i - 100] @ cap[c - 50]) for i, c, _ in rows]
            te = [s for *_, s in rows]
            if len(rows) >= 2:
                tau = kendalltau(st, te).statistic
                if not math.isnan(tau):
                    taus.append(tau)
                gains.append(naive_ndcg(st, [1 / (1 + math.exp(-t)) for t in te]))
        assert got[name]["kendall_tau"] == pytest.approx(np.mean(taus))
        assert got[name]["ndcg@10"] == pytest.approx(np.mean(gains))
        assert got[name]["queries"] == len(gains)


def test_agreement_is_one_when_the_student_orders_as_the_teacher():
    """A student whose cosines are a monotone function of the teacher's scores agrees fully."""
    rng = np.random.default_rng(3)
    img = np.eye(6)[:, :6]
    cap = rng.normal(size=(5, 6))
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    i, c = np.meshgrid(np.arange(6), np.arange(5), indexing="ij")
    cos = np.einsum("ed,ed->e", img[i.ravel()], cap[c.ravel()])
    frame = pl.DataFrame({"image_id": i.ravel(), "caption_id": c.ravel(), "score": 3 * cos + 1})
    got = ranking_agreement(frame, img, np.arange(6), cap, np.arange(5))
    for d in ("i2t", "t2i"):
        assert got[d]["kendall_tau"] == pytest.approx(1.0)
        assert got[d]["ndcg@10"] == pytest.approx(1.0)
    flipped = frame.with_columns(-pl.col("score"))
    assert ranking_agreement(flipped, img, np.arange(6), cap, np.arange(5))["i2t"][
        "kendall_tau"
    ] == pytest.approx(-1.0)


def test_evaluate_reports_agreement_on_a_scored_split(small_dataset, tiny_teacher_dir, tmp_path):
    """evaluate --teacher-scores: the agreement of the evaluated model over the split's scored
    candidates (equal to ranking_agreement on the miner's own embeddings); another split's cache
    is a one-line error."""
    from conftest import assert_error, mine_and_score, run

    from pipeline.core import cache
    from pipeline.core.candidates import load_embeddings

    entry = mine_and_score(tmp_path, small_dataset, tiny_teacher_dir, 3, 2, split="val")
    result = run(
        "evaluate",
        "--student",
        "tiny",
        "--data",
        small_dataset,
        "--split",
        "val",
        "--teacher-scores",
        entry,
        "--json",
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])["ranking_agreement"]
    emb = load_embeddings(tmp_path / "cand")  # the same tiny student (seed 0)
    want = ranking_agreement(
        cache.load_scores(Path(entry))[1], emb.image, emb.image_ids, emb.caption, emb.caption_ids
    )
    assert got["i2t"]["queries"] > 0 and got["t2i"]["queries"] > 0
    for d in ("i2t", "t2i"):
        assert got[d]["kendall_tau"] == pytest.approx(want[d]["kendall_tau"], abs=1e-5)
        assert got[d]["ndcg@10"] == pytest.approx(want[d]["ndcg@10"], abs=1e-5)
    train_entry = mine_and_score(tmp_path / "train", small_dataset, tiny_teacher_dir, 3, 2)
    result = run(
        "evaluate",
        "--student",
        "tiny",
        "--data",
        small_dataset,
        "--split",
        "val",
        "--teacher-scores",
        train_entry,
    )
    assert_error(result, "--teacher-scores", "holds no candidates of split 'val'")
