"""``cprd encode`` and ``cprd search``: a split's embeddings and a saved FAISS index, for serving.

Layout of a gallery dir (``cprd encode --out DIR``)::

    embeddings/image.npy        (N, D) float32 unit-norm image embeddings, row i is image_ids[i]
    embeddings/image_ids.npy    (N,) int64 dataset image ids
    embeddings/caption.npy      (M, D) float32 unit-norm caption embeddings, row j is caption_ids[j]
    embeddings/caption_ids.npy  (M,) int64 dataset caption ids
    images.parquet              image_id, path (absolute), one row per indexed image, in row order
    index.faiss                 faiss index over embeddings/image.npy (its id r is row r)
    gallery.json                dataset fingerprint and split, the model (spec and weights sha256),
                                index kind, counts and the sha256 of every file above; written last

``search_gallery`` encodes a text query with the same model (refused if its weights no longer
hash to what the gallery recorded) and returns the top-k images of the index.
Letters in shape comments: N images, M captions, D embedding width, Q queries, K results.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.core import atomic
from pipeline.core.ann import AnnSettings
from pipeline.core.candidates import EMBEDDING_FILES, Embeddings
from pipeline.core.dataset import Dataset
from pipeline.core.schemas import EMBEDDINGS_DIR
from pipeline.core.search import build_index, index_settings
from pipeline.torchkit.encode import (
    encode_split,
    encode_texts,
    pick_device,
    precision_scope,
    resolve_precision,
    with_precision,
)

log = logging.getLogger(__name__)

GALLERY_JSON = "gallery.json"
GALLERY_FORMAT = "cprd-gallery"
GALLERY_VERSION = 1
INDEX_FILE = "index.faiss"
IMAGES_TABLE = "images.parquet"


@dataclass(frozen=True)
class EncodeConfig:
    data: Path  # dataset dir
    student: str  # model spec (see `--student` help)
    out: Path  # gallery dir to write
    split: str = "test"  # which split's images and captions
    index: str = "flat"  # faiss index over the images: flat (exact) | ivf | hnsw
    nlist: int | None = None  # IVF lists; None: about sqrt(images)
    nprobe: int | None = None  # IVF lists searched per query (saved in the index); None: 32
    hnsw_m: int | None = None  # HNSW links per node; None: 32
    ef_construction: int | None = None  # HNSW candidate list while building; None: 80
    ef_search: int | None = None  # HNSW candidate list per query (saved in the index); None: 128
    batch_size: int = 64  # encoding batch size
    seed: int = 0  # torch seed, for the random init of `tiny`
    device: str | None = None  # None: CUDA when present, else CPU
    precision: str | None = None  # fp32 | amp_bf16 | amp | bf16 | fp16; None: amp_bf16 on CUDA
    overwrite: bool = False  # replace `out` if it exists


@with_precision
def encode_gallery(cfg: EncodeConfig, progress: bool = True) -> dict:
    """Encode a split's images and captions, index the images, write the gallery dir; return its
    manifest."""
    from student.models import load_model

    ann = AnnSettings(cfg.nlist, cfg.nprobe, cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)
    ann.check(cfg.index)  # bad index settings fail before any encoding
    atomic.check_out(cfg.out, cfg.overwrite, GALLERY_JSON)
    ds = Dataset.load(cfg.data)
    images, captions = ds.split(cfg.split)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    loaded = load_model(cfg.student, device=device)
    kw = {"batch_size": cfg.batch_size, "device": device, "progress": progress}
    img, cap = encode_split(loaded, ds, images, captions, **kw)  # (N, D), (M, D)
    emb = Embeddings(
        image=img,
        image_ids=images["image_id"].to_numpy().astype(np.int64),
        caption=cap,
        caption_ids=captions["caption_id"].to_numpy().astype(np.int64),
    )
    import faiss

    index = build_index(
        img,
        cfg.index,
        nlist=ann.nlist,
        nprobe=ann.nprobe or 32,
        hnsw_m=ann.hnsw_m or 32,
        ef_construction=ann.ef_construction or 80,
        ef_search=ann.ef_search or 128,
    )
    paths = pl.DataFrame(
        {
            "image_id": emb.image_ids,
            "path": [str(ds.image_path(p).resolve()) for p in images["path"].to_list()],
        }
    )
    manifest = {
        "format": GALLERY_FORMAT,
        "version": GALLERY_VERSION,
        "dataset": {"path": str(Path(cfg.data).resolve()), "fingerprint": ds.fingerprint},
        "split": cfg.split,
        "model": loaded.identity,
        "seed": cfg.seed,
        "precision": resolve_precision(device),
        "index": cfg.index,
        "index_settings": index_settings(index, cfg.index),  # as built and saved
        "dim": int(img.shape[1]),
        "counts": {"images": len(img), "captions": len(cap)},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    with atomic.atomic_dir(cfg.out, overwrite=cfg.overwrite, expect=GALLERY_JSON) as tmp:
        files = {}
        (tmp / EMBEDDINGS_DIR).mkdir()
        for name in EMBEDDING_FILES:
            rel = f"{EMBEDDINGS_DIR}/{name}.npy"
            with open(tmp / rel, "wb") as f:
                np.save(f, getattr(emb, name))
        faiss.write_index(index, str(tmp / INDEX_FILE))
        paths.write_parquet(tmp / IMAGES_TABLE)
        for rel in [f"{EMBEDDINGS_DIR}/{n}.npy" for n in EMBEDDING_FILES] + [
            INDEX_FILE,
            IMAGES_TABLE,
        ]:
            files[rel] = {"sha256": atomic.file_sha256(tmp / rel)}
        manifest["files"] = files
        atomic.write_json(tmp / GALLERY_JSON, manifest)
    log.info(
        "encoded %d images and %d captions of split '%s' into %s (%s index)",
        len(img),
        len(cap),
        cfg.split,
        cfg.out,
        cfg.index,
    )
    return manifest


def read_gallery(path: str | Path) -> dict:
    """The manifest of a gallery dir, every file checked against its sha256; ValueError naming
    what is wrong otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"gallery '{path}' does not exist; create it with `cprd encode`")
    mpath = path / GALLERY_JSON
    if not mpath.is_file():
        raise ValueError(
            f"'{path}' is not a gallery dir (no {GALLERY_JSON}); pass a directory written by "
            "`cprd encode`"
        )
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != GALLERY_FORMAT or manifest.get("version") != GALLERY_VERSION:
        raise ValueError(f"'{mpath}' is not a cprd gallery manifest of version {GALLERY_VERSION}")
    for rel, entry in manifest["files"].items():
        f = path / rel
        if not f.is_file() or atomic.file_sha256(f) != entry["sha256"]:
            raise ValueError(
                f"gallery file '{f}' is missing or does not match its checksum in "
                f"{GALLERY_JSON}; re-run `cprd encode`"
            )
    return manifest


def load_gallery_embeddings(path: str | Path) -> Embeddings:
    """The checksum-verified embeddings of a gallery dir."""
    read_gallery(path)
    arrays = {n: np.load(Path(path) / EMBEDDINGS_DIR / f"{n}.npy") for n in EMBEDDING_FILES}
    return Embeddings(**arrays)


def search_gallery(
    path: str | Path,
    queries: list[str],
    k: int = 5,
    *,
    student: str | None = None,
    device: str | None = None,
) -> list[list[dict]]:
    """For each text query, its top-``k`` images of the gallery, best first: dicts of rank,
    image_id, path and score (cosine similarity).

    The queries are encoded with the model the gallery recorded (``student`` overrides the spec,
    e.g. after moving a student dir); its weights must hash to the recorded ones.
    """
    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    if not queries or any(not q.strip() for q in queries):
        raise ValueError('the query is empty; pass some text, e.g. "a dog on a beach"')
    path = Path(path)
    manifest = read_gallery(path)
    recorded = manifest["model"]
    torch.manual_seed(manifest.get("seed", 0))  # the same random init for `tiny`
    dev = pick_device(device)
    with precision_scope(manifest.get("precision")):  # the queries as the gallery was encoded
        return _search(path, manifest, recorded, queries, k, student, dev)


def _search(path, manifest, recorded, queries, k, student, dev) -> list[list[dict]]:
    import faiss

    from student.models import load_model

    loaded = load_model(student or recorded["spec"], device=dev)
    if loaded.identity.get("weights_sha256") != recorded.get("weights_sha256"):
        raise ValueError(
            f"--student '{student or recorded['spec']}' has other weights than the model gallery "
            f"'{path}' was encoded with (sha256 {recorded.get('weights_sha256', '?')[:12]}); pass "
            "that model with --student, or re-run `cprd encode`"
        )
    q = encode_texts(loaded.model, loaded.tokenizer, queries, device=dev, progress=False)  # (Q, D)
    index = faiss.read_index(str(path / INDEX_FILE))
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(index.hnsw.efSearch, k)
    k = min(k, index.ntotal)
    scores, rows = index.search(np.ascontiguousarray(q, dtype=np.float32), k)  # (Q, K) each
    table = pl.read_parquet(path / IMAGES_TABLE)
    ids, paths = table["image_id"].to_list(), table["path"].to_list()
    return [
        [
            {"rank": r, "image_id": ids[row], "path": paths[row], "score": float(s)}
            for r, (row, s) in enumerate(zip(rows[i], scores[i], strict=True))
            if row >= 0
        ]
        for i in range(len(queries))
    ]
