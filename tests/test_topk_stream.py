"""student.topk_stream: the streamed per-query top-k against a plain sort of all rows."""

from __future__ import annotations

import numpy as np
import pytest

from student.topk_stream import TopKStream, key_score, score_key


def reference(query, cand, score, extra, num_queries, k):
    """Every row at once: per query, by (score desc, cand asc), the first k."""
    order = np.lexsort((cand, -score.astype(np.float64), query))
    out = {q: [] for q in range(num_queries)}
    for i in order:
        if len(out[query[i]]) < k:
            out[query[i]].append(i)
    return out


def check(stream, query, cand, score, extra, num_queries, k):
    offsets, got_cand, got_score, got_extra = stream.finish()
    want = reference(query, cand, score, extra, num_queries, k)
    assert offsets.shape == (num_queries + 1,) and offsets[0] == 0
    for q in range(num_queries):
        rows = want[q]
        sl = slice(offsets[q], offsets[q + 1])
        assert got_cand[sl].tolist() == cand[rows].tolist(), q
        np.testing.assert_array_equal(got_score[sl], score[rows])  # bit for bit
        np.testing.assert_array_equal(got_extra[sl], extra[rows])


def rows(rng, n, num_queries, num_cands, distinct_scores=None):
    """n unique (query, cand) rows in random order; few distinct scores force many ties."""
    flat = rng.choice(num_queries * num_cands, size=n, replace=False)
    query, cand = flat // num_cands, (flat % num_cands).astype(np.int64)
    if distinct_scores:
        score = rng.integers(-distinct_scores, distinct_scores, n).astype(np.float32) / 4
    else:
        score = rng.standard_normal(n).astype(np.float32)
    return query, cand, score, rng.random(n, dtype=np.float32)


@pytest.mark.parametrize("distinct", [None, 3])
@pytest.mark.parametrize("budget", [7, 64, 10_000])
@pytest.mark.parametrize("chunk", [1, 13, 5000])
@pytest.mark.parametrize("block", [1, 23, 1 << 20])
def test_stream_equals_one_sort(distinct, budget, chunk, block):
    """Any chunking, merge budget and merge block, with and without heavy score ties."""
    rng = np.random.default_rng(budget * 31 + chunk + block + (distinct or 0))
    num_queries, k = 40, 5
    query, cand, score, extra = rows(rng, 1500, num_queries, 60, distinct)
    stream = TopKStream(num_queries, k, budget=budget, block=block)
    for s in range(0, len(query), chunk):
        sl = slice(s, s + chunk)
        stream.add(query[sl], cand[sl], score[sl], extra[sl])
    assert stream.rows_seen == len(query)
    if budget < 1000 and chunk == 13:  # the floors dropped rows before any sort
        assert stream.rows_merged < len(query)
    check(stream, query, cand, score, extra, num_queries, k)


def test_floor_keeps_a_tie_with_a_smaller_candidate():
    """A late row tied with a query's k-th score but a smaller id must replace it."""
    stream = TopKStream(1, 2, budget=1)
    stream.add(np.array([0, 0, 0]), np.array([5, 6, 7]), np.float32([3, 1, 1]), np.zeros(3, "f4"))
    stream.add(np.array([0]), np.array([2]), np.float32([1]), np.ones(1, "f4"))
    offsets, cand, score, extra = stream.finish()
    assert cand.tolist() == [5, 2] and score.tolist() == [3, 1] and extra.tolist() == [0, 1]


def test_score_key_orders_scores_descending():
    s = np.float32([np.inf, 3.5, 1e-30, 0.0, -0.0, -1e-30, -2.0, -np.inf])
    key = score_key(s)
    assert (np.diff(key.astype(np.int64)) >= 0).all()
    assert key[3] == key[4]  # -0.0 is 0.0
    np.testing.assert_array_equal(key_score(key), s + np.float32(0))


def test_queries_without_rows_and_bad_k():
    stream = TopKStream(4, 3)
    stream.add(np.array([2]), np.array([9]), np.float32([0.5]), np.float32([0.1]))
    offsets, cand, _, _ = stream.finish()
    assert offsets.tolist() == [0, 0, 0, 1, 1] and cand.tolist() == [9]
    with pytest.raises(ValueError, match="k must be >= 1"):
        TopKStream(4, 0)
    with pytest.raises(ValueError, match=r"candidate ids must lie in \[0, 2\*\*31\)"):
        TopKStream(4, 3).add(np.array([1]), np.array([2**31]), np.float32([0]), np.float32([0]))
    offsets, cand, _, _ = TopKStream(0, 3).finish()  # no queries at all
    assert offsets.tolist() == [0] and len(cand) == 0
