"""Each training query's cached hard negatives, by teacher score, as compact CSR arrays.

Built once from a teacher cache (``pipeline.core.cache.load_scores``: one score per unique (image,
caption) pair) or, for a control run without a teacher, from a candidates dir (the miner's cosine
as the score, no probability). A query's cached candidates are every cached pair that contains
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


def _csr(rows: pl.LazyFrame, query: str, cand: str, n: int, k: int) -> NegativeLists:
    """Group rows by ``query`` into lists of ``cand`` by score desc (ties: id asc), capped at k."""
    # Cheap cut first (a rank per query needs no global order): every row tied with the k-th
    # best score survives, so the exact cap below still sees the right ones. Then one sort of
    # the few survivors; polars does both on all cores.
    top = (
        rows.select(pl.col(query).alias("q"), pl.col(cand).alias("c"), "score", "prob")
        .filter(pl.col("score").rank("min", descending=True).over("q") <= k)
        .sort(["q", "score", "c"], descending=[False, True, False])
        .collect()
    )
    q = top["q"].to_numpy()
    counts = np.bincount(q, minlength=n)  # (n,)
    rank = np.arange(len(q)) - (np.cumsum(counts) - counts)[q]  # (E,) position in its list
    keep = rank < k
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.minimum(counts, k), out=offsets[1:])
    return NegativeLists(
        offsets=offsets,
        cand=top["c"].to_numpy()[keep].astype(np.int64, copy=False),
        score=top["score"].to_numpy()[keep].astype(np.float32, copy=False),
        prob=top["prob"].to_numpy()[keep].astype(np.float32, copy=False),
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
    if hard_k < 1:
        raise ValueError(f"--hard-k must be >= 1, got {hard_k}")
    caption_owner = np.asarray(caption_owner, dtype=np.int64)
    num_captions = len(caption_owner)
    if pairs.height and not (
        0 <= pairs["image_id"].min() <= pairs["image_id"].max() < num_images
        and 0 <= pairs["caption_id"].min() <= pairs["caption_id"].max() < num_captions
    ):
        raise ValueError(
            "cached pairs name image or caption ids outside the dataset; the cache or "
            "candidates were made for another dataset"
        )
    train = np.zeros(num_images, dtype=bool)
    train[np.asarray(train_image_ids, dtype=np.int64)] = True
    train_s, owner_s = pl.Series(train), pl.Series(caption_owner)
    rows = (
        pairs.lazy()
        .select(
            pl.col("image_id").cast(pl.Int64),
            pl.col("caption_id").cast(pl.Int64),
            pl.col("score").cast(pl.Float32),
            pl.col("prob").cast(pl.Float32),
            pl.lit(owner_s).gather(pl.col("caption_id")).alias("owner"),
        )
        .filter(pl.lit(train_s).gather(pl.col("image_id")) & pl.lit(train_s).gather("owner"))
        .collect()
    )
    pos = rows.filter(pl.col("owner") == pl.col("image_id"))
    pos_score = np.full(num_captions, np.nan, dtype=np.float32)
    pos_prob = np.full(num_captions, np.nan, dtype=np.float32)
    pos_score[pos["caption_id"].to_numpy()] = pos["score"].to_numpy()
    pos_prob[pos["caption_id"].to_numpy()] = pos["prob"].to_numpy()
    neg = rows.lazy().filter(pl.col("owner") != pl.col("image_id"))
    return TeacherLookup(
        i2t=_csr(neg, "image_id", "caption_id", num_images, hard_k),
        t2i=_csr(neg, "caption_id", "image_id", num_captions, hard_k),
        pos_score=pos_score,
        pos_prob=pos_prob,
        caption_owner=caption_owner,
        hard_k=hard_k,
        source=source,
    )


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
    from pipeline.core.cache import load_scores
    from pipeline.core.cache_entry import resolve_entry
    from pipeline.core.candidates import candidate_pairs, load_candidates

    train_images, _ = dataset.split("train")
    owner = dataset.captions["image_id"].to_numpy()
    if teacher_scores is not None:
        # a cache root is fine too: its entry for this dataset is picked (core/cache_entry.py)
        entry = resolve_entry(teacher_scores, dataset.fingerprint)
        _, pairs = load_scores(entry, dataset.fingerprint)
        source = "teacher"
    elif candidates is not None:
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
        source = "miner"
    else:
        raise ValueError("load_lookup needs teacher_scores or candidates")
    return build_lookup(
        pairs.select(PAIR_COLUMNS),
        owner,
        train_images["image_id"].to_numpy(),
        dataset.images.height,
        hard_k,
        source,
    )
