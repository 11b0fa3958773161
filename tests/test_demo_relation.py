"""Generator version 3 and the full caption-image relation: truth, contract, fingerprint, FNR."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from pipeline.core.dataset import Dataset, fingerprint
from pipeline.core.relation import check_relation, false_negative_rate, relation_rows
from pipeline.stages.demo_data import COLOURS, GROUP_SIZE, SHAPES, generate_demo_data
from tests.conftest import run

SMALL = {"train_images": 8, "val_images": 4, "test_images": 4, "image_size": 32, "progress": False}


def _tree_sha(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _facts(caption: str) -> tuple[str, tuple]:
    """Parse any caption into (kind, facts) by its words alone: the naive reference's reading."""
    words = re.findall(r"[a-z]+", caption)
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    axis = (
        "horizontal"
        if {"left", "right"} & set(words)
        else "vertical"
        if {"above", "top", "over"} & set(words)
        else None
    )
    if "another" in words:
        return "single", ((colours[0], shapes[0]),)
    if axis is None:
        return "objects", ((colours[0], shapes[0]), (colours[1], shapes[1]))
    if not colours:
        return "shapes", (axis, shapes[0], shapes[1])
    if not shapes:
        return "colours", (axis, colours[0], colours[1])
    return "full", (axis, (colours[0], shapes[0]), (colours[1], shapes[1]))


def _true_of(caption: str, scene: tuple) -> bool:
    """Whether ``caption`` is true of ``scene`` = (axis, first object, second object)."""
    kind, f = _facts(caption)
    axis, first, second = scene
    if kind == "single":
        return f[0] in (first, second)
    if kind == "objects":
        return set(f) == {first, second}
    if kind == "shapes":
        return f == (axis, first[1], second[1])
    if kind == "colours":
        return f == (axis, first[0], second[0])
    return f == scene


def test_version_2_is_reproduced_byte_for_byte(tmp_path: Path) -> None:
    """--generator-version 2 writes exactly the files the version-2 generator wrote."""
    meta = generate_demo_data(tmp_path / "d", version=2, **SMALL)
    # Digests taken from the version-2 generator (commit 6b23baa) with these arguments.
    assert meta["fingerprint"] == (
        "c045c222cd4c95828899800b846f8926e2d5fecc0aff9fe96268ebe512b40c65"
    )
    assert _tree_sha(tmp_path / "d") == (
        "921697b536abc3ee58828ea737f11da7f72f92495b63f8eab90fcfe1540a886c"
    )
    assert Dataset.load(tmp_path / "d").relation is None


def test_relation_is_the_truth_of_every_caption(tmp_path: Path) -> None:
    """The relation holds exactly the (image, caption) pairs of a split whose caption is true of
    the picture's scene (read from its first, full caption), labelled pairs included; many
    captions fit several images, and repeated scenes make some full captions fit two."""
    generate_demo_data(
        tmp_path / "d", train_images=160, val_images=8, test_images=40, image_size=32,
        progress=False,
    )  # fmt: skip
    ds = Dataset.load(tmp_path / "d")
    assert ds.relation is not None
    assert ds.meta["source"]["generator_version"] == 3
    got = set(ds.relation.select("image_id", "caption_id").iter_rows())
    want = set()
    for split in ("train", "val", "test"):
        images, captions = ds.split(split)
        first = captions.group_by("image_id", maintain_order=True).first()
        scene = {i: _facts(c)[1] for i, c in first.select("image_id", "caption").iter_rows()}
        for caption_id, text in captions.select("caption_id", "caption").iter_rows():
            want |= {(i, caption_id) for i in images["image_id"] if _true_of(text, scene[i])}
    assert got == want
    labelled = set(ds.captions.select("image_id", "caption_id").iter_rows())
    assert labelled <= got
    per_caption = Counter(c for _, c in got)
    kinds = {c: _facts(t)[0] for c, t in ds.captions.select("caption_id", "caption").iter_rows()}
    assert sum(n > 1 for n in per_caption.values()) / len(per_caption) > 0.3
    assert any(n > 1 for c, n in per_caption.items() if kinds[c] == "full")  # a repeated scene
    assert {kinds[c] for c, n in per_caption.items() if n > 1} >= {"shapes", "single"}
    assert ds.meta["relation"]["pairs"] == len(got)


def test_version_3_keeps_contrast_groups_in_full_captions(tmp_path: Path) -> None:
    """Slots 0-2 (full) of a group's 4 members share their bag of words; a full caption never
    fits a sibling, while slots 3-4 (under-specified) fit more than their own image."""
    generate_demo_data(tmp_path / "d", **{**SMALL, "train_images": 16})
    ds = Dataset.load(tmp_path / "d")
    images, captions = ds.split("train")
    fits = ds.relation.group_by("caption_id").agg("image_id")
    fits = dict(zip(fits["caption_id"], fits["image_id"].to_list(), strict=True))
    per_image = captions.group_by("image_id", maintain_order=True).agg("caption_id", "caption")
    ids, texts = per_image["caption_id"].to_list(), per_image["caption"].to_list()
    under_fits = 0
    for g in range(0, len(ids), GROUP_SIZE):
        group = list(range(g, g + GROUP_SIZE))
        for slot in range(3):
            bags = [Counter(re.findall(r"[a-z]+", texts[m][slot])) for m in group]
            assert all(b == bags[0] for b in bags)
            siblings = set(images["image_id"][g : g + GROUP_SIZE])
            for m in group:
                assert set(fits[ids[m][slot]]) & siblings == {images["image_id"][m]}
        under_fits += sum(len(fits[ids[m][slot]]) > 1 for m in group for slot in (3, 4))
    assert under_fits > 0


def test_fingerprint_covers_the_relation(tmp_path: Path) -> None:
    """One pair more or less in the relation changes the fingerprint; no relation keeps the old
    formula; a relation table that disagrees with dataset.json is refused on load."""
    generate_demo_data(tmp_path / "d", **SMALL)
    ds = Dataset.load(tmp_path / "d")
    rel = ds.relation
    assert fingerprint(ds.images, ds.captions, rel) == ds.fingerprint
    assert fingerprint(ds.images, ds.captions, rel.head(rel.height - 1)) != ds.fingerprint
    assert fingerprint(ds.images, ds.captions) != ds.fingerprint
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    meta["relation"]["pairs"] += 1
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="relation pairs, the table holds"):
        Dataset.load(tmp_path / "d")


def test_check_relation_refuses_bad_pairs(tmp_path: Path) -> None:
    """Unknown ids, pairs across splits and a dropped labelled pair are errors naming the fix."""
    generate_demo_data(tmp_path / "d", **SMALL)
    ds = Dataset.load(tmp_path / "d")
    rel = ds.relation
    with pytest.raises(ValueError, match="name ids that do not exist"):
        check_relation(ds.images, ds.captions, pl.concat([rel, pl.DataFrame(
            {"image_id": [999], "caption_id": [0]})]))  # fmt: skip
    test_image = int(ds.split("test")[0]["image_id"][0])
    with pytest.raises(ValueError, match="different splits"):
        check_relation(ds.images, ds.captions, pl.concat([rel, pl.DataFrame(
            {"image_id": [test_image], "caption_id": [0]})]))  # fmt: skip
    first = ds.captions.row(0, named=True)
    dropped = rel.filter(~((pl.col("image_id") == first["image_id"]) & (pl.col("caption_id") == 0)))
    with pytest.raises(ValueError, match="misses 1 labelled pairs"):
        check_relation(ds.images, ds.captions, dropped)


def test_relation_rows_index_the_split(tmp_path: Path) -> None:
    """relation_rows gives split-local rows that map back to the relation's ids."""
    generate_demo_data(tmp_path / "d", **SMALL)
    ds = Dataset.load(tmp_path / "d")
    images, captions = ds.split("test")
    i_rows, c_rows = relation_rows(ds.relation, images, captions)
    back = set(
        zip(images["image_id"].gather(i_rows), captions["caption_id"].gather(c_rows), strict=True)
    )
    in_split = ds.relation.filter(pl.col("caption_id").is_in(captions["caption_id"].implode()))
    assert back == set(in_split.iter_rows())


def test_false_negative_rate_against_a_loop() -> None:
    """The rate counts non-positive candidates whose pair is in the relation, per direction."""
    cand = pl.DataFrame(
        {
            "direction": ["i2t", "i2t", "i2t", "t2i", "t2i", "t2i"],
            "query_id": [0, 0, 0, 5, 5, 6],  # images (i2t) / captions (t2i)
            "candidate_id": [5, 6, 7, 0, 1, 1],
            "is_positive": [True, False, False, True, False, False],
        }
    )
    relation = pl.DataFrame({"image_id": [0, 0, 1, 1], "caption_id": [5, 6, 5, 6]})
    got = false_negative_rate(cand, relation)
    # i2t negatives: (0, 6) true, (0, 7) false; t2i: (1, 5) true, (1, 6) true.
    assert got == {"i2t": 0.5, "t2i": 1.0, "all": 0.75, "negatives": 4, "false_negatives": 3}


def test_cli_demo_data_versions(tmp_path: Path) -> None:
    """`cprd demo-data` writes the relation by default and none with --generator-version 2."""
    args = ["--train-images", 8, "--val-images", 4, "--test-images", 4, "--image-size", 32]
    new = run("demo-data", "--out", tmp_path / "v3", *args, "--json")
    assert new.exit_code == 0, new.output
    summary = json.loads(new.stdout.strip().splitlines()[-1])
    assert summary["relation"]["pairs"] > 16 * 5
    assert (tmp_path / "v3" / "relation.parquet").is_file()
    old = run("demo-data", "--out", tmp_path / "v2", *args, "--generator-version", 2)
    assert old.exit_code == 0, old.output
    assert not (tmp_path / "v2" / "relation.parquet").exists()
    bad = run("demo-data", "--out", tmp_path / "v9", *args, "--generator-version", 9)
    assert bad.exit_code == 1 and "--generator-version" in bad.stderr


def test_cli_evaluate_reports_both_label_sets(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    """`cprd evaluate --json` on data with a relation adds metrics_full and rsum_full (also for
    the teacher's re-ranking) and prints a [full relation] row; without one, neither."""
    args = ["--train-images", 4, "--val-images", 4, "--test-images", 12, "--image-size", 32]
    for version in (3, 2):
        made = run("demo-data", "--out", tmp_path / f"v{version}", *args,
                   "--generator-version", version)  # fmt: skip
        assert made.exit_code == 0, made.output
    res = run("evaluate", "--student", "tiny", "--data", tmp_path / "v3", "--rerank-teacher", tiny_teacher_dir,
              "--rerank-k", 4, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    full = out["metrics_full"]
    assert (
        out["rsum_full"]
        == full["rsum"]
        == pytest.approx(sum(v for k, v in full.items() if k != "rsum"))
    )
    # Any true match counts, so no recall on the relation is below the labelled one.
    assert all(full[k] >= out[k] for k in full)
    assert out["rerank_full"]["rsum"] >= out["rerank"]["rsum"]
    names = [r["name"] for r in out["rows"]]
    assert names == ["dual-encoder", "dual-encoder [full relation]", "teacher-rerank@4",
                     "teacher-rerank@4 [full relation]"]  # fmt: skip
    printed = run("evaluate", "--student", "tiny", "--data", tmp_path / "v3")
    assert printed.exit_code == 0 and "dual-encoder [full relation]" in printed.stdout
    old = run("evaluate", "--student", "tiny", "--data", tmp_path / "v2", "--json")
    assert old.exit_code == 0, old.output
    summary = json.loads(old.stdout.strip().splitlines()[-1])
    assert "rsum_full" not in summary and len(summary["rows"]) == 1


def test_cli_mine_candidates_reports_false_negatives(tmp_path: Path) -> None:
    """mine-candidates on data with a relation states the share of mined negatives that are true
    matches, equal to the rate recomputed from the candidates file; on labels-only data, None."""
    from pipeline.core.candidates import load_candidates

    args = ["--train-images", 16, "--val-images", 4, "--test-images", 4, "--image-size", 32]
    assert run("demo-data", "--out", tmp_path / "d", *args).exit_code == 0
    res = run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        tmp_path / "d",
        "--out",
        tmp_path / "c",
        "--k",
        6,
    )
    assert res.exit_code == 0, res.output
    assert "false negatives (true matches among mined non-positives" in res.stdout
    manifest, cand = load_candidates(tmp_path / "c")
    want = false_negative_rate(cand, Dataset.load(tmp_path / "d").relation)
    assert manifest["false_negatives"] == want and want["false_negatives"] > 0
    assert (
        run("demo-data", "--out", tmp_path / "d2", *args, "--generator-version", 2).exit_code == 0
    )
    res = run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        tmp_path / "d2",
        "--out",
        tmp_path / "c2",
        "--json",
    )
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[-1])["false_negatives"] is None
