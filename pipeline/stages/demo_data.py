"""The embedded benchmark: coloured shapes in spatial relations, built from contrast groups.

A contrast group is 4 images whose captions use one bag of words. Two colours (a, b), two shapes
(x, y) and a relation axis give "a x left of b y", "b x left of a y", "a y left of b x" and
"b y left of a x": four different pictures, and no caption of one is true of another. A
bag-of-words model finds the group but not the image inside it; only binding colours to shapes
and shapes to positions does (DESIGN.md section 6).

Within a split, images 4g..4g+3 (counted from the split's first image) form group g, and caption
slot k of all four members uses the same template; the last group may be partial. Randomness comes
from ``numpy.random.default_rng`` seeded per (seed, split, group), so the same arguments give the
same bytes, and resizing one split changes neither the other splits nor its own leading groups.

Versions (``version=``, ``cprd demo-data --generator-version``): 3, the default, adds captions
that fit more images than their own and repeated scenes, and writes the full caption-image
relation beside the dataset (pipeline.demo_captions); 2, every caption true of exactly one image
of its split, stays reproducible byte for byte.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.core.atomic import atomic_dir, check_out
from pipeline.core.dataset import hash_bytes, write_dataset
from pipeline.core.schemas import DATASET_JSON
from pipeline.stages import demo_captions as v3

GENERATOR_VERSION = 3  # the default; bump whenever the same arguments would give other bytes
VERSIONS = (2, 3)  # every version this module still reproduces
GROUP_SIZE = 4
MIN_IMAGE_SIZE = 32  # below this a 20%-of-side star is a handful of pixels, not a star
SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}  # fixed sub-seed keys: never derive from order

# Every object colour has a channel >= 200, far from the dark background and its noise.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 245),
    "yellow": (245, 225, 30),
    "purple": (165, 50, 225),
    "orange": (250, 140, 10),
    "cyan": (30, 220, 230),
    "white": (245, 245, 245),
}
# Four outlines a tiny ViT tells apart at 64 pixels (diamond and star were too close to square
# and cross: a supervised probe stayed near chance on shape for hundreds of steps).
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUND = 60  # dark gray
NOISE = 6  # +- per channel: pictures with one description still differ pixel for pixel

# {a} is the first object (left / top), {b} the second. Every template names the relation, so
# none is true of the group member with the objects' order reversed, and every template names
# the first object first: reading order is position order. (Templates that reverse it, "a {b} to
# the right of a {a}", made the tiny teacher's text parse the hard part: trained from scratch it
# stayed at chance inside groups; with reading order = position order it binds. See issue #6.)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "horizontal": (
        "a {a} to the left of a {b}",
        "a {a} on the left and a {b} on the right",
        "left: a {a}, right: a {b}",
        "a {a} left of a {b}",
        "the {a} is left of the {b}",
    ),
    "vertical": (
        "a {a} above a {b}",
        "a {a} on top and a {b} at the bottom",
        "top: a {a}, bottom: a {b}",
        "a {a} over a {b}",
        "the {a} is above the {b}",
    ),
}
# 28 colour pairs x 6 shape pairs x 2 axes = 336 group kinds.
COMBOS = [
    (colours, shapes, axis)
    for colours in itertools.combinations(COLOURS, 2)
    for shapes in itertools.combinations(SHAPES, 2)
    for axis in TEMPLATES
]

Obj = tuple[str, str]  # (colour, shape)
Scene = tuple[Obj, Obj]  # (first, second) along the axis
Box = tuple[int, int, int]  # (left, top, side) in pixels


def _check_args(
    sizes: dict[str, int], captions_per_image: int, image_size: int, seed: int, version: int
) -> None:
    """Guarantee usable options: raise ValueError naming the flag, the bad value and the bound."""
    if version not in VERSIONS:
        raise ValueError(f"--generator-version must be one of {list(VERSIONS)}, got {version}")
    for split, n in sizes.items():
        if n < 1:
            raise ValueError(f"--{split}-images must be >= 1, got {n}")
    if captions_per_image < 1:
        raise ValueError(f"--captions-per-image must be >= 1, got {captions_per_image}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"--image-size must be >= {MIN_IMAGE_SIZE} so the shapes stay recognisable, "
            f"got {image_size}"
        )
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")


def _combo_order(rng: np.random.Generator, n_groups: int) -> list[int]:
    """Return indices into COMBOS: without repeats while they last, then whole new rounds."""
    order: list[int] = []
    while len(order) < n_groups:
        order.extend(rng.permutation(len(COMBOS)).tolist())
    return order[:n_groups]


def _group_scenes(combo: int, rng: np.random.Generator) -> tuple[str, list[Scene]]:
    """Return the axis and the 4 scenes of a group: 2 colour-shape bindings x 2 orders."""
    (a, b), (x, y), axis = COMBOS[combo]
    # A random orientation, so that "the first colour" carries no information about position.
    if rng.random() < 0.5:
        a, b = b, a
    if rng.random() < 0.5:
        x, y = y, x
    return axis, [((a, x), (b, y)), ((b, x), (a, y)), ((a, y), (b, x)), ((b, y), (a, x))]


def _captions(scene: Scene, axis: str, offset: int, n: int) -> list[str]:
    """Return n true captions of a scene: templates from ``offset`` on, cycling if n is large."""
    templates = TEMPLATES[axis]
    first, second = (f"{colour} {shape}" for colour, shape in scene)
    return [templates[(offset + k) % len(templates)].format(a=first, b=second) for k in range(n)]


def _layout(rng: np.random.Generator, size: int) -> tuple[Box, Box]:
    """Return two (along, across, side) boxes: the first wholly before the second, with a gap."""
    sides = [round(rng.uniform(0.28, 0.42) * size) for _ in range(2)]
    margin, gap = 1, max(1, round(0.05 * size))
    free = size - 2 * margin - sum(sides) - gap  # >= 0.11 * size - 2 > 0
    u0, u1 = np.sort(rng.uniform(0, free, 2))
    # floor keeps the order: the second starts at least side + gap after the first.
    along = [math.floor(margin + u0), math.floor(margin + u1 + sides[0] + gap)]
    # Across the axis both sit near the middle (centres <= 16% apart, >= 25% apart along it),
    # so "left of" never reads as "above".
    across = [round(size / 2 + rng.uniform(-0.08, 0.08) * size - s / 2) for s in sides]
    return (along[0], across[0], sides[0]), (along[1], across[1], sides[1])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]) -> None:
    """Draw ``shape`` in place, filling the square ``box`` (left, top, side)."""
    left, top, side = box
    right, bottom = left + side - 1, top + side - 1
    cx, cy = (left + right) / 2, (top + bottom) / 2
    if shape == "circle":
        draw.ellipse([left, top, right, bottom], fill=rgb)
    elif shape == "square":
        draw.rectangle([left, top, right, bottom], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=rgb)
    elif shape == "cross":
        half = side / 6  # arms a third of the side thick
        draw.rectangle([left, round(cy - half), right, round(cy + half)], fill=rgb)
        draw.rectangle([round(cx - half), top, round(cx + half), bottom], fill=rgb)
    elif shape == "star":
        outer = (side - 1) / 2
        points = []
        for k in range(10):
            r = outer if k % 2 == 0 else 0.45 * outer
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=rgb)
    else:
        raise ValueError(f"unknown shape '{shape}'; expected one of {SHAPES}")


def _render(scene: Scene, axis: str, size: int, rng: np.random.Generator) -> bytes:
    """Return the PNG bytes of one scene on a noisy background."""
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3))
    img = Image.fromarray((BACKGROUND + noise).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for (colour, shape), (along, across, side) in zip(scene, _layout(rng, size), strict=True):
        box = (along, across, side) if axis == "horizontal" else (across, along, side)
        _draw_shape(draw, shape, box, COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # Pillow writes no timestamp chunk: same pixels, same bytes
    return buf.getvalue()


def _split_images(
    split: str, n: int, captions_per_image: int, size: int, seed: int
) -> Iterator[tuple[bytes, list[str]]]:
    """Yield (PNG bytes, captions) for the n images of a split, group after group."""
    key = SPLIT_KEYS[split]
    n_groups = math.ceil(n / GROUP_SIZE)
    combos = _combo_order(np.random.default_rng([seed, key, 0, 0]), n_groups)
    for g, combo in enumerate(combos):
        rng = np.random.default_rng([seed, key, 1, g])  # per group: a prefix never shifts
        axis, scenes = _group_scenes(combo, rng)
        offset = int(rng.integers(len(TEMPLATES[axis])))  # one template rotation per group
        for scene in scenes[: n - g * GROUP_SIZE]:
            yield (
                _render(scene, axis, size, rng),
                _captions(scene, axis, offset, captions_per_image),
            )


def _split_images_v3(
    split: str, n: int, captions_per_image: int, size: int, seed: int
) -> Iterator[tuple[bytes, list[tuple[str, tuple]], list[tuple]]]:
    """Yield (PNG bytes, [(caption, key)], scene keys) for the n images of a split (version 3)."""
    key = SPLIT_KEYS[split]
    n_groups = math.ceil(n / GROUP_SIZE)
    combos = _combo_order(np.random.default_rng([seed, key, 0, 0]), n_groups)
    plan = v3.caption_plan(captions_per_image)
    groups: list[tuple[str, list[Scene]]] = []
    for g, combo in enumerate(combos):
        rng = np.random.default_rng([seed, key, 1, g])  # per group: a prefix never shifts
        if g and rng.random() < v3.REPEAT_FRACTION:
            axis, scenes = groups[int(rng.integers(g))]  # the same four scenes, drawn anew
        else:
            axis, scenes = _group_scenes(combo, rng)
        groups.append((axis, scenes))
        offset = int(rng.integers(len(TEMPLATES[axis])))  # one template rotation per group
        kinds = [v3.UNDER_KINDS[i] for i in rng.permutation(len(v3.UNDER_KINDS))]
        for scene in scenes[: n - g * GROUP_SIZE]:
            full = _captions(scene, axis, offset, captions_per_image)  # step j at full[j]
            caps = [
                (full[i], v3.full_key(scene, axis))
                if is_full
                else v3.under_caption(kinds[i % len(kinds)], scene, axis)
                for is_full, i in plan
            ]
            yield _render(scene, axis, size, rng), caps, v3.scene_keys(scene, axis)


def generate_demo_data(
    out: Path,
    *,
    train_images: int = 2000,
    val_images: int = 200,
    test_images: int = 200,
    captions_per_image: int = 5,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    version: int = GENERATOR_VERSION,
) -> dict:
    """Write the demo dataset to `out` atomically; return the dataset metadata dict.

    ``version`` 3 (the default) also writes the full caption-image relation (relation.parquet);
    ``version`` 2 reproduces the datasets of that generator byte for byte.
    """
    sizes = {"train": train_images, "val": val_images, "test": test_images}
    _check_args(sizes, captions_per_image, image_size, seed, version)
    check_out(out, overwrite, DATASET_JSON)
    images: list[dict] = []
    captions: list[dict] = []
    relation: tuple[list[int], list[int]] = ([], [])  # (image ids, caption ids), version 3
    bar = tqdm(
        total=sum(sizes.values()), desc="drawing demo images", unit="img", disable=not progress
    )
    with atomic_dir(out, overwrite=overwrite, expect=DATASET_JSON) as tmp, bar:
        for split, n in sizes.items():
            (tmp / "images" / split).mkdir(parents=True)
            if version == 2:
                drawn = (
                    (png, [(c, None) for c in caps], [])
                    for png, caps in _split_images(split, n, captions_per_image, image_size, seed)
                )
            else:
                drawn = _split_images_v3(split, n, captions_per_image, image_size, seed)
            image_keys, caption_keys = [], []  # this split's, for the relation
            for i, (png, caps, keys) in enumerate(drawn):
                path = f"images/{split}/{i:06d}.png"
                (tmp / path).write_bytes(png)  # atomic_dir renames the whole tree at the end
                image_keys.append((len(images), keys))
                caption_keys += [(len(captions) + j, key) for j, (_, key) in enumerate(caps)]
                captions.extend({"image_id": len(images), "caption": c} for c, _ in caps)
                images.append({"path": path, "split": split, "sha256": hash_bytes(png)})
                bar.update()
            if version == 3:
                for ids, more in zip(
                    relation, v3.relation_pairs(image_keys, caption_keys), strict=True
                ):
                    ids.extend(more)
        source = {
            "kind": "demo-data",
            "generator_version": version,
            "seed": seed,
            "image_size": image_size,
            "captions_per_image": captions_per_image,
            "train_images": train_images,
            "val_images": val_images,
            "test_images": test_images,
            "group_size": GROUP_SIZE,  # images 4g..4g+3 of each split form contrast group g
        }
        rel = None
        if version == 3:
            source["underspecified_slots"] = list(range(v3.FULL_SLOTS, v3.SLOT_CYCLE))
            source["repeat_fraction"] = v3.REPEAT_FRACTION
            rel = pl.DataFrame(
                {"image_id": relation[0], "caption_id": relation[1]},
                schema={"image_id": pl.Int64, "caption_id": pl.Int64},
            )
        meta = write_dataset(tmp, pl.DataFrame(images), pl.DataFrame(captions), source, rel)
    return meta
