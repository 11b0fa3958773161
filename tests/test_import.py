"""Importing Karpathy JSON and flat tables into the dataset layout, and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import FLICKR8K, assert_error, require_fixture, run, write_image

from pipeline.core.dataset import Dataset


def import_karpathy(karpathy, out: Path, *extra: str):
    json_path, root = karpathy
    return run("import-data", "--karpathy", json_path, "--images", root, "--out", out, *extra)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_karpathy_import_layout(karpathy, tmp_path):
    """A Karpathy JSON imports with stable ids, restval as train, captions verbatim."""
    out = tmp_path / "ds"
    result = import_karpathy(karpathy, out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_images"] == 6 and summary["counts"]["train"]["images"] == 3

    ds = Dataset.load(out)
    doc = json.loads(karpathy[0].read_text())
    assert ds.images["image_id"].to_list() == list(range(6))
    assert ds.images["split"].to_list() == ["train", "train", "train", "val", "test", "test"]
    expected = [s["raw"] for e in doc["images"] for s in e["sentences"]]
    assert ds.captions["caption"].to_list() == expected  # unicode and trailing space kept
    assert ds.captions["caption_id"].to_list() == list(range(len(expected)))
    owners = [i for i, e in enumerate(doc["images"]) for _ in e["sentences"]]
    assert ds.captions["image_id"].to_list() == owners
    for path in ds.images["path"]:
        assert ds.image_path(path).is_file()
    assert ds.meta["counts"]["test"] == {"images": 2, "captions": 5}


def test_fingerprint_tracks_content_not_location(karpathy, tmp_path):
    """Same content elsewhere keeps the fingerprint; one changed caption or pixel changes it."""
    json_path, root = karpathy
    assert import_karpathy(karpathy, tmp_path / "a").exit_code == 0
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert import_karpathy((json_path, moved), tmp_path / "b").exit_code == 0
    fp = Dataset.load(tmp_path / "a").fingerprint
    assert Dataset.load(tmp_path / "b").fingerprint == fp

    doc = json.loads(json_path.read_text())
    doc["images"][2]["sentences"][0]["raw"] += "!"
    json_path.write_text(json.dumps(doc))
    assert import_karpathy(karpathy, tmp_path / "c").exit_code == 0
    assert Dataset.load(tmp_path / "c").fingerprint != fp

    write_image(moved / "im2.jpg", (1, 2, 3))
    assert import_karpathy((json_path, moved), tmp_path / "d").exit_code == 0
    assert Dataset.load(tmp_path / "d").fingerprint not in (
        fp,
        Dataset.load(tmp_path / "c").fingerprint,
    )


def test_missing_fixture_fails_under_ci(tmp_path, monkeypatch):
    """A missing shared fixture skips a test on a plain clone, but fails it where
    CPRD_REQUIRE_FIXTURES=1 (.ci/run exports it), so CI cannot pass without running it."""
    missing = tmp_path / "no-such-fixture"
    monkeypatch.delenv("CPRD_REQUIRE_FIXTURES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent"):
        require_fixture(missing)
    monkeypatch.setenv("CPRD_REQUIRE_FIXTURES", "1")
    with pytest.raises(pytest.fail.Exception, match="CPRD_REQUIRE_FIXTURES=1 requires it"):
        require_fixture(missing)
    require_fixture(tmp_path)  # present: neither
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "export CPRD_REQUIRE_FIXTURES=1" in ci


def test_real_flickr8k_imports(tmp_path):
    """The shared Flickr8k fixture (no `filepath` entries) imports with 3,000 images."""
    src = FLICKR8K
    require_fixture(src / "dataset_flickr8k.json")
    result = run(
        "import-data",
        "--karpathy",
        src / "dataset_flickr8k.json",
        "--images",
        src / "images",
        "--out",
        tmp_path / "f8k",
        "--json",
    )
    assert result.exit_code == 0, result.output
    info = Dataset.load(tmp_path / "f8k").info()
    assert info["counts"]["train"] == {"images": 2000, "captions": 10000}
    assert info["captions_per_image"] == {"min": 5, "mean": 5.0, "max": 5}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_table_import(tmp_path, fmt):
    """A flat table imports: rows grouped per image in first-appearance order, splits kept."""
    for name in ("a.jpg", "b.png", "c.jpg"):
        write_image(
            tmp_path / "img" / name, (200, 10, 10), fmt="PNG" if name.endswith("png") else "JPEG"
        )
    rows = pl.DataFrame(
        {
            "path": ["img/b.png", "img/a.jpg", "img/b.png", "img/c.jpg"],
            "text": ["b one, with comma", "a one", 'b two "quoted"', "c one"],
            "split": ["train", "val", "train", "restval"],
        }
    )
    table = tmp_path / f"pairs.{fmt}"
    {"csv": rows.write_csv, "jsonl": rows.write_ndjson, "parquet": rows.write_parquet}[fmt](table)
    out = tmp_path / "ds"
    result = run(
        "import-data",
        f"--{fmt}",
        table,
        "--image-col",
        "path",
        "--caption-col",
        "text",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    ds = Dataset.load(out)
    assert [Path(p).name for p in ds.images["path"]] == ["b.png", "a.jpg", "c.jpg"]
    assert ds.images["split"].to_list() == ["train", "val", "train"]
    assert ds.captions["caption"].to_list() == [
        "b one, with comma",
        'b two "quoted"',
        "a one",
        "c one",
    ]
    assert ds.captions["image_id"].to_list() == [0, 0, 1, 2]


def test_table_without_split_column_uses_default(tmp_path):
    """Without a split column every row goes to --default-split; --images roots relative paths."""
    write_image(tmp_path / "elsewhere" / "x.jpg", (0, 0, 0))
    (tmp_path / "t.csv").write_text("image,caption\nx.jpg,a black image\nx.jpg,dark\n")
    out = tmp_path / "ds"
    result = run(
        "import-data",
        "--csv",
        tmp_path / "t.csv",
        "--images",
        tmp_path / "elsewhere",
        "--default-split",
        "test",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert Dataset.load(out).meta["counts"]["test"] == {"images": 1, "captions": 2}


def test_skip_bad_images(karpathy, tmp_path):
    """--skip-bad-images drops missing/corrupt images and their captions with a warning."""
    json_path, root = karpathy
    (root / "sub" / "im1.jpg").unlink()
    data = (root / "im2.jpg").read_bytes()
    (root / "im2.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    out = tmp_path / "ds"
    result = import_karpathy(karpathy, out, "--skip-bad-images")
    assert result.exit_code == 0, result.output
    assert "skipping 2 bad images" in result.stderr
    ds = Dataset.load(out)
    assert ds.images.height == 4 and ds.images["image_id"].to_list() == [0, 1, 2, 3]
    assert not any("picture 1 " in c or "picture 2 " in c for c in ds.captions["caption"])
    assert ds.meta["source"]["skipped_images"] == 2


def test_overwrite(karpathy, tmp_path):
    """An existing --out is refused without --overwrite and replaced with it."""
    out = tmp_path / "ds"
    assert import_karpathy(karpathy, out).exit_code == 0
    assert_error(import_karpathy(karpathy, out), str(out), "--overwrite")
    assert import_karpathy(karpathy, out, "--overwrite").exit_code == 0
    assert Dataset.load(out).images.height == 6
    assert leftovers(tmp_path) == []


def _mutate_json(karpathy, fn):
    json_path, _ = karpathy
    doc = json.loads(json_path.read_text())
    fn(doc)
    json_path.write_text(json.dumps(doc))


BAD_KARPATHY = [
    (
        "missing image",
        lambda k: (k[1] / "im0.png").unlink(),
        ["1 of 6 images", "im0.png (missing)", "--skip-bad-images"],
    ),
    (
        "corrupt image",
        lambda k: (k[1] / "im0.png").write_bytes(b"not a png"),
        ["im0.png (cannot decode", "--skip-bad-images"],
    ),
    ("bad json", lambda k: k[0].write_text('{"images": [}'), ["not valid JSON", "line 1"]),
    ("no images list", lambda k: k[0].write_text('{"foo": 1}'), ["no 'images' list", "Karpathy"]),
    (
        "no filename",
        lambda k: _mutate_json(k, lambda d: d["images"][3].pop("filename")),
        ["entry 3", "'filename'"],
    ),
    (
        "bad split",
        lambda k: _mutate_json(k, lambda d: d["images"][1].update(split="dev")),
        ["entry 1", "'dev'", "restval"],
    ),
    (
        "bad sentences",
        lambda k: _mutate_json(k, lambda d: d["images"][0].update(sentences="x")),
        ["entry 0", "'sentences'"],
    ),
    ("empty dataset", lambda k: k[0].write_text('{"images": []}'), ["no images"]),
    (
        "no captions",
        lambda k: _mutate_json(k, lambda d: d["images"][4].update(sentences=[])),
        ["1 images have no captions", "im4.jpg"],
    ),
    (
        "empty caption",
        lambda k: _mutate_json(k, lambda d: d["images"][5]["sentences"][0].update(raw="  ")),
        ["empty caption", "im5.jpg"],
    ),
    (
        "duplicate image",
        lambda k: _mutate_json(k, lambda d: d["images"].append(d["images"][0])),
        ["appear more than once", "im0.png"],
    ),
]


@pytest.mark.parametrize("name,break_it,fragments", BAD_KARPATHY, ids=[b[0] for b in BAD_KARPATHY])
def test_bad_karpathy_input(karpathy, tmp_path, name, break_it, fragments):
    """Each bad Karpathy input: exit 1, one Error line naming it, nothing written."""
    break_it(karpathy)
    out = tmp_path / "out" / "ds"
    assert_error(import_karpathy(karpathy, out), *fragments)
    assert not out.exists()
    assert not (out.parent.exists() and leftovers(out.parent))


def test_bad_command_lines(karpathy, tmp_path):
    """Missing inputs, two inputs, a missing --images, missing files: one clear error each."""
    json_path, root = karpathy
    out = tmp_path / "ds"
    assert_error(run("import-data", "--out", out), "exactly one input")
    assert_error(
        run("import-data", "--karpathy", json_path, "--csv", json_path, "--out", out),
        "exactly one input",
    )
    assert_error(run("import-data", "--karpathy", json_path, "--out", out), "--images")
    assert_error(
        run("import-data", "--karpathy", tmp_path / "nope.json", "--images", root, "--out", out),
        "--karpathy file",
        "nope.json",
        "does not exist",
    )
    assert_error(
        run("import-data", "--karpathy", json_path, "--images", tmp_path / "nodir", "--out", out),
        "--images directory",
        "nodir",
    )
    assert not out.exists()


BAD_TABLES = [
    (
        "missing column",
        "image,text\na.jpg,x\n",
        [],
        ["no column 'caption'", "--caption-col", "['image', 'text']"],
    ),
    (
        "missing split col",
        "image,caption\na.jpg,x\n",
        ["--split-col", "part"],
        ["no column 'part'", "--split-col"],
    ),
    (
        "bad split",
        "image,caption,split\na.jpg,x,holdout\n",
        [],
        ["unknown split values", "holdout"],
    ),
    ("empty cell", "image,caption\na.jpg,x\n,y\n", [], ["empty cells", "rows 2"]),
    (
        "split conflict",
        "image,caption,split\na.jpg,x,train\na.jpg,y,test\n",
        [],
        ["more than one split", "a.jpg"],
    ),
    ("empty table", "image,caption\n", [], ["no images"]),
    (
        "bad default split",
        "image,caption\na.jpg,x\n",
        ["--default-split", "dev"],
        ["--default-split", "dev"],
    ),
]


@pytest.mark.parametrize("name,text,extra,fragments", BAD_TABLES, ids=[b[0] for b in BAD_TABLES])
def test_bad_table_input(tmp_path, name, text, extra, fragments):
    """Each bad table: exit 1, one Error line naming the problem, nothing written."""
    write_image(tmp_path / "a.jpg", (9, 9, 9))
    (tmp_path / "t.csv").write_text(text)
    out = tmp_path / "ds"
    assert_error(run("import-data", "--csv", tmp_path / "t.csv", "--out", out, *extra), *fragments)
    assert not out.exists() and leftovers(tmp_path) == []


def test_unreadable_parquet(tmp_path):
    """A file that is not Parquet is refused naming the flag and file."""
    (tmp_path / "t.parquet").write_bytes(b"PAR1 garbage")
    assert_error(
        run("import-data", "--parquet", tmp_path / "t.parquet", "--out", tmp_path / "o"),
        "cannot read --parquet file",
        "t.parquet",
    )


def test_data_info(karpathy, tmp_path):
    """data-info prints counts per split and the fingerprint; --json matches the manifest."""
    out = tmp_path / "ds"
    assert import_karpathy(karpathy, out).exit_code == 0
    text = run("data-info", out)
    assert text.exit_code == 0 and "train" in text.output
    assert Dataset.load(out).fingerprint in text.output
    info = json.loads(run("data-info", out, "--json").stdout)
    assert info["counts"]["val"] == {"images": 1, "captions": 3}
    assert info["captions_per_image"] == {"min": 2, "mean": 2.5, "max": 3}


def test_load_rejects_non_datasets(karpathy, tmp_path):
    """data-info on a missing dir, a non-dataset dir, or a damaged dataset: one clear error."""
    assert_error(run("data-info", tmp_path / "none"), "does not exist", "cprd import-data")
    (tmp_path / "plain").mkdir()
    assert_error(run("data-info", tmp_path / "plain"), "not a cprd dataset", "dataset.json")
    out = tmp_path / "ds"
    assert import_karpathy(karpathy, out).exit_code == 0
    (out / "captions.parquet").write_bytes(b"junk")
    assert_error(run("data-info", out), "captions.parquet", "unreadable")
    (out / "captions.parquet").unlink()
    assert_error(run("data-info", out), "captions.parquet", "missing")
