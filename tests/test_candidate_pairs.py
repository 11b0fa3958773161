"""pipeline.core.candidates.candidate_pairs: the one conversion from candidate rows to pairs."""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.core.candidates import candidate_pairs


def test_candidate_pairs_match_a_loop():
    """Both directions, each pair once, sorted; a carried column keeps the pair's first row
    (image queries first), checked against a written-out loop over random rows."""
    rng = np.random.default_rng(0)
    n = 400
    cand = pl.DataFrame(
        {
            "direction": rng.choice(["i2t", "t2i"], n).tolist(),
            "query_id": rng.integers(0, 12, n),
            "candidate_id": rng.integers(0, 12, n),
            "score": rng.normal(size=n).astype(np.float32),
        }
    )
    want: dict[tuple[int, int], float] = {}
    for direction in ("i2t", "t2i"):
        for d, q, c, s in cand.iter_rows():
            if d == direction:
                pair = (q, c) if d == "i2t" else (c, q)
                want.setdefault(pair, s)
    got = candidate_pairs(cand, "score")
    assert got.columns == ["image_id", "caption_id", "score"]
    assert list(zip(got["image_id"], got["caption_id"], strict=True)) == sorted(want)
    assert got["score"].to_list() == [want[p] for p in sorted(want)]
    ids_only = candidate_pairs(cand)
    assert ids_only.columns == ["image_id", "caption_id"]
    assert ids_only.equals(got.drop("score"))
