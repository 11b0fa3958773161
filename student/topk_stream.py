"""Each query's k best candidates over a stream of (query, candidate, score) rows, bounded memory.

The teacher lookup (``student.teacher_lookup``) reads tens of millions of cached pairs; holding
them all, or sorting them all at once, costs gigabytes and superlinear time. ``TopKStream`` keeps,
per query, only the k best rows seen so far (order: score descending, ties by candidate id
ascending), plus a *floor*: the k-th best score of every query that already holds k rows. A new
row below its query's floor can never enter that query's top k, so it is dropped on arrival
(one gather and one compare per row). Survivors wait in a pending buffer; when the buffer
reaches ``budget`` rows it is sorted, merged into the (already sorted) kept rows by one linear
pass, cut to k per query, and the floors are raised. Only the buffer is ever sorted, so the build
costs time linear in the rows streamed (times the log of the bounded buffer size) and memory
bounded by the kept rows (at most queries x k), the buffer and one merge's workspace.

A row is one uint64 *key* plus the candidate id (int32) and an extra float32 payload (the
teacher's match probability): key = query << 32 | the score's bits mapped so that ascending keys
are descending scores. The score is recovered from the key bit for bit; sorting the keys sorts by
(query, score descending) in one pass, and the rare ties of equal keys are put in candidate id
order after it. Letters in shape comments: R rows, Q queries, E kept entries.
"""

from __future__ import annotations

import numpy as np

_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_NO_FLOOR = np.uint32(0xFFFFFFFF)  # the largest key: every row passes


def score_key(score: np.ndarray) -> np.ndarray:
    """(R,) uint32 whose ascending order is ``score`` (float32) descending; -0.0 counts as 0.0."""
    bits = (np.asarray(score, dtype=np.float32) + np.float32(0.0)).view(np.uint32)  # -0 -> +0
    negative = (bits.view(np.int32) >> 31).view(np.uint32)  # all ones where the sign is set
    return bits ^ (~negative & np.uint32(0x7FFFFFFF))


def key_score(low: np.ndarray) -> np.ndarray:
    """Inverse of ``score_key``: (R,) float32 scores from the keys' low 32 bits."""
    low = np.asarray(low, dtype=np.uint32)
    flip = np.where(low >= np.uint32(0x80000000), np.uint32(0), np.uint32(0x7FFFFFFF))
    return (low ^ flip).view(np.float32)


class TopKStream:
    """The k best candidates of each of ``num_queries`` queries over rows added in any order."""

    def __init__(self, num_queries: int, k: int, budget: int | None = None):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if num_queries >= 2**32:
            raise ValueError(f"at most 2**32 queries, got {num_queries}")
        self.num_queries, self.k = num_queries, k
        # a merge sorts kept + pending rows: half the most rows that can be kept is a bound that
        # keeps the number of merges (each re-sorting the kept rows) small
        self.budget = budget or max(1 << 20, num_queries * k // 2)
        self.floor = np.full(num_queries, _NO_FLOOR, dtype=np.uint32)  # (Q,) k-th best's low key
        self._key = np.empty(0, dtype=np.uint64)  # (E,) kept rows, sorted by (key, cand)
        self._cand = np.empty(0, dtype=np.int32)  # (E,)
        self._extra = np.empty(0, dtype=np.float32)  # (E,)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self.rows_seen = 0  # every row added
        self.rows_merged = 0  # rows that passed their floor and went through a merge sort

    def add(self, query: np.ndarray, cand: np.ndarray, score: np.ndarray, extra: np.ndarray):
        """Offer rows (R,) each: query id, candidate id (< 2**31), float32 score, float32 extra."""
        query = np.asarray(query)
        self.rows_seen += len(query)
        if not len(query):
            return
        low = score_key(score)  # (R,)
        keep = low <= self.floor[query]  # equal to the floor: a tie, settled by candidate id
        if not keep.all():
            query, cand, low, extra = query[keep], cand[keep], low[keep], extra[keep]
        key = (query.astype(np.uint64) << _SHIFT) | low.astype(np.uint64)
        self._pending.append(
            (key, np.asarray(cand, dtype=np.int32), np.asarray(extra, dtype=np.float32))
        )
        self._pending_rows += len(key)
        if self._pending_rows >= self.budget:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        key = np.concatenate([p[0] for p in pending])  # (P,)
        order = np.argsort(key)  # (P,) the new rows by key
        # (R,) = kept rows, then the new ones in key order: two sorted runs
        key = np.concatenate([self._key, key[order]])
        cand = np.concatenate([self._cand, np.concatenate([p[1] for p in pending])[order]])
        extra = np.concatenate([self._extra, np.concatenate([p[2] for p in pending])[order]])
        self.rows_merged += len(order)
        del pending, order
        self._key = self._cand = self._extra = None  # let the old kept rows go
        # a stable sort of two sorted runs is one linear merge (timsort finds the runs): the
        # kept rows are never re-sorted
        order = np.argsort(key, kind="stable")
        key = key[order]
        cand = cand[order]
        extra = extra[order]
        del order
        _tie_order(key, cand, extra)
        counts = np.bincount((key >> _SHIFT).view(np.int64), minlength=self.num_queries)  # (Q,)
        lens = np.minimum(counts, self.k)  # (Q,) rows kept per query
        first = np.cumsum(counts) - counts  # (Q,) where each query's rows start in the merge
        take = _ranges(first, lens)  # (E,) the merged positions kept
        self._key, self._cand, self._extra = key[take], cand[take], extra[take]
        full = np.flatnonzero(lens == self.k)
        last = np.cumsum(lens)[full] - 1  # (F,) each full query's k-th row
        self.floor[full] = (self._key[last] & _LOW).astype(np.uint32)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(offsets (Q+1,) int64, cand (E,) int64, score (E,) float32, extra (E,) float32) in CSR
        form: query q's rows are ``offsets[q]:offsets[q + 1]``, best first."""
        self._merge()
        counts = np.bincount((self._key >> _SHIFT).view(np.int64), minlength=self.num_queries)
        offsets = np.zeros(self.num_queries + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return (
            offsets,
            self._cand.astype(np.int64),
            key_score(self._key & _LOW),
            self._extra,
        )


def _tie_order(key: np.ndarray, cand: np.ndarray, extra: np.ndarray) -> None:
    """Put each run of equal keys (a score tie within a query) of rows sorted by key in
    candidate id order, in place."""
    same = key[1:] == key[:-1]  # (R-1,)
    if same.any():
        in_run = np.zeros(len(key), dtype=bool)
        in_run[1:] |= same
        in_run[:-1] |= same
        at = np.flatnonzero(in_run)  # (T,) the tied rows
        starts = np.ones(len(at), dtype=bool)  # (T,) a tied row whose key differs from the last
        starts[1:] = ~same[at[1:] - 1]
        by = np.lexsort((cand[at], np.cumsum(starts)))  # (T,) by (their run, candidate id)
        cand[at], extra[at] = cand[at][by], extra[at][by]


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """(sum(lens),) int64: ``starts[i] + 0 .. lens[i] - 1`` for every i, concatenated."""
    out_first = np.cumsum(lens) - lens
    return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(starts - out_first, lens)
