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
_LITTLE = np.little_endian  # a uint64's low 32 bits are then its first uint32


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

    def __init__(self, num_queries: int, k: int, budget: int | None = None, block: int = 1 << 18):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if num_queries >= 2**32:
            raise ValueError(f"at most 2**32 queries, got {num_queries}")
        self.num_queries, self.k = num_queries, k
        # Each merge passes over all kept rows once (linear) and sorts the pending ones: an
        # eighth of the most rows that can be kept keeps the merges few (about 10 at COCO
        # scale) and the buffer's sort small next to the kept rows (peak about 2x them).
        self.budget = budget or max(1 << 18, num_queries * k // 8)
        self.block = block  # rows merged at a time: bounds the merge's workspace
        self.floor = np.full(num_queries, _NO_FLOOR, dtype=np.uint32)  # (Q,) k-th best's low key
        self.lens = np.zeros(num_queries, dtype=np.int64)  # (Q,) rows kept per query
        self._key = np.empty(0, dtype=np.uint64)  # (E,) kept rows, sorted by (key, cand)
        self._cand = np.empty(0, dtype=np.int32)  # (E,)
        self._extra = np.empty(0, dtype=np.float32)  # (E,)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self.rows_seen = 0  # every row added
        self.rows_merged = 0  # rows that passed their floor and went through a merge

    def add(self, query: np.ndarray, cand: np.ndarray, score: np.ndarray, extra: np.ndarray):
        """Offer rows (R,) each: query id, candidate id (< 2**31), float32 score, float32 extra."""
        query, cand = np.asarray(query), np.asarray(cand)
        self.rows_seen += len(query)
        if not len(query):
            return
        if cand.max() >= 2**31 or cand.min() < 0:
            raise ValueError(
                f"candidate ids must lie in [0, 2**31), got {cand.min()}..{cand.max()}"
            )
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
        """Merge the pending rows into the kept rows, in place, one block of queries at a time.

        Query q's kept rows grow from ``lens[q]`` to ``min(lens[q] + new rows of q, k)``, so
        every query's rows start at or after where they did: the kept arrays are grown in place
        and the blocks are merged from the last to the first, each written over rows that were
        either its own (copied out first) or a later block's (already merged).
        """
        if not self._pending or not self.num_queries:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        key = np.concatenate([p[0] for p in pending])  # (P,)
        order = np.argsort(key)  # (P,) the new rows by key
        key = key[order]
        cand = np.concatenate([p[1] for p in pending])[order]
        extra = np.concatenate([p[2] for p in pending])[order]
        del pending, order
        self.rows_merged += len(key)
        new = np.bincount((key >> _SHIFT).view(np.int64), minlength=self.num_queries)  # (Q,)
        old_end, new_end = np.cumsum(self.lens), np.cumsum(new)  # (Q,) per-query ends
        self.lens = np.minimum(self.lens + new, self.k)
        out_end = np.cumsum(self.lens)
        for arr in (self._key, self._cand, self._extra):
            arr.resize(int(out_end[-1]), refcheck=False)  # grows in place (realloc)
        # blocks of whole queries of about `block` rows each, the last merged first
        cuts = np.searchsorted(
            old_end + new_end,
            np.arange(self.block, len(key) + old_end[-1], self.block),
            side="right",
        )
        bounds = np.unique(np.concatenate([[0], cuts, [self.num_queries]]))
        for qa, qb in zip(bounds[-2::-1], bounds[:0:-1], strict=True):
            self._merge_block(int(qa), int(qb), old_end, new_end, out_end, key, cand, extra)
        full = np.flatnonzero(self.lens == self.k)
        self.floor[full] = (self._key[out_end[full] - 1] & _LOW).astype(np.uint32)

    def _merge_block(self, qa, qb, old_end, new_end, out_end, key, cand, extra) -> None:
        """Queries qa..qb-1: their kept rows and new rows merged, cut to k each, written back."""
        o0, o1 = _start(old_end, qa), int(old_end[qb - 1])
        n0, n1 = _start(new_end, qa), int(new_end[qb - 1])
        w0 = _start(out_end, qa)
        b_key = np.concatenate([self._key[o0:o1], key[n0:n1]])  # (B,) two sorted runs
        b_cand = np.concatenate([self._cand[o0:o1], cand[n0:n1]])
        b_extra = np.concatenate([self._extra[o0:o1], extra[n0:n1]])
        # a stable sort of two sorted runs is one linear merge (timsort finds the runs)
        order = np.argsort(b_key, kind="stable")
        b_key, b_cand, b_extra = b_key[order], b_cand[order], b_extra[order]
        _tie_order(b_key, b_cand, b_extra)
        counts = np.diff(old_end[qa:qb] + new_end[qa:qb], prepend=o0 + n0)  # (Qb,) rows each
        lens = self.lens[qa:qb]
        take = _ranges(np.cumsum(counts) - counts, lens)  # (Eb,) block rows kept
        w1 = w0 + len(take)
        self._key[w0:w1], self._cand[w0:w1], self._extra[w0:w1] = (
            b_key[take],
            b_cand[take],
            b_extra[take],
        )

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(offsets (Q+1,) int64, cand (E,) int64, score (E,) float32, extra (E,) float32) in CSR
        form: query q's rows are ``offsets[q]:offsets[q + 1]``, best first. Call it once: the
        stream hands its arrays over."""
        self._merge()
        offsets = np.zeros(self.num_queries + 1, dtype=np.int64)
        np.cumsum(self.lens, out=offsets[1:])
        score = key_score(self._key.view(np.uint32)[::2] if _LITTLE else self._key & _LOW)
        self._key = None
        cand, self._cand = self._cand.astype(np.int64), None
        return offsets, cand, score, self._extra


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


def _start(ends: np.ndarray, q: int) -> int:
    """Where query q's rows start, given every query's end (a cumulative sum)."""
    return int(ends[q - 1]) if q else 0
