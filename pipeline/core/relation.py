"""The full caption-image relation: every (image, caption) pair that truly matches.

A dataset's labels say which image each caption was written for (one image per caption). Real
captions often fit other images too ("two dogs on grass"), so the labels call true matches
negatives: mined hard negatives then hold unlabeled true matches, and a retrieval metric that
counts only the labelled image penalises a model for ranking another true match first. A
generated dataset knows the whole relation and writes it beside its tables
(``schemas.RELATION_FILE``); ECCV Caption and CxC extend COCO's labels towards it by hand.

Pure helpers over polars tables, no torch: the dataset writer checks a relation with
:func:`check_relation`; evaluation maps it to a split's rows with :func:`relation_rows`;
:func:`false_negative_rate` measures how many mined negatives are true matches.
"""

from __future__ import annotations

import numpy as np
import polars as pl


def check_relation(
    images: pl.DataFrame, captions: pl.DataFrame, relation: pl.DataFrame
) -> pl.DataFrame:
    """The relation deduplicated and sorted by (caption_id, image_id), after checking it.

    ``images`` has ``image_id, split``, ``captions`` has ``caption_id, image_id`` (the labels).
    Raises ValueError when a pair names an unknown id, joins an image and a caption of different
    splits, or when a labelled pair is missing (the relation extends the labels, never drops one).
    """
    missing_cols = {"image_id", "caption_id"} - set(relation.columns)
    if missing_cols:
        raise ValueError(f"the relation lacks columns {sorted(missing_cols)}")
    rel = (
        relation.select(pl.col("image_id").cast(pl.Int64), pl.col("caption_id").cast(pl.Int64))
        .unique()
        .sort("caption_id", "image_id")
    )
    image_split = images.select("image_id", pl.col("split").alias("image_split"))
    caption_split = captions.select("caption_id", "image_id").join(
        images.select("image_id", "split"), on="image_id", how="left"
    )
    joined = rel.join(image_split, on="image_id", how="left").join(
        caption_split.select("caption_id", pl.col("split").alias("caption_split")),
        on="caption_id",
        how="left",
    )
    unknown = joined.filter(pl.col("image_split").is_null() | pl.col("caption_split").is_null())
    if unknown.height:
        first = unknown.row(0, named=True)
        raise ValueError(
            f"{unknown.height} relation pairs name ids that do not exist (first: image "
            f"{first['image_id']}, caption {first['caption_id']}); re-create the relation"
        )
    crossing = joined.filter(pl.col("image_split") != pl.col("caption_split"))
    if crossing.height:
        first = crossing.row(0, named=True)
        raise ValueError(
            f"{crossing.height} relation pairs join an image and a caption of different splits "
            f"(first: image {first['image_id']} in {first['image_split']}, caption "
            f"{first['caption_id']} in {first['caption_split']}); keep pairs within a split"
        )
    labelled = captions.select("image_id", "caption_id")
    dropped = labelled.join(rel, on=["image_id", "caption_id"], how="anti")
    if dropped.height:
        first = dropped.row(0, named=True)
        raise ValueError(
            f"the relation misses {dropped.height} labelled pairs (first: image "
            f"{first['image_id']}, caption {first['caption_id']}); it must hold every caption's "
            "own image"
        )
    return rel


def relation_rows(
    relation: pl.DataFrame, images: pl.DataFrame, captions: pl.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """(image rows (P,), caption rows (P,)) int64: the relation's pairs inside these tables.

    Rows count from 0 in the order of ``images`` and ``captions`` (e.g. one split's), so the
    result indexes the rows of a similarity matrix built from those tables.
    """
    image_row = images.select("image_id", pl.int_range(pl.len(), dtype=pl.Int64).alias("i_row"))
    caption_row = captions.select(
        "caption_id", pl.int_range(pl.len(), dtype=pl.Int64).alias("c_row")
    )
    pairs = relation.join(image_row, on="image_id").join(caption_row, on="caption_id")
    pairs = pairs.sort("i_row", "c_row")
    return pairs["i_row"].to_numpy().astype(np.int64), pairs["c_row"].to_numpy().astype(np.int64)


def matches_per_caption(relation: pl.DataFrame) -> dict[str, float]:
    """How many images each caption fits: mean and max, and the fraction fitting more than one."""
    per = relation.group_by("caption_id").len()["len"]
    return {
        "mean": round(float(per.mean()), 3),
        "max": int(per.max()),
        "fraction_above_one": round(float((per > 1).mean()), 4),
    }


def false_negative_rate(candidates: pl.DataFrame, relation: pl.DataFrame) -> dict:
    """The fraction of mined non-positive candidates that are true matches, per direction.

    ``candidates`` follows ``schemas.CANDIDATES_SCHEMA`` (``is_positive`` = the labelled pair);
    a non-positive candidate is a false negative when its (image, caption) pair is in
    ``relation``. Returns ``{"i2t", "t2i", "all"}`` rates (None for a direction without
    negatives) and the ``negatives`` and ``false_negatives`` counts behind ``all``.
    """
    neg = candidates.filter(~pl.col("is_positive")).select(
        "direction",
        pl.when(pl.col("direction") == "i2t")
        .then(pl.col("query_id"))
        .otherwise(pl.col("candidate_id"))
        .alias("image_id"),
        pl.when(pl.col("direction") == "i2t")
        .then(pl.col("candidate_id"))
        .otherwise(pl.col("query_id"))
        .alias("caption_id"),
    )
    true = relation.select("image_id", "caption_id").with_columns(pl.lit(True).alias("match"))
    neg = neg.join(true, on=["image_id", "caption_id"], how="left").with_columns(
        pl.col("match").fill_null(False)
    )
    out: dict = {}
    for direction in ("i2t", "t2i"):
        part = neg.filter(pl.col("direction") == direction)["match"]
        out[direction] = round(float(part.mean()), 4) if len(part) else None
    out["all"] = round(float(neg["match"].mean()), 4) if neg.height else None
    out["negatives"] = neg.height
    out["false_negatives"] = int(neg["match"].sum())
    return out
