"""`cprd cache verify [--repair]`: every kind of damage is found and named, repair re-scores only it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import assert_error, mine_and_score, run

from pipeline.core import cache

SHARDS = 4


@pytest.fixture(scope="module")
def clean(small_dataset, tiny_teacher_dir, tmp_path_factory) -> dict:
    """A complete 4-shard cache of k=3 candidates (read-only), its candidates and its scores."""
    base = tmp_path_factory.mktemp("verify")
    path = mine_and_score(base, small_dataset, tiny_teacher_dir, k=3, shards=SHARDS)
    rows = {s: cache.read_shard(path, s).height for s in range(SHARDS)}
    return {"path": path, "cand": base / "cand", "scores": scores(path), "rows": rows}


@pytest.fixture
def entry(clean, tmp_path) -> Path:
    """A private copy of the clean cache entry (same key, same directory name)."""
    dst = tmp_path / "cache" / clean["path"].name
    shutil.copytree(clean["path"], dst)
    return dst


def scores(path: Path) -> pl.DataFrame:
    return cache.load_scores(path)[1].sort("image_id", "caption_id")


def verify(*args) -> tuple[int, dict]:
    result = run("cache", "verify", *args, "--json")
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


def _truncate(p: Path) -> None:
    f = p / "shard-00001.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(p: Path) -> None:
    f = p / "shard-00002.parquet"
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    f.write_bytes(bytes(data))


def _edit_manifest(p: Path) -> None:
    m = json.loads((p / "cache.json").read_text())
    m["shards"]["shard-00003"]["rows"] += 5
    (p / "cache.json").write_text(json.dumps(m))


def _wrong_pairs(p: Path) -> None:
    # Consistent marker and checksum, wrong content: shard 0's pairs written as shard 1.
    cache.write_shard(p, 1, cache.read_shard(p, 0))


def _duplicates(p: Path) -> None:
    rows = cache.read_shard(p, 2)
    cache.write_shard(p, 2, pl.concat([rows, rows.head(2)]))


DAMAGE = [
    # name, how, damaged shards, fragment of the shard's line, manifest lines expected
    ("truncated", _truncate, [1], "checksum differs", False),
    ("flipped bytes", _flip, [2], "checksum differs", False),
    ("parquet deleted", lambda p: (p / "shard-00000.parquet").unlink(), [0], "file missing", False),
    ("marker deleted", lambda p: (p / "shard-00003.json").unlink(), [3], "marker missing", False),
    ("manifest edited", _edit_manifest, [], None, True),
    ("manifest deleted", lambda p: (p / "cache.json").unlink(), [], None, True),
    ("pairs in the wrong shard", _wrong_pairs, [1], "belong to other shards", True),
    ("duplicate pairs", _duplicates, [2], "2 duplicate pairs", True),
    ("two shards", lambda p: (_truncate(p), _flip(p)), [1, 2], "checksum differs", False),
]


def test_healthy_cache_verifies(clean):
    """A clean cache: exit 0, a one-line summary, every shard and pair counted."""
    result = run("cache", "verify", clean["path"])
    assert result.exit_code == 0, result.output
    assert "healthy" in result.stdout and f"{sum(clean['rows'].values())} pairs" in result.stdout
    code, report = verify(clean["path"])
    assert code == 0 and report["healthy"] and report["shards_ok"] == SHARDS
    assert report["damaged"] == {} and report["manifest"] == [] and report["key_problems"] == []


@pytest.mark.parametrize("name,damage,bad,fragment,manifest", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_is_found_and_repaired(clean, entry, name, damage, bad, fragment, manifest):
    """Each damage: named per shard, exit 1; --repair re-scores only those shards, identically."""
    damage(entry)
    names = [cache.shard_name(s) for s in bad]
    code, report = verify(entry)
    assert code == 1 and not report["healthy"]
    assert sorted(report["damaged"]) == names
    for n in names:
        assert fragment in report["damaged"][n]
    assert bool(report["manifest"]) == manifest
    if name == "manifest edited":
        assert any("shard-00003" in line for line in report["manifest"])
    text = run("cache", "verify", entry)
    for n in names:
        assert any(line.startswith(f"{n}: ") for line in text.stdout.splitlines())
    what = f"{len(bad)} of {SHARDS} shards damaged" if bad else "manifest"
    assert_error(text, what, "--repair")

    result = run("cache", "verify", entry, "--repair", "--candidates", clean["cand"], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["repaired_shards"] == names
    assert summary["pairs_scored"] == sum(clean["rows"][s] for s in bad)
    assert summary["after"]["healthy"] and summary["manifest_rewritten"]
    assert scores(entry).equals(clean["scores"])
    assert verify(entry)[0] == 0


def test_incomplete_cache_is_finished_by_repair(clean, entry):
    """Shards never scored (a run stopped early) are reported and scored by --repair."""
    for s in (0, 2):
        cache.discard_shard(entry, s)
    assert not (entry / "cache.json").exists()  # discarding a shard removes the manifest first
    code, report = verify(entry)
    assert code == 1 and sorted(report["damaged"]) == ["shard-00000", "shard-00002"]
    assert "not scored yet" in report["damaged"]["shard-00000"]
    code, summary = verify(entry, "--repair", "--candidates", clean["cand"])
    assert code == 0 and summary["pairs_scored"] == clean["rows"][0] + clean["rows"][2]
    assert scores(entry).equals(clean["scores"])


def test_repair_refuses_other_inputs(clean, entry, demo_dataset_master, tiny_teacher_dir, tmp_path):
    """Candidates of another dataset, another teacher, or none: a clear error, nothing deleted."""
    _truncate(entry)
    before = sorted(p.name for p in entry.iterdir())
    assert_error(run("cache", "verify", entry, "--repair"), "--candidates", "1 shards")
    other = tmp_path / "other-cand"
    assert (
        run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            demo_dataset_master,
            "--out",
            other,
            "--k",
            2,
        ).exit_code
        == 0
    )
    assert_error(
        run("cache", "verify", entry, "--repair", "--candidates", other),
        "--candidates",
        "belong to another cache",
    )
    from transformers import BlipForImageTextRetrieval

    teacher = tmp_path / "other-teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    model = BlipForImageTextRetrieval.from_pretrained(teacher)
    with torch.no_grad():
        model.itm_head.bias.add_(1.0)
    model.save_pretrained(teacher)
    assert_error(
        run(
            "cache",
            "verify",
            entry,
            "--repair",
            "--candidates",
            clean["cand"],
            "--teacher",
            teacher,
        ),
        "--teacher",
        "belongs to another cache",
    )
    assert sorted(p.name for p in entry.iterdir()) == before
    assert_error(run("cache", "verify", entry, "--teacher", teacher), "only goes with --repair")
    assert_error(run("cache", "verify", entry, "--data", tmp_path), "only goes with --candidates")


def test_repair_warns_about_pairs_of_other_candidates(clean, entry, small_dataset, tmp_path):
    """A shard holding pairs of two candidate sets, repaired from one: the loss is reported."""
    more = tmp_path / "k5"
    assert (
        run(
            "mine-candidates", "--student", "tiny", "--data", small_dataset, "--out", more, "--k", 5
        ).exit_code
        == 0
    )
    teacher = json.loads((entry / "key.json").read_text())["teacher"]["spec"]
    extra = run(
        "score-teacher",
        "--candidates",
        more,
        "--teacher",
        teacher,
        "--cache-dir",
        entry.parent,
        "--shards",
        SHARDS,
    )
    assert extra.exit_code == 0, extra.output
    _truncate(entry)
    result = run("cache", "verify", entry, "--repair", "--candidates", clean["cand"])
    assert result.exit_code == 0, result.output
    assert "warning: shard-00001 held" in result.stderr and "no longer cached" in result.stderr


def test_edited_key_cannot_be_repaired(clean, entry):
    """A key.json whose fields no longer hash to its key: reported, and --repair refuses."""
    meta = json.loads((entry / "key.json").read_text())
    meta["precision"] = "fp16"
    (entry / "key.json").write_text(json.dumps(meta))
    code, report = verify(entry)
    assert code == 1 and "do not hash to its key" in report["key_problems"][0]
    assert_error(
        run("cache", "verify", entry, "--repair", "--candidates", clean["cand"]),
        "cannot be repaired",
        "score-teacher",
    )


def test_coverage_against_candidates(clean, entry, small_dataset, tmp_path):
    """--candidates: every pair score-teacher scores for them must be cached (positives too);
    a larger re-mine is reported as missing pairs with the command that scores them."""
    code, report = verify(entry, "--candidates", clean["cand"])
    assert code == 0 and report["healthy"]
    assert report["coverage"]["missing"] == report["coverage"]["positives_missing"] == 0
    assert report["coverage"]["pairs"] == clean["scores"].height

    more = tmp_path / "k5"
    assert (
        run(
            "mine-candidates", "--student", "tiny", "--data", small_dataset, "--out", more, "--k", 5
        ).exit_code
        == 0
    )
    code, report = verify(entry, "--candidates", more)
    assert code == 1 and not report["healthy"] and report["coverage"]["missing"] > 0
    assert report["damaged"] == {} and report["manifest"] == []
    line = assert_error(
        run("cache", "verify", entry, "--candidates", more), "pairs of --candidates"
    )
    assert f"score-teacher --candidates {more} --cache-dir {entry.parent}" in line

    # One positive (a pair the miner may not retrieve) dropped from its shard: found, by name.
    pos = clean["scores"].join(
        cache.read_shard(entry, 0), on=["image_id", "caption_id"], how="semi"
    )
    ds_captions = pl.read_parquet(small_dataset / "captions.parquet")
    pos = pos.join(ds_captions.select("image_id", "caption_id"), on=["image_id", "caption_id"])
    drop = pos.head(1).select("image_id", "caption_id")
    rows = cache.read_shard(entry, 0).join(drop, on=["image_id", "caption_id"], how="anti")
    cache.write_shard(entry, 0, rows)
    assert cache.finalize(entry) is not None  # the shards are consistent: only coverage fails
    code, report = verify(entry, "--candidates", clean["cand"])
    assert code == 1 and report["coverage"] == {
        "candidates": str(clean["cand"]),
        "pairs": clean["scores"].height,
        "missing": 1,
        "positives_missing": 1,
    }
    assert cache.finalize(entry, clean["scores"]) is None  # and a manifest needs every pair
