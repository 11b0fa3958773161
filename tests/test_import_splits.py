"""Split creation on import: --val-fraction / --test-fraction for tables without a split column."""

from __future__ import annotations

import polars as pl
from conftest import assert_error, run, write_image

from pipeline.core.dataset import Dataset
from pipeline.stages.importers import random_splits


def _table(tmp_path, n: int = 20, split: bool = False):
    rows = ["image,caption" + (",split" if split else "")]
    for i in range(n):
        write_image(tmp_path / f"{i}.png", (10 * i, 0, 0), fmt="PNG", size=8)
        for j in range(2):
            rows.append(f"{i}.png,picture {i} take {j}" + (",train" if split else ""))
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "t.csv"


def test_random_splits_are_seeded_counts():
    """round(f * n) images per split (at least one), the same draw for the same seed."""
    a = random_splits(20, 0.1, 0.25, seed=3)
    assert a.count("val") == 2 and a.count("test") == 5 and a.count("train") == 13
    assert a == random_splits(20, 0.1, 0.25, seed=3) and a != random_splits(20, 0.1, 0.25, seed=4)
    assert random_splits(5, 0.01, 0.0, seed=0).count("val") == 1


def test_import_makes_splits_by_image(tmp_path):
    """Every caption of an image lands in its image's split; the dataset is trainable (has val)."""
    out = tmp_path / "ds"
    result = run(
        "import-data",
        "--csv",
        _table(tmp_path),
        "--out",
        out,
        "--val-fraction",
        "0.1",
        "--test-fraction",
        "0.2",
        "--split-seed",
        "7",
    )
    assert result.exit_code == 0, result.output
    ds = Dataset.load(out)
    counts = ds.meta["counts"]
    assert [counts[s]["images"] for s in ("train", "val", "test")] == [14, 2, 4]
    assert [counts[s]["captions"] for s in ("train", "val", "test")] == [28, 4, 8]
    joined = ds.captions.join(ds.images, on="image_id")
    per_image = joined.group_by("image_id").agg(pl.col("split").n_unique())
    assert per_image["split"].max() == 1
    assert ds.meta["source"]["split_seed"] == 7


def test_bad_fractions_are_one_line(tmp_path):
    """Fractions out of range, summing to 1, or beside a split column are refused."""
    table = _table(tmp_path)
    base = ["import-data", "--csv", table, "--out", tmp_path / "x"]
    assert_error(run(*base, "--val-fraction", "1.5"), "--val-fraction", "1.5")
    assert_error(run(*base, "--val-fraction", "0.5", "--test-fraction", "0.5"), "no training")
    with_split = _table(tmp_path / "s", split=True)
    assert_error(
        run("import-data", "--csv", with_split, "--out", tmp_path / "y", "--val-fraction", "0.1"),
        "split column",
        "drop the fractions",
    )
