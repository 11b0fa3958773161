"""The candidates directory that mine-candidates writes and score-teacher / train-student read.

Layout::

    candidates.parquet        schemas.CANDIDATES_SCHEMA, sorted by direction, query_id, rank
    embeddings/image.npy      (N, D) float32, row i belongs to image_ids[i]
    embeddings/image_ids.npy  (N,) int64
    embeddings/caption.npy    (M, D) float32, row j belongs to caption_ids[j]
    embeddings/caption_ids.npy
    candidates.json           manifest: dataset fingerprint, split, model, k, row counts and the
                              sha256 of every file above; written last
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import atomic
from pipeline.core.schemas import (
    CANDIDATES_FILE,
    CANDIDATES_FORMAT,
    CANDIDATES_JSON,
    CANDIDATES_SCHEMA,
    CANDIDATES_VERSION,
    EMBEDDINGS_DIR,
)

EMBEDDING_FILES = ("image", "image_ids", "caption", "caption_ids")


@dataclass(frozen=True)
class Embeddings:
    """A split's embeddings with the ids of their rows."""

    image: np.ndarray  # (N, D) float32, unit norm
    image_ids: np.ndarray  # (N,) int64
    caption: np.ndarray  # (M, D) float32, unit norm
    caption_ids: np.ndarray  # (M,) int64


def write_candidates(out_dir: Path, table: pa.Table, emb: Embeddings, manifest: dict) -> dict:
    """Write candidates, embeddings and (last) the manifest with checksums into ``out_dir``.

    ``out_dir`` is normally the temporary dir of :func:`pipeline.core.atomic.atomic_dir`.
    Returns the manifest as written.
    """
    out_dir = Path(out_dir)
    files = {}
    (out_dir / EMBEDDINGS_DIR).mkdir(parents=True, exist_ok=True)
    for name in EMBEDDING_FILES:
        rel = f"{EMBEDDINGS_DIR}/{name}.npy"
        with atomic.atomic_path(out_dir / rel) as tmp, open(tmp, "wb") as f:
            np.save(f, getattr(emb, name))
        files[rel] = {"sha256": atomic.file_sha256(out_dir / rel)}
    with atomic.atomic_path(out_dir / CANDIDATES_FILE) as tmp:
        pq.write_table(table.cast(CANDIDATES_SCHEMA), tmp)
    files[CANDIDATES_FILE] = {
        "rows": table.num_rows,
        "sha256": atomic.file_sha256(out_dir / CANDIDATES_FILE),
    }
    manifest = {
        "format": CANDIDATES_FORMAT,
        "version": CANDIDATES_VERSION,
        **manifest,
        "files": files,
    }
    atomic.write_json(out_dir / CANDIDATES_JSON, manifest)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The candidates manifest of ``path``; ValueError if ``path`` is not a candidates dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"candidates dir '{path}' does not exist; create it with `cprd mine-candidates`"
        )
    mpath = path / CANDIDATES_JSON
    if not mpath.is_file():
        raise ValueError(
            f"'{path}' is not a candidates dir (no {CANDIDATES_JSON}); pass a directory written "
            "by `cprd mine-candidates`"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"'{mpath}' is corrupt ({e}); re-run `cprd mine-candidates`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != CANDIDATES_FORMAT:
        raise ValueError(f"'{mpath}' is not a cprd candidates manifest")
    return manifest


def _verified(path: Path, manifest: dict, rel: str) -> Path:
    f = path / rel
    expected = manifest["files"].get(rel, {}).get("sha256")
    if not f.is_file():
        raise ValueError(f"candidates file '{f}' is missing; re-run `cprd mine-candidates`")
    if expected is None or atomic.file_sha256(f) != expected:
        raise ValueError(
            f"candidates file '{f}' does not match its checksum in {CANDIDATES_JSON} (damaged or "
            "edited); re-run `cprd mine-candidates`"
        )
    return f


def load_embeddings(path: str | Path, manifest: dict | None = None) -> Embeddings:
    """The checksum-verified embeddings of a candidates dir."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    arrays = {
        name: np.load(_verified(path, manifest, f"{EMBEDDINGS_DIR}/{name}.npy"), allow_pickle=False)
        for name in EMBEDDING_FILES
    }
    return Embeddings(**arrays)


def load_candidates(path: str | Path) -> tuple[dict, pl.DataFrame]:
    """(manifest, candidates table) of a candidates dir, checksum-verified."""
    path = Path(path)
    manifest = read_manifest(path)
    table = pq.read_table(_verified(path, manifest, CANDIDATES_FILE))
    return manifest, pl.from_arrow(table)


def candidate_pairs(cand: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """The (image_id, caption_id) pairs of candidate rows of both directions, each pair once,
    sorted by (image_id, caption_id); ``columns`` (e.g. ``"score"``) come along from the pair's
    first row (image queries first).

    The one conversion from the candidates table (direction, query_id, candidate_id, ...) to
    pairs: score-teacher scores these, a run without a teacher reads the miner's lists from them,
    and the re-ranking evaluation scores each query's top-K through them.
    """
    i2t = cand.filter(pl.col("direction") == "i2t").select(
        pl.col("query_id").alias("image_id"), pl.col("candidate_id").alias("caption_id"), *columns
    )
    t2i = cand.filter(pl.col("direction") == "t2i").select(
        pl.col("candidate_id").alias("image_id"), pl.col("query_id").alias("caption_id"), *columns
    )
    return (
        pl.concat([i2t, t2i])
        .unique(["image_id", "caption_id"], keep="first", maintain_order=True)
        .sort("image_id", "caption_id")
    )
