"""The embedded benchmark generator: determinism, counts, contrast groups, pictures that match."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.dataset import Dataset
from pipeline.stages import demo_data
from pipeline.stages.demo_data import COLOURS, GROUP_SIZE, generate_demo_data

SMALL = {"train_images": 8, "val_images": 4, "test_images": 4, "progress": False}
# Template 0 of each axis: "a <colour> <shape> to the left of / above a <colour> <shape>".
CANONICAL = re.compile(r"^a (\w+) (\w+) (to the left of|above) a (\w+) (\w+)$")


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root, keyed by its path relative to root."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _captions_by_image(ds: Dataset, split: str) -> list[list[str]]:
    """Captions of each image of a split, in image id order, each in caption id order."""
    images, captions = ds.split(split)
    grouped = captions.group_by("image_id", maintain_order=True).agg("caption")
    by_id = dict(zip(grouped["image_id"], grouped["caption"].to_list(), strict=True))
    return [by_id[i] for i in images["image_id"]]


def _as_template_0(caption: str) -> str:
    """A full caption (any template) rewritten as template 0, from its words in order."""
    words = re.findall(r"[a-z]+", caption)
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in demo_data.SHAPES]
    relation = "to the left of" if {"left", "right"} & set(words) else "above"
    return f"a {colours[0]} {shapes[0]} {relation} a {colours[1]} {shapes[1]}"


def _colour_centroid(pixels: np.ndarray, colour: str) -> tuple[float, float] | None:
    """(x, y) mean of the pixels within 20 of a named colour on every channel, or None."""
    near = (np.abs(pixels - np.array(COLOURS[colour])).max(axis=-1) <= 20).nonzero()
    return (float(near[1].mean()), float(near[0].mean())) if near[0].size else None


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    """The same arguments give byte-identical files; another seed gives other bytes."""
    generate_demo_data(tmp_path / "a", image_size=32, **SMALL)
    generate_demo_data(tmp_path / "b", image_size=32, **SMALL)
    generate_demo_data(tmp_path / "c", image_size=32, seed=1, **SMALL)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith((".png", ".parquet", ".json")))


def test_counts_match_arguments(tmp_path: Path) -> None:
    """Each split holds the asked number of images and every image the asked number of captions."""
    meta = generate_demo_data(
        tmp_path / "d",
        train_images=10,
        val_images=5,
        test_images=3,
        captions_per_image=3,
        image_size=32,
        progress=False,
    )
    ds = Dataset.load(tmp_path / "d")
    assert ds.fingerprint == meta["fingerprint"]
    assert meta["counts"] == {
        "train": {"images": 10, "captions": 30},
        "val": {"images": 5, "captions": 15},
        "test": {"images": 3, "captions": 9},
    }
    assert ds.info()["captions_per_image"] == {"min": 3, "mean": 3.0, "max": 3}
    assert ds.meta["source"]["kind"] == "demo-data"
    assert ds.images["path"][0] == "images/train/000000.png"


def test_contrast_groups_share_words_not_captions(tmp_path: Path) -> None:
    """Images 4g..4g+3 of a split share each caption slot's bag of words, yet no caption or image
    (version 2, where every caption fits one image; version 3 in test_demo_relation.py)."""
    generate_demo_data(
        tmp_path / "d",
        train_images=14,
        val_images=4,
        test_images=4,
        image_size=32,
        progress=False,
        version=2,
    )
    ds = Dataset.load(tmp_path / "d")
    for split in ("train", "val", "test"):
        images, _ = ds.split(split)
        per_image = _captions_by_image(ds, split)
        for start in range(0, len(per_image), GROUP_SIZE):
            group = per_image[start : start + GROUP_SIZE]
            for slot in range(len(group[0])):
                bags = [Counter(re.findall(r"[a-z]+", caps[slot])) for caps in group]
                assert all(bag == bags[0] for bag in bags), [caps[slot] for caps in group]
            texts = [c for caps in group for c in caps]
            assert len(set(texts)) == len(texts), group
            assert images["sha256"][start : start + GROUP_SIZE].n_unique() == len(group)


@pytest.mark.parametrize("version", [2, 3])
def test_pictures_match_captions(tmp_path: Path, version: int) -> None:
    """Images are RGB of the asked size and show both named colours in the named order."""
    generate_demo_data(
        tmp_path / "d",
        train_images=24,
        val_images=4,
        test_images=4,
        captions_per_image=5,
        image_size=64,
        progress=False,
        version=version,
    )
    ds = Dataset.load(tmp_path / "d")
    relations = set()
    for split in ("train", "val", "test"):
        images, _ = ds.split(split)
        for path, caps in zip(images["path"], _captions_by_image(ds, split), strict=True):
            with Image.open(ds.image_path(path)) as img:
                assert (img.mode, img.size) == ("RGB", (64, 64))
                pixels = np.asarray(img).astype(int)
            if version == 3:  # 3 full templates of 5: put template 0 back from the first one
                full = [c for c in caps[:3] if not CANONICAL.match(c)]
                caps = [_as_template_0(caps[0]), *full]
            (match,) = [m for m in map(CANONICAL.match, caps) if m]  # all 5 templates present
            first_colour, _, relation, second_colour, _ = match.groups()
            for caption in caps:  # every template names the first (left / top) object first
                assert caption.index(first_colour) < caption.index(second_colour), caption
            first = _colour_centroid(pixels, first_colour)
            second = _colour_centroid(pixels, second_colour)
            assert first and second, (path, match.string)
            axis = 0 if relation == "to the left of" else 1
            assert first[axis] < second[axis], (path, match.string, first, second)
            relations.add(relation)
    assert relations == {"to the left of", "above"}  # both axes were exercised


@pytest.mark.parametrize(
    ("option", "value", "flag"),
    [
        ("train_images", 0, "--train-images"),
        ("val_images", 0, "--val-images"),
        ("test_images", -1, "--test-images"),
        ("captions_per_image", 0, "--captions-per-image"),
        ("image_size", 16, "--image-size"),
        ("seed", -1, "--seed"),
    ],
)
def test_bad_options_name_the_flag(tmp_path: Path, option: str, value: int, flag: str) -> None:
    """A size, caption count, image size or seed out of range is a ValueError naming the flag."""
    with pytest.raises(ValueError, match=f"^{flag} must be >= .*got {value}"):
        generate_demo_data(tmp_path / "d", **{"progress": False, option: value})
    assert not (tmp_path / "d").exists()


def test_resizing_test_split_keeps_train(tmp_path: Path) -> None:
    """Changing --test-images leaves the train split's images and captions unchanged."""
    generate_demo_data(tmp_path / "a", image_size=32, **SMALL)
    generate_demo_data(tmp_path / "b", image_size=32, **{**SMALL, "test_images": 9})
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    train = [k for k in a if k.startswith("images/train/")]
    assert len(train) == 8
    assert all(a[k] == b[k] for k in train)
    ds_a, ds_b = Dataset.load(tmp_path / "a"), Dataset.load(tmp_path / "b")
    assert _captions_by_image(ds_a, "train") == _captions_by_image(ds_b, "train")
    assert ds_b.meta["counts"]["test"]["images"] == 9


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    """An existing --out is refused unless overwrite is set, then replaced."""
    out = tmp_path / "d"
    generate_demo_data(out, image_size=32, **SMALL)
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_demo_data(out, image_size=32, **SMALL)
    generate_demo_data(out, image_size=32, seed=3, overwrite=True, **SMALL)
    assert Dataset.load(out).meta["source"]["seed"] == 3


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while drawing leaves no dataset at --out and no temporary dir beside it."""
    real_render, calls = demo_data._render, []

    def render_then_fail(*args, **kwargs) -> bytes:
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(demo_data, "_render", render_then_fail)
    parent = tmp_path / "parent"
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate_demo_data(parent / "d", image_size=32, **SMALL)
    assert list(parent.iterdir()) == []
