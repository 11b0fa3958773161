"""Training batches of (image, caption) pairs, and each batch's teacher lists (DESIGN 5).

**Hard batching** (the default): an epoch walks the training images in a random order, S at a
time (S = batch_size // (1 + neighbours_per_seed)); these are the batch's *seeds*, so every
training image seeds exactly one batch per epoch. Each seed gets a random caption of its own and a
queue of *neighbours*: the images of its cached hard-negative captions (with that very caption,
so the scored pair is in the batch) merged with its caption's cached hard-negative images (with a
random caption), by teacher score, highest first. Seeds take turns (round robin) adding their next
neighbour not yet in the batch until it holds batch_size images; if the queues run dry the batch is
topped up with random training images. A batch holds each image once, with one caption, so pair r
is (images[r], captions[r]) and ITC has one positive per row and column. Because neighbours are
extra, a hard epoch has about (1 + neighbours_per_seed) times as many steps as a random one.

**Random batching**: a random permutation cut into chunks of batch_size (the last topped up).
Batching is independent of the loss: ITC on hard batches is the `student-itc-hard` control.

**Neighbour order** (``neighbours``, a lookup of its own): the queues follow the lookup they are
built from: the miner's candidates (``--batching-order miner``, no teacher involved) or the teacher
cache (``teacher``). The negatives a loss receives always come from ``lookup``.

**Delivered negatives** (``negatives="explicit"`` or ``"bank"``): each batch also lists the cached
hard negatives of its queries that are not already in it, as extra images/captions, so every query
sees all of its top-``hard_k`` cached negatives. The trainer encodes the extras (explicit: extra
forward passes) or reads them from its negative bank (student/bank.py). ``"inbatch"`` lists none:
a query sees only the negatives the batch happens to hold.

Everything is drawn from ``numpy.random.default_rng((seed, epoch))``: the same (seed, epoch) gives
the same batches on every rank, and after a resume. Shape letters: B pairs, K negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from student.teacher_lookup import NegativeLists, TeacherLookup

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Batch:
    """One step's pairs, the seeds it was built from, and (explicit / bank) its queries' cached
    hard negatives that it does not hold (the extras)."""

    images: np.ndarray  # (B,) int64 image ids; pair r is (images[r], captions[r])
    captions: np.ndarray  # (B,) int64 caption ids, one caption of each image
    seeds: np.ndarray  # (S,) int64 the training images this batch seeds
    extra_images: np.ndarray = field(default_factory=lambda: _EMPTY)  # (Ei,) explicit / bank
    extra_captions: np.ndarray = field(default_factory=lambda: _EMPTY)  # (Ec,) explicit / bank

    @property
    def image_pool(self) -> np.ndarray:
        """(B + Ei,) every image the step encodes: the pairs' images first."""
        return np.concatenate([self.images, self.extra_images])

    @property
    def caption_pool(self) -> np.ndarray:
        """(B + Ec,) every caption the step encodes: the pairs' captions first."""
        return np.concatenate([self.captions, self.extra_captions])


class BatchPlanner:
    """Deterministic batches per (seed, epoch) over the training images (module docstring)."""

    def __init__(
        self,
        train_image_ids: np.ndarray,
        caption_owner: np.ndarray,
        batch_size: int,
        *,
        batching: str = "hard",
        lookup: TeacherLookup | None = None,
        neighbours: TeacherLookup | None = None,
        neighbours_per_seed: int = 3,
        negatives: str = "inbatch",
        seed: int = 0,
    ):
        neighbours = neighbours if neighbours is not None else lookup
        if batching == "hard" and neighbours is None:
            raise ValueError("hard batching needs candidate lists (a teacher cache or candidates)")
        if negatives in ("explicit", "bank") and lookup is None:
            raise ValueError(f"{negatives} negatives need hard-negative lists (cache, candidates)")
        self.lookup, self.batching, self.negatives, self.seed = lookup, batching, negatives, seed
        self.order = neighbours  # the lookup whose order the neighbour queues follow
        self.neighbours = neighbours_per_seed
        owner = np.asarray(caption_owner, dtype=np.int64)
        num_images = max(int(owner.max(initial=-1)), int(np.max(train_image_ids, initial=-1))) + 1
        # Captions grouped by image (CSR); only images with a caption can form a pair.
        self._caps = np.argsort(owner, kind="stable")  # caption ids grouped by image
        self._ncap = np.bincount(owner, minlength=num_images)  # (N,)
        self._cap_start = np.cumsum(self._ncap) - self._ncap  # (N,)
        ids = np.asarray(train_image_ids, dtype=np.int64)
        self.images = np.sort(ids[self._ncap[ids] > 0])
        self._owner = owner
        self.batch_size = min(batch_size, len(self.images))
        per = 1 + neighbours_per_seed if batching == "hard" else 1
        self.seeds_per_batch = max(1, self.batch_size // per)

    @property
    def train_captions(self) -> np.ndarray:
        """(Mt,) int64 every caption of the training images, by id."""
        return np.flatnonzero(np.isin(self._owner, self.images))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.images) / self.seeds_per_batch)

    def epoch(self, epoch: int) -> list[Batch]:
        """The batches of one epoch, the same on every call and every rank."""
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(self.images)
        batches = []
        for start in range(0, len(order), self.seeds_per_batch):
            seeds = order[start : start + self.seeds_per_batch]
            images, captions = self._fill(seeds, rng)
            batch = Batch(np.array(images), np.array(captions), seeds)
            batches.append(self._with_extras(batch) if self.negatives != "inbatch" else batch)
        return batches

    def _random_captions(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pick = rng.integers(0, self._ncap[images])  # one draw per image
        return self._caps[self._cap_start[images] + pick]

    def _fill(self, seeds: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(images, captions) of a batch: the seeds, their neighbours (hard), then random images."""
        images = seeds.tolist()
        captions = self._random_captions(seeds, rng).tolist()
        present = set(images)
        if self.batching == "hard":
            queues = [self._neighbours(s, c) for s, c in zip(images, captions, strict=True)]
            heads = [0] * len(queues)
            progressed = True
            while progressed and len(images) < self.batch_size:
                progressed = False
                for q, (nb_img, nb_cap) in enumerate(queues):
                    p = heads[q]
                    while p < len(nb_img) and nb_img[p] in present:
                        p += 1
                    if p < len(nb_img) and len(images) < self.batch_size:
                        img, cap = nb_img[p], nb_cap[p]
                        if cap < 0:
                            cap = int(self._random_captions(np.array([img]), rng)[0])
                        images.append(img)
                        captions.append(cap)
                        present.add(img)
                        p += 1
                        progressed = True
                    heads[q] = p
        while len(images) < self.batch_size:  # top up: few or no neighbours, or the last batch
            for img in rng.choice(self.images, size=self.batch_size - len(images)).tolist():
                if img not in present and len(images) < self.batch_size:
                    images.append(img)
                    captions.append(int(self._random_captions(np.array([img]), rng)[0]))
                    present.add(img)
        return images, captions

    def _neighbours(self, image: int, caption: int) -> tuple[list[int], list[int]]:
        """(images, captions; -1 = any caption) near a seed pair, by the order lookup's score (the
        teacher's or the miner's), best first."""
        caps, cap_score, _ = self.order.i2t.of(image)
        imgs, img_score, _ = self.order.t2i.of(caption)
        ok = self._ncap[imgs] > 0  # an image without captions cannot join a batch
        imgs, img_score = imgs[ok], img_score[ok]
        nb_img = np.concatenate([self._owner[caps], imgs])
        nb_cap = np.concatenate([caps, np.full(len(imgs), -1, dtype=np.int64)])
        order = np.argsort(-np.concatenate([cap_score, img_score]), kind="stable")
        return nb_img[order].tolist(), nb_cap[order].tolist()

    def _with_extras(self, batch: Batch) -> Batch:
        """The batch plus its queries' cached hard negatives that it does not already hold."""
        lk = self.lookup
        _, e = lk.i2t.gather(batch.images)
        _, f = lk.t2i.gather(batch.captions)
        return Batch(
            batch.images,
            batch.captions,
            batch.seeds,
            extra_images=np.setdiff1d(lk.t2i.cand[f], batch.images),
            extra_captions=np.setdiff1d(lk.i2t.cand[e], batch.captions),
        )


@dataclass(frozen=True)
class QueryLists:
    """One direction's cached hard negatives of B queries that are present in the step's pool."""

    index: np.ndarray  # (B, K) int64 position of each negative in the other modality's pool
    score: np.ndarray  # (B, K) float32 teacher score, sorted desc per row; 0 at padding
    prob: np.ndarray  # (B, K) float32 teacher match probability; 0 at padding
    mask: np.ndarray  # (B, K) bool, True for a real negative, False for padding
    cached: np.ndarray  # (B,) int64 cached hard negatives of the query, up to hard_k (present
    # or not): what the query could receive

    @property
    def present(self) -> np.ndarray:
        """(B,) how many of the query's cached hard negatives the step holds (what it receives)."""
        return self.mask.sum(axis=1)


def query_lists(lists: NegativeLists, queries: np.ndarray, pool: np.ndarray) -> QueryLists:
    """Each query's hard negatives that occur in ``pool`` (ids), as padded (B, K) arrays."""
    row, entry = lists.gather(queries)  # grouped by row, best first within a row
    cand = lists.cand[entry]
    sorter = np.argsort(pool, kind="stable")
    at = np.searchsorted(pool[sorter], cand).clip(max=max(len(pool) - 1, 0))
    found = pool[sorter][at] == cand
    row, entry, col = row[found], entry[found], sorter[at[found]]
    n = np.bincount(row, minlength=len(queries))  # (B,)
    k = max(1, int(n.max(initial=0)))  # one padding column keeps every tensor non-empty
    rank = np.arange(len(row)) - np.repeat(np.cumsum(n) - n, n)  # position within the row
    shape = (len(queries), k)
    index, mask = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=bool)
    score, prob = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    index[row, rank], mask[row, rank] = col, True
    score[row, rank], prob[row, rank] = lists.score[entry], lists.prob[entry]
    return QueryLists(index, score, prob, mask, lists.counts(queries))


def batch_lists(lookup: TeacherLookup, batch: Batch) -> tuple[QueryLists, QueryLists]:
    """(image->text, text->image) lists of a batch: image queries over the caption pool, and
    caption queries over the image pool."""
    return (
        query_lists(lookup.i2t, batch.images, batch.caption_pool),
        query_lists(lookup.t2i, batch.captions, batch.image_pool),
    )
