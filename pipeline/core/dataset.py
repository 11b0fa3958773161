"""The canonical dataset directory: images and captions as Parquet, plus ``dataset.json``.

Layout of a dataset dir::

    images.parquet    image_id, path, split, sha256   (schemas.IMAGES_SCHEMA)
    captions.parquet  caption_id, image_id, caption   (schemas.CAPTIONS_SCHEMA)
    relation.parquet  optional: image_id, caption_id of every truly matching pair
                      (schemas.RELATION_SCHEMA, pipeline.relation); listed in dataset.json
    dataset.json      format, version, counts per split, fingerprint, source (written last)
    images/           optional: image files the dataset owns (demo data); imports point elsewhere

The fingerprint is a hash of the content (image bytes, splits, captions, ids), not of paths, so
moving the image files does not change it while editing one caption does; a relation file is
part of the content (a dataset without one keeps the fingerprint it always had). Every later stage
records it, and a cache or candidate set made for another fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import atomic
from pipeline.core.relation import check_relation, matches_per_caption, relation_rows
from pipeline.core.schemas import (
    CAPTIONS_FILE,
    CAPTIONS_SCHEMA,
    DATASET_FORMAT,
    DATASET_JSON,
    DATASET_VERSION,
    IMAGES_FILE,
    IMAGES_SCHEMA,
    RELATION_FILE,
    RELATION_SCHEMA,
    SPLITS,
)


def hash_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def fingerprint(
    images: pl.DataFrame, captions: pl.DataFrame, relation: pl.DataFrame | None = None
) -> str:
    """Content hash of a dataset: ids, splits, image bytes (via their sha256), caption texts and,
    when there is one, every pair of the relation (sorted by caption_id, image_id)."""
    h = hashlib.sha256(f"{DATASET_FORMAT}/{DATASET_VERSION}\n".encode())
    for image_id, split, digest in images.select("image_id", "split", "sha256").iter_rows():
        h.update(f"I\t{image_id}\t{split}\t{digest}\n".encode())
    for caption_id, image_id, text in captions.select(
        "caption_id", "image_id", "caption"
    ).iter_rows():
        # Length prefix: a caption containing tabs or newlines cannot collide with another layout.
        encoded = text.encode()
        h.update(f"C\t{caption_id}\t{image_id}\t{len(encoded)}\t".encode() + encoded + b"\n")
    if relation is not None:
        for image_id, caption_id in relation.select("image_id", "caption_id").iter_rows():
            h.update(f"R\t{image_id}\t{caption_id}\n".encode())
    return h.hexdigest()


def split_counts(images: pl.DataFrame, captions: pl.DataFrame) -> dict[str, dict[str, int]]:
    """``{split: {"images": n, "captions": m}}`` for every split in SPLITS."""
    cap_split = captions.join(images.select("image_id", "split"), on="image_id", how="left")
    counts = {}
    for split in SPLITS:
        counts[split] = {
            "images": images.filter(pl.col("split") == split).height,
            "captions": cap_split.filter(pl.col("split") == split).height,
        }
    return counts


def write_dataset(
    out_dir: Path,
    images: pl.DataFrame,
    captions: pl.DataFrame,
    source: dict,
    relation: pl.DataFrame | None = None,
) -> dict:
    """Write a dataset's tables and ``dataset.json`` into ``out_dir``; return the metadata.

    ``images`` has columns ``path, split, sha256`` (row i gets image_id i); ``captions`` has
    ``image_id, caption`` (row j gets caption_id j); ``relation``, when given, ``image_id,
    caption_id`` of every truly matching pair in those ids (checked by
    :func:`pipeline.core.relation.check_relation`). ``out_dir`` is normally the temporary directory
    of :func:`pipeline.core.atomic.atomic_dir`, so the whole dataset appears at once. Raises
    ValueError for an empty dataset, an unknown split or a caption of a missing image.
    """
    if images.height == 0:
        raise ValueError("the dataset has no images")
    if captions.height == 0:
        raise ValueError("the dataset has no captions")
    bad_splits = sorted(set(images["split"].unique().to_list()) - set(SPLITS))
    if bad_splits:
        raise ValueError(f"unknown split(s) {bad_splits}; expected one of {list(SPLITS)}")
    images = images.select(
        pl.int_range(images.height, dtype=pl.Int64).alias("image_id"), "path", "split", "sha256"
    )
    captions = captions.select(
        pl.int_range(captions.height, dtype=pl.Int64).alias("caption_id"),
        pl.col("image_id").cast(pl.Int64),
        "caption",
    )
    orphans = captions.filter(~pl.col("image_id").is_between(0, images.height - 1))
    if orphans.height:
        raise ValueError(f"{orphans.height} captions refer to image ids that do not exist")

    if relation is not None:
        relation = check_relation(images, captions, relation)

    out_dir = Path(out_dir)
    _write_table(images, IMAGES_SCHEMA, out_dir / IMAGES_FILE)
    _write_table(captions, CAPTIONS_SCHEMA, out_dir / CAPTIONS_FILE)
    meta = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "fingerprint": fingerprint(images, captions, relation),
        "num_images": images.height,
        "num_captions": captions.height,
        "counts": split_counts(images, captions),
        "source": source,
    }
    if relation is not None:
        _write_table(relation, RELATION_SCHEMA, out_dir / RELATION_FILE)
        meta["relation"] = {
            "file": RELATION_FILE,
            "pairs": relation.height,
            "images_per_caption": matches_per_caption(relation),
        }
    atomic.write_json(out_dir / DATASET_JSON, meta)  # last: its presence marks a complete dataset
    return meta


def _write_table(df: pl.DataFrame, schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pydict({f.name: df[f.name].to_list() for f in schema}, schema=schema)
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset directory. Tables are small (ids, paths, texts); images load on demand."""

    root: Path
    meta: dict
    images: pl.DataFrame  # image_id, path, split, sha256; row i has image_id i
    captions: pl.DataFrame  # caption_id, image_id, caption; row j has caption_id j
    relation: pl.DataFrame | None = None  # image_id, caption_id of every true match; None: labels

    @classmethod
    def load(cls, root: str | Path) -> Dataset:
        """Open and check a dataset dir; raise FileNotFoundError/ValueError naming what is wrong."""
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(
                f"dataset '{root}' does not exist; create one with `cprd import-data` or "
                "`cprd demo-data`"
            )
        meta_path = root / DATASET_JSON
        if not meta_path.is_file():
            kinds = {"candidates.json": "a candidates dir", "key.json": "a teacher cache"}
            kind = next((k for f, k in kinds.items() if (root / f).is_file()), None)
            what = f"is {kind}, not a cprd dataset" if kind else "is not a cprd dataset"
            raise ValueError(
                f"'{root}' {what} (no {DATASET_JSON}); pass a dataset dir, or create one with "
                "`cprd import-data` or `cprd demo-data`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"'{meta_path}' is corrupt ({e}); re-create the dataset") from e
        if not isinstance(meta, dict) or meta.get("format") != DATASET_FORMAT:
            raise ValueError(f"'{meta_path}' is not a cprd dataset manifest")
        images = _read_table(root / IMAGES_FILE, IMAGES_SCHEMA)
        captions = _read_table(root / CAPTIONS_FILE, CAPTIONS_SCHEMA)
        if images.height != meta["num_images"] or captions.height != meta["num_captions"]:
            raise ValueError(
                f"dataset '{root}' is inconsistent: {DATASET_JSON} lists {meta['num_images']} "
                f"images and {meta['num_captions']} captions, the tables hold {images.height} "
                f"and {captions.height}; re-create the dataset"
            )
        relation = None
        if meta.get("relation"):  # named by the manifest, never found by looking around
            relation = _read_table(root / meta["relation"]["file"], RELATION_SCHEMA)
            if relation.height != meta["relation"]["pairs"]:
                raise ValueError(
                    f"dataset '{root}' is inconsistent: {DATASET_JSON} lists "
                    f"{meta['relation']['pairs']} relation pairs, the table holds "
                    f"{relation.height}; re-create the dataset"
                )
        return cls(root=root, meta=meta, images=images, captions=captions, relation=relation)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def split(self, name: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(images, captions) of one split in id order; ValueError if unknown or empty."""
        if name not in SPLITS:
            raise ValueError(f"unknown split '{name}'; choose one of {', '.join(SPLITS)}")
        images = self.images.filter(pl.col("split") == name)
        if images.height == 0:
            available = [s for s in SPLITS if self.meta["counts"][s]["images"]]
            raise ValueError(
                f"split '{name}' of dataset '{self.root}' is empty; choose one of {available}"
            )
        captions = self.captions.filter(pl.col("image_id").is_in(images["image_id"].implode()))
        return images, captions

    def relation_rows(self, images: pl.DataFrame, captions: pl.DataFrame):
        """(image rows (P,), caption rows (P,)) of the true matches among ``images`` and
        ``captions`` (e.g. one split's tables, rows counted from 0), or None without a relation."""
        if self.relation is None:
            return None
        return relation_rows(self.relation, images, captions)

    def image_path(self, path: str) -> Path:
        """Resolve a stored image path (relative to the dataset dir, or absolute)."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    def info(self) -> dict:
        """Counts per split, captions per image and the fingerprint, for ``cprd data-info``."""
        per_image = self.captions.group_by("image_id").len()
        per_image = self.images.select("image_id").join(per_image, on="image_id", how="left")
        per_image = per_image.fill_null(0)["len"]
        return {
            "path": str(self.root),
            "fingerprint": self.fingerprint,
            "num_images": self.images.height,
            "num_captions": self.captions.height,
            "counts": split_counts(self.images, self.captions),
            "captions_per_image": {
                "min": int(per_image.min()),
                "mean": round(float(per_image.mean()), 3),
                "max": int(per_image.max()),
            },
            "source": self.meta.get("source", {}),
            "relation": self.meta.get("relation"),
        }


def _read_table(path: Path, schema: pa.Schema) -> pl.DataFrame:
    if not path.is_file():
        raise ValueError(f"dataset file '{path}' is missing; re-create the dataset")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"dataset file '{path}' is unreadable ({e}); re-create the dataset") from e
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"dataset file '{path}' lacks columns {missing}; re-create the dataset")
    return pl.from_arrow(table.select(schema.names))
