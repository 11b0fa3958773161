"""Import image-caption collections into the canonical dataset layout (pipeline.core.dataset).

Two sources: the Karpathy-split JSON that Flickr30K and COCO ship with, and a flat table
(CSV, JSONL or Parquet) of (image path, caption[, split]) rows. Every referenced image is read
once: it must exist and decode fully, and its bytes are hashed for the dataset fingerprint.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from tqdm import tqdm

from pipeline.core import atomic
from pipeline.core.dataset import hash_bytes, write_dataset
from pipeline.core.schemas import DATASET_JSON, SPLITS

log = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SHOW = 5  # how many offenders an error message names
# Text encoders read a few dozen tokens; a caption this long is a wrong column or a broken file.
MAX_CAPTION_CHARS = 10_000


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:SHOW])
    return shown + (f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")


def check_image(path: Path) -> tuple[str | None, str | None]:
    """(sha256 of the file, None) for a readable image, else (None, reason it is bad)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: verify() alone misses truncated files
    except Exception as e:  # PIL raises many types for bad data; all mean "cannot decode"
        return None, f"cannot decode: {e}"
    return hash_bytes(data), None


def _check_images(paths: list[Path], progress: bool) -> list[tuple[str | None, str | None]]:
    # Decoding releases the GIL, so threads overlap I/O and decode on every core.
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check_image, paths)
        return list(
            tqdm(
                results, total=len(paths), desc="checking images", unit="img", disable=not progress
            )
        )


def build_dataset(
    out: Path,
    image_paths: list[Path],
    splits: list[str],
    captions: list[list[str]],
    source: dict,
    *,
    skip_bad_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Check the images, then write the dataset to ``out`` atomically; return its metadata.

    ``image_paths[i]``, ``splits[i]`` and ``captions[i]`` describe image i. A missing or
    undecodable image is an error naming the first few offenders, or, with ``skip_bad_images``,
    is dropped with its captions and a warning.
    """
    atomic.check_out(out, overwrite, DATASET_JSON)  # before the slow part: reading every image
    if not image_paths:
        raise ValueError("the input lists no images; nothing to import")
    dupes = [str(p) for p, n in Counter(image_paths).items() if n > 1]
    if dupes:
        raise ValueError(
            f"{len(dupes)} image paths appear more than once: {_names(dupes)}; "
            "list each image once with all its captions"
        )
    no_caption = [str(p) for p, caps in zip(image_paths, captions, strict=False) if not caps]
    if no_caption:
        raise ValueError(
            f"{len(no_caption)} images have no captions: {_names(no_caption)}; "
            "give every image at least one caption or leave it out"
        )
    empty = [
        str(p)
        for p, caps in zip(image_paths, captions, strict=False)
        if any(not c.strip() for c in caps)
    ]
    if empty:
        raise ValueError(
            f"{len(empty)} images have an empty caption: {_names(empty)}; "
            "remove the empty captions from the input"
        )
    huge = [
        f"{p} ({max(map(len, caps))} characters)"
        for p, caps in zip(image_paths, captions, strict=False)
        if caps and max(map(len, caps)) > MAX_CAPTION_CHARS
    ]
    if huge:
        raise ValueError(
            f"{len(huge)} images have a caption over {MAX_CAPTION_CHARS} characters: "
            f"{_names(huge)}; check --caption-col (or the file) picks the caption text"
        )

    checked = _check_images(image_paths, progress)
    bad = [f"{p} ({why})" for p, (_, why) in zip(image_paths, checked, strict=False) if why]
    if bad and not skip_bad_images:
        raise ValueError(
            f"{len(bad)} of {len(image_paths)} images are missing or cannot be decoded: "
            f"{_names(bad)}; fix the image paths (--images) or pass --skip-bad-images to drop them"
        )
    if bad:
        log.warning("skipping %d bad images: %s", len(bad), _names(bad))

    keep = [i for i, (digest, _) in enumerate(checked) if digest]
    if not keep:
        raise ValueError("no usable images remain; nothing to import")
    images = pl.DataFrame(
        {
            "path": [str(image_paths[i]) for i in keep],
            "split": [splits[i] for i in keep],
            "sha256": [checked[i][0] for i in keep],
        },
        schema={"path": pl.String, "split": pl.String, "sha256": pl.String},
    )
    caps = pl.DataFrame(
        {
            "image_id": [new_id for new_id, i in enumerate(keep) for _ in captions[i]],
            "caption": [c for i in keep for c in captions[i]],
        },
        schema={"image_id": pl.Int64, "caption": pl.String},
    )
    source = {**source, "skipped_images": len(bad)}
    with atomic.atomic_dir(out, overwrite=overwrite, expect=DATASET_JSON) as tmp:
        return write_dataset(tmp, images, caps, source)


def import_karpathy(
    json_path: str | Path, images_root: str | Path, out: str | Path, **kwargs
) -> dict:
    """Import a Karpathy-split JSON (``images[].filepath/filename/split/sentences[].raw``).

    ``restval`` counts as train; captions are kept verbatim. Keyword arguments go to
    :func:`build_dataset`. Returns the dataset metadata.
    """
    json_path, images_root = Path(json_path), Path(images_root)
    _check_file(json_path, "--karpathy")
    if not images_root.is_dir():
        what = "is a file, not a directory" if images_root.exists() else "does not exist"
        raise FileNotFoundError(f"--images directory '{images_root}' {what}")
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--karpathy file '{json_path}' is not valid JSON (line {e.lineno}, column {e.colno}: "
            f"{e.msg})"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--karpathy file '{json_path}' is not UTF-8 text ({e})") from e
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(
            f"--karpathy file '{json_path}' has no 'images' list; expected the Karpathy split "
            "format (images[].filename, split, sentences[].raw)"
        )
    root = images_root.resolve()
    paths, splits, captions = [], [], []
    for n, entry in enumerate(entries):
        where = f"entry {n} of '{json_path}'"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise ValueError(f"{where} has no 'filename'; expected the Karpathy split format")
        split = KARPATHY_SPLITS.get(entry.get("split"))
        if split is None:
            raise ValueError(
                f"{where} has split {entry.get('split')!r}; expected one of "
                f"{', '.join(KARPATHY_SPLITS)}"
            )
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            raise ValueError(f"{where} needs 'sentences' as a list of {{'raw': text}} objects")
        paths.append(root / entry.get("filepath", "") / entry["filename"])
        splits.append(split)
        captions.append([s["raw"] for s in sentences])
    # One imgid on two different files is a broken split file (the same entry twice is reported
    # by build_dataset as a duplicate image).
    files_of: dict[object, set[Path]] = {}
    for entry, path in zip(entries, paths, strict=True):
        if "imgid" in entry:
            files_of.setdefault(entry["imgid"], set()).add(path)
    dupes = [str(i) for i, files in files_of.items() if len(files) > 1]
    if dupes:
        raise ValueError(
            f"--karpathy file '{json_path}' gives {len(dupes)} imgid values to more than one "
            f"image: {_names(dupes)}; each image needs one entry with a unique imgid"
        )
    source = {"kind": "karpathy", "file": str(json_path.resolve()), "images_root": str(root)}
    return build_dataset(Path(out), paths, splits, captions, source, **kwargs)


def _check_file(path: Path, flag: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{flag} file '{path}' is a directory; pass the file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} file '{path}' does not exist")


TABLE_READERS = {
    "csv": lambda p: pl.read_csv(p, infer_schema=False),  # all columns as text, verbatim
    "jsonl": pl.read_ndjson,
    "parquet": pl.read_parquet,
}


def random_splits(
    n: int, val_fraction: float, test_fraction: float, seed: int, rest: str = "train"
) -> list[str]:
    """The split of each of ``n`` images: a seeded draw of round(fraction * n) images (at least
    one for a fraction > 0) for val, then test; ``rest`` for the others."""
    counts = [max(1, round(f * n)) if f > 0 else 0 for f in (val_fraction, test_fraction)]
    if sum(counts) >= n:
        raise ValueError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} of {n} images "
            "leave none for training; lower them or import more images"
        )
    order = np.random.default_rng(seed).permutation(n)
    splits = [rest] * n
    for i in order[: counts[0]]:
        splits[i] = "val"
    for i in order[counts[0] : counts[0] + counts[1]]:
        splits[i] = "test"
    return splits


def import_table(
    table_path: str | Path,
    fmt: str,
    out: str | Path,
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    split_col: str | None = None,
    default_split: str = "train",
    images_root: str | Path | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    split_seed: int = 0,
    **kwargs,
) -> dict:
    """Import a flat table of (image path, caption[, split]) rows, one row per caption.

    Relative image paths resolve against ``images_root``, else the table's own directory.
    ``split_col`` None means: use a ``split`` column if there is one, else ``default_split``;
    with ``val_fraction`` / ``test_fraction`` (tables without a split column), those fractions
    of the images, drawn with ``split_seed``, go to val / test (all captions of an image go
    with it) and the rest to ``default_split``.
    Rows of one image keep their order; images are numbered in order of first appearance.
    """
    table_path = Path(table_path)
    flag = f"--{fmt}"
    _check_file(table_path, flag)
    if default_split not in SPLITS:
        raise ValueError(
            f"--default-split must be one of {', '.join(SPLITS)}, got '{default_split}'"
        )
    try:
        df = TABLE_READERS[fmt](table_path)
    except Exception as e:  # polars raises several error types for unreadable input
        raise ValueError(f"cannot read {flag} file '{table_path}': {e}") from e
    wanted = {"--image-col": image_col, "--caption-col": caption_col}
    if split_col is not None:
        wanted["--split-col"] = split_col
    for opt, col in wanted.items():
        if col not in df.columns:
            raise ValueError(
                f"{flag} file '{table_path}' has no column '{col}' ({opt}); its columns are "
                f"{df.columns}"
            )
    split_col = split_col or ("split" if "split" in df.columns else None)
    fractions = {"--val-fraction": val_fraction, "--test-fraction": test_fraction}
    for opt, f in fractions.items():
        if not 0 <= f < 1:
            raise ValueError(f"{opt} must lie in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"--val-fraction {val_fraction} + --test-fraction {test_fraction} leave no training "
            "images; keep their sum below 1"
        )
    if split_col and (val_fraction or test_fraction):
        raise ValueError(
            f"--val-fraction/--test-fraction make splits for tables without one, but {flag} file "
            f"'{table_path}' has the split column '{split_col}'; drop the fractions"
        )
    cols = [
        pl.col(image_col).cast(pl.String).alias("image"),
        pl.col(caption_col).cast(pl.String).alias("caption"),
    ]
    cols.append(
        pl.col(split_col).cast(pl.String).alias("split")
        if split_col
        else pl.lit(default_split).alias("split")
    )
    df = df.select(cols).with_row_index("row")
    nulls = df.filter(pl.any_horizontal(pl.col("image", "caption", "split").is_null()))
    if nulls.height:
        rows = [str(r + 1) for r in nulls["row"].to_list()]
        raise ValueError(f"{flag} file '{table_path}' has empty cells in data rows {_names(rows)}")
    df = df.with_columns(pl.col("split").replace({"restval": "train"}))
    bad_split = df.filter(~pl.col("split").is_in(list(SPLITS)))
    if bad_split.height:
        raise ValueError(
            f"{flag} file '{table_path}' has unknown split values "
            f"{sorted(set(bad_split['split'].to_list()))[:SHOW]}; use {', '.join(SPLITS)}"
        )
    root = Path(images_root).resolve() if images_root else table_path.resolve().parent
    groups = df.group_by("image", maintain_order=True).agg("caption", pl.col("split").unique())
    conflicting = groups.filter(pl.col("split").list.len() > 1)["image"].to_list()
    if conflicting:
        raise ValueError(
            f"{len(conflicting)} images are listed under more than one split: {_names(conflicting)}"
        )
    paths = [root / p for p in groups["image"].to_list()]
    source = {"kind": fmt, "file": str(table_path.resolve()), "images_root": str(root)}
    splits = [s[0] for s in groups["split"].to_list()]
    if val_fraction or test_fraction:
        splits = random_splits(len(paths), val_fraction, test_fraction, split_seed, default_split)
        source |= {"val_fraction": val_fraction, "test_fraction": test_fraction}
        source["split_seed"] = split_seed
    return build_dataset(
        Path(out),
        paths,
        splits,
        groups["caption"].to_list(),
        source,
        **kwargs,
    )
