"""Each training query's cached hard negatives, by teacher score, as compact CSR arrays.

Built once from a teacher cache (one score per unique (image, caption) pair), streamed shard by
shard (``pipeline.core.cache.iter_scores``) into per-query top-k accumulators
(``student.topk_stream``), so neither the pairs nor a sort of them is ever held whole; or, for a
control run without a teacher, from a candidates dir (the miner's cosine as the score, no
probability). A query's cached candidates are every cached pair that contains
it: for an image, all pairs with that image_id; for a caption, all pairs with that caption_id.
Both ends must lie in the training split. Its *hard negatives* are the non-positive ones (an
image's captions of other images; a caption's other images), sorted by score, highest first
(ties: candidate id ascending), capped at ``hard_k``.

Lists are indexed by dataset id (ids are dense, 0..N-1 images and 0..M-1 captions), so query q's
list is ``cand[offsets[q]:offsets[q + 1]]``: no hash map, no Python object per query. Queries
outside the training split have empty lists.

A positive pair's teacher score (needed by kl / listmle / margin-mse, whose column 0 is the
positive) is kept per caption: a caption has exactly one image, so ``pos_score[caption_id]`` is
the score of (its image, it), NaN when that pair was never mined. The trainer drops such a query
from the baseline terms (never invents a score).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from student.topk_stream import TopKStream

PAIR_COLUMNS = ("image_id", "caption_id", "score", "prob")


@dataclass(frozen=True)
class NegativeLists:
    """One direction's hard-negative lists in CSR form; E = total kept entries."""

    offsets: np.ndarray  # (Nq + 1,) int64; query q owns entries offsets[q]:offsets[q + 1]
    cand: np.ndarray  # (E,) int64 candidate ids, per query by score desc (ties: id asc)
    score: np.ndarray  # (E,) float32 raw teacher score (ITM logit; miner cosine for candidates)
    prob: np.ndarray  # (E,) float32 teacher match probability (NaN when unknown)

    def counts(self, queries: np.ndarray | None = None) -> np.ndarray:
        """(Q,) number of kept hard negatives of each query (all queries when None)."""
        n = np.diff(self.offsets)
        return n if queries is None else n[np.asarray(queries, dtype=np.int64)]

    def of(self, query: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(candidate ids, scores, probs) of one query, best first."""
        sl = slice(self.offsets[query], self.offsets[query + 1])
        return self.cand[sl], self.score[sl], self.prob[sl]

    def gather(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row (E',), entry (E',)): the entries of many queries concatenated, row = query index.

        Entries keep each query's order (best first); ``self.cand[entry]`` etc. read them.
        """
        queries = np.asarray(queries, dtype=np.int64)
        starts = self.offsets[queries]  # (Q,)
        lens = self.offsets[queries + 1] - starts  # (Q,)
        row = np.repeat(np.arange(len(queries)), lens)  # (E',)
        first = np.cumsum(lens) - lens  # (Q,) where each query's block starts in the output
        entry = np.arange(lens.sum()) - np.repeat(first - starts, lens)  # (E',)
        return row, entry


@dataclass(frozen=True)
class TeacherLookup:
    """Hard negatives of every training query, both directions, plus the positives' scores."""

    i2t: NegativeLists  # image id -> negative caption ids
    t2i: NegativeLists  # caption id -> negative image ids
    pos_score: np.ndarray  # (M,) float32 score of (caption's image, caption); NaN: not cached
    pos_prob: np.ndarray  # (M,) float32 match probability of that pair; NaN: not cached
    caption_owner: np.ndarray  # (M,) int64 image id of every caption
    hard_k: int  # lists are capped at this many negatives
    source: str  # "teacher" (a cache) or "miner" (a candidates dir: no teacher involved)

    def summary(self) -> dict:
        """Counts for logs: queries with lists, mean list length, positives cached."""
        out = {"source": self.source, "hard_k": self.hard_k}
        for name, lists in (("i2t", self.i2t), ("t2i", self.t2i)):
            n = lists.counts()
            has = n > 0
            out[name] = {
                "queries": int(has.sum()),
                "mean_negatives": float(n[has].mean()) if has.any() else 0.0,
            }
        out["positives_cached"] = int(np.isfinite(self.pos_score).sum())
        return out


class LookupBuilder:
    """Builds a ``TeacherLookup`` from pair rows given in chunks of any size and order.

    Each chunk is checked (ids inside the dataset), cut to train pairs, and streamed into two
    ``TopKStream``s (image -> captions, caption -> images): memory stays bounded by the kept
    lists, whatever the number of pairs (see ``student.topk_stream``).
    """

    def __init__(
        self,
        caption_owner: np.ndarray,
        train_image_ids: np.ndarray,
        num_images: int,
        hard_k: int,
        source: str = "teacher",
    ):
        if hard_k < 1:
            raise ValueError(f"--hard-k must be >= 1, got {hard_k}")
        self.owner = np.asarray(caption_owner, dtype=np.int64)  # (M,)
        self.num_images, self.hard_k, self.source = num_images, hard_k, source
        self.train = np.zeros(num_images, dtype=bool)  # (N,)
        self.train[np.asarray(train_image_ids, dtype=np.int64)] = True
        self.pos_score = np.full(len(self.owner), np.nan, dtype=np.float32)  # (M,)
        self.pos_prob = np.full(len(self.owner), np.nan, dtype=np.float32)
        self.i2t = TopKStream(num_images, hard_k)
        self.t2i = TopKStream(len(self.owner), hard_k)

    def add(self, image_id, caption_id, score, prob) -> None:
        """One chunk of pairs: (P,) image ids, caption ids, float32 scores and probabilities."""
        image_id = np.asarray(image_id, dtype=np.int64)
        caption_id = np.asarray(caption_id, dtype=np.int64)
        if len(image_id) and not (
            0 <= image_id.min() <= image_id.max() < self.num_images
            and 0 <= caption_id.min() <= caption_id.max() < len(self.owner)
        ):
            raise ValueError(
                "cached pairs name image or caption ids outside the dataset; the cache or "
                "candidates were made for another dataset"
            )
        owner = self.owner[caption_id]  # (P,)
        keep = self.train[image_id] & self.train[owner]
        positive = keep & (owner == image_id)
        pos_caps = caption_id[positive]
        self.pos_score[pos_caps] = np.asarray(score, dtype=np.float32)[positive]
        self.pos_prob[pos_caps] = np.asarray(prob, dtype=np.float32)[positive]
        keep &= ~positive
        img, cap = image_id[keep], caption_id[keep]
        score = np.asarray(score, dtype=np.float32)[keep]
        prob = np.asarray(prob, dtype=np.float32)[keep]
        self.i2t.add(img, cap, score, prob)
        self.t2i.add(cap, img, score, prob)

    def finish(self) -> TeacherLookup:
        lists = {}
        for name, stream in (("i2t", self.i2t), ("t2i", self.t2i)):
            offsets, cand, score, prob = stream.finish()
            lists[name] = NegativeLists(offsets=offsets, cand=cand, score=score, prob=prob)
        return TeacherLookup(
            **lists,
            pos_score=self.pos_score,
            pos_prob=self.pos_prob,
            caption_owner=self.owner,
            hard_k=self.hard_k,
            source=self.source,
        )


def build_lookup(
    pairs: pl.DataFrame,
    caption_owner: np.ndarray,
    train_image_ids: np.ndarray,
    num_images: int,
    hard_k: int,
    source: str = "teacher",
) -> TeacherLookup:
    """The lookup of ``pairs`` (image_id, caption_id, score, prob), restricted to train pairs.

    ``caption_owner`` (M,) is every caption's image id (the dataset's caption table in id order).
    """
    builder = LookupBuilder(caption_owner, train_image_ids, num_images, hard_k, source)
    builder.add(*(pairs[c].to_numpy() for c in PAIR_COLUMNS))
    return builder.finish()


def load_lookup(
    dataset,
    hard_k: int,
    *,
    teacher_scores: str | Path | None = None,
    candidates: str | Path | None = None,
) -> TeacherLookup:
    """The lookup of a dataset's training split from a teacher cache, else a candidates dir.

    ``dataset`` is a ``pipeline.core.dataset.Dataset``; the source must be made for its fingerprint
    (the cache/candidates readers raise a ValueError naming the file otherwise).
    """
    from pipeline.core.cache import iter_scores
    from pipeline.core.cache_entry import resolve_entry
    from pipeline.core.candidates import candidate_pairs, load_candidates
    from pipeline.core.memory import release_free_memory

    train_images, _ = dataset.split("train")
    owner = dataset.captions["image_id"].to_numpy()
    train_ids = train_images["image_id"].to_numpy()
    n = dataset.images.height
    if teacher_scores is not None:
        # a cache root is fine too: its entry for this dataset is picked (core/cache_entry.py)
        entry = resolve_entry(teacher_scores, dataset.fingerprint)
        builder = LookupBuilder(owner, train_ids, n, hard_k, "teacher")
        shard = None
        for shard in iter_scores(entry, dataset.fingerprint, columns=list(PAIR_COLUMNS)):
            builder.add(*(shard.column(c).to_numpy() for c in PAIR_COLUMNS))
        shard = None  # the last shard's table goes too
        lookup = builder.finish()
        del builder
        release_free_memory()  # the build's freed buffers: nothing held beyond the lookup
        return lookup
    if candidates is not None:
        manifest, table = load_candidates(Path(candidates))
        have = manifest.get("dataset", {}).get("fingerprint")
        if have != dataset.fingerprint:
            raise ValueError(
                f"--candidates '{candidates}' was mined from another dataset (fingerprint "
                f"{str(have)[:12]}, --data has {dataset.fingerprint[:12]}); mine this dataset "
                "with `cprd mine-candidates`"
            )
        # the miner's cosine as the score (equal from either direction); no probability, so a
        # probability validity rule cannot be used with miner lists
        pairs = candidate_pairs(table, "score").with_columns(
            pl.lit(float("nan"), dtype=pl.Float32).alias("prob")
        )
        return build_lookup(pairs, owner, train_ids, n, hard_k, "miner")
    raise ValueError("load_lookup needs teacher_scores or candidates")
