"""The pairs a teacher cache must hold for one candidates dir: one function builds the set.

``score-teacher`` scores these pairs, ``cache verify --candidates`` checks that they are cached,
and ``cache verify --repair`` re-scores damaged shards from them: the three agree because they
all call :func:`load_pair_set`. The set is every (image, caption) pair of the candidates (both
directions, each pair once) plus every ground-truth pair of the candidates' split, so a student
trained from the cache has a teacher score for each query's positive even where the miner did not
retrieve it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.core.candidates import candidate_pairs, load_candidates
from pipeline.core.dataset import Dataset

PAIR_KEY = ["image_id", "caption_id"]


@dataclass(frozen=True)
class PairSet:
    """The pairs to score for one candidates dir, with where they came from."""

    pairs: pl.DataFrame  # (image_id, caption_id): every pair to score, each once, sorted
    candidate_pairs: pl.DataFrame  # the candidates' pairs alone (both directions, deduplicated)
    positives: pl.DataFrame  # (image_id, caption_id): every ground-truth pair of the split
    positives_added: int  # positives the candidates did not hold (scored because of this rule)


def unique_pairs(cand: pl.DataFrame) -> pl.DataFrame:
    """The (image_id, caption_id) pairs of both directions, each once, sorted (the one
    conversion, ``pipeline.core.candidates.candidate_pairs``)."""
    return candidate_pairs(cand)


def positive_pairs(ds: Dataset, split: str) -> pl.DataFrame:
    """(image_id, caption_id) of every caption of ``split`` with its own image, sorted."""
    _, captions = ds.split(split)
    return captions.select(PAIR_KEY).sort(PAIR_KEY)


def pair_set(manifest: dict, cand: pl.DataFrame, ds: Dataset) -> PairSet:
    """The pairs to score for candidates ``cand`` (``manifest`` names their split) of ``ds``."""
    from_cand = unique_pairs(cand)
    positives = positive_pairs(ds, manifest["split"])
    added = positives.join(from_cand, on=PAIR_KEY, how="anti").height
    pairs = pl.concat([from_cand, positives]).unique().sort(PAIR_KEY)
    return PairSet(
        pairs=pairs, candidate_pairs=from_cand, positives=positives, positives_added=added
    )


def load_pair_set(
    candidates: str | Path, data: str | Path | None = None
) -> tuple[dict, pl.DataFrame, Dataset, PairSet]:
    """(candidates manifest, candidates, dataset, pair set) of a candidates dir.

    ``data`` defaults to the dataset the candidates recorded; a dataset with another fingerprint
    is refused (its ids would name other images and captions).
    """
    manifest, cand = load_candidates(candidates)
    ds = Dataset.load(data or manifest["dataset"]["path"])
    if ds.fingerprint != manifest["dataset"]["fingerprint"]:
        raise ValueError(
            f"dataset '{ds.root}' is not the one candidates '{candidates}' were "
            "mined from (fingerprints differ); pass the right --data"
        )
    return manifest, cand, ds, pair_set(manifest, cand, ds)
