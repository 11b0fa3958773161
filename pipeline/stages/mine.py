"""Stage 1, ``cprd mine-candidates``: each query's top-k items of the other modality.

Letters in shape comments: N images, M captions, D embedding width, K candidates per query.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from pipeline.core import atomic
from pipeline.core.ann import AnnSettings, search_ann
from pipeline.core.candidates import Embeddings, load_embeddings, read_manifest, write_candidates
from pipeline.core.dataset import Dataset
from pipeline.core.relation import false_negative_rate
from pipeline.core.schemas import CANDIDATES_JSON
from pipeline.torchkit.encode import (
    encode_split,
    pick_device,
    resolve_precision,
    with_precision,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MineConfig:
    data: Path  # dataset dir
    student: str  # model spec: tiny, an open_clip name[:tag|:ckpt], or a train-student dir
    out: Path  # candidates dir to write
    split: str = "train"  # which split's queries and gallery
    k: int = 32  # candidates kept per query, both directions
    index: str = "flat"  # flat (exact) | ivf | hnsw (approximate, recall measured and reported)
    nlist: int | None = None  # IVF lists; None: about sqrt(gallery size)
    nprobe: int | None = None  # IVF lists searched per query; None: 32, or 1 to start tuning
    hnsw_m: int | None = None  # HNSW links per node; None: 32
    ef_construction: int | None = None  # HNSW candidate list while building; None: 80
    ef_search: int | None = None  # HNSW candidate list per query; None: 128, or k to start tuning
    target_recall: float | None = None  # tune nprobe / ef_search to this sampled recall@k
    batch_size: int = 64  # encoding batch size
    seed: int = 0  # torch seed, for the random init of `tiny`
    device: str | None = None  # None: CUDA when present, else CPU
    precision: str | None = None  # fp32 | amp_bf16 | amp | bf16 | fp16; None: amp_bf16 on CUDA
    embeddings_from: Path | None = None  # reuse another candidates dir's embeddings
    overwrite: bool = False  # replace `out` if it exists


def _reusable(source: Path, fingerprint: str, split: str, identity: dict) -> Embeddings | None:
    """The embeddings of candidates dir ``source`` if made from the same data, split, weights and
    precision."""
    manifest = read_manifest(source)
    same = (
        manifest["dataset"]["fingerprint"] == fingerprint
        and manifest["split"] == split
        and manifest["model"].get("weights_sha256") == identity.get("weights_sha256")
        and manifest["model"].get("precision", "fp32") == identity["precision"]
    )
    return load_embeddings(source, manifest) if same else None


def _embed(
    cfg: MineConfig, ds: Dataset, images, captions, progress: bool
) -> tuple[Embeddings, dict]:
    from student.models import load_model

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    loaded = load_model(cfg.student, device=device)
    # the embeddings' identity: the weights and the precision they ran with (--precision)
    identity = {**loaded.identity, "precision": resolve_precision(device)}
    sources = [cfg.embeddings_from] if cfg.embeddings_from else []
    if cfg.overwrite and (Path(cfg.out) / "candidates.json").is_file():
        sources.append(Path(cfg.out))
    for source in sources:
        emb = _reusable(Path(source), ds.fingerprint, cfg.split, identity)
        if (
            emb is not None
            and np.array_equal(emb.image_ids, images["image_id"].to_numpy())
            and np.array_equal(emb.caption_ids, captions["caption_id"].to_numpy())
        ):
            log.info(
                "reusing embeddings from %s (same dataset, split and weights): no encoding", source
            )
            return emb, identity
        if cfg.embeddings_from and Path(source) == Path(cfg.embeddings_from):
            raise ValueError(
                f"--embeddings-from '{source}' was made with another dataset, split or model; "
                "drop the option to encode afresh"
            )
    img, cap = encode_split(
        loaded, ds, images, captions, batch_size=cfg.batch_size, device=device, progress=progress
    )
    emb = Embeddings(
        image=img,
        image_ids=images["image_id"].to_numpy().astype(np.int64),
        caption=cap,
        caption_ids=captions["caption_id"].to_numpy().astype(np.int64),
    )
    return emb, identity


def _ann(cfg: MineConfig) -> AnnSettings:
    return AnnSettings(
        nlist=cfg.nlist,
        nprobe=cfg.nprobe,
        hnsw_m=cfg.hnsw_m,
        ef_construction=cfg.ef_construction,
        ef_search=cfg.ef_search,
        target_recall=cfg.target_recall,
    )


def _direction(
    name: str,
    queries,
    query_ids,
    gallery,
    gallery_ids,
    query_owner,
    gallery_owner,
    k: int,
    cfg: MineConfig,
) -> tuple[pa.Table, dict]:
    """One direction's candidate rows, plus the search report (index, settings, recall)."""
    scores, rows, report = search_ann(queries, gallery, k, cfg.index, _ann(cfg), seed=cfg.seed)
    found = rows >= 0  # an approximate index may return fewer than k
    q_idx = np.broadcast_to(np.arange(len(queries))[:, None], rows.shape)[found]
    cand = rows[found]
    rank = np.broadcast_to(np.arange(rows.shape[1], dtype=np.int32)[None, :], rows.shape)[found]
    table = pa.table(
        {
            "direction": pa.array([name] * len(cand), pa.string()),
            "query_id": query_ids[q_idx],
            "candidate_id": gallery_ids[cand],
            "rank": rank,
            "score": scores[found].astype(np.float32),
            "is_positive": query_owner[q_idx] == gallery_owner[cand],
        }
    )
    return table, report


@with_precision
def mine_candidates(cfg: MineConfig, progress: bool = True) -> dict:
    """Encode the split, search both directions, write the candidates dir; return its manifest."""
    if cfg.k < 1:
        raise ValueError(f"--k must be >= 1, got {cfg.k}")
    _ann(cfg).check(cfg.index)  # bad index settings fail before any encoding
    atomic.check_out(cfg.out, cfg.overwrite, CANDIDATES_JSON)
    ds = Dataset.load(cfg.data)
    images, captions = ds.split(cfg.split)
    emb, identity = _embed(cfg, ds, images, captions, progress)

    # Each caption's image id, and each image's own id, decide which pairs are positives.
    caption_owner = captions["image_id"].to_numpy()  # (M,)
    image_owner = images["image_id"].to_numpy()  # (N,)
    k_i2t, k_t2i = min(cfg.k, len(emb.caption_ids)), min(cfg.k, len(emb.image_ids))
    for k_dir, n, what in (
        (k_i2t, len(emb.caption_ids), "captions"),
        (k_t2i, len(emb.image_ids), "images"),
    ):
        if k_dir < cfg.k:
            log.warning(
                "--k %d is more than the %d %s of split '%s'; keeping all %d",
                cfg.k,
                n,
                what,
                cfg.split,
                k_dir,
            )
    i2t, search_i2t = _direction(
        "i2t",
        emb.image,
        emb.image_ids,
        emb.caption,
        emb.caption_ids,
        image_owner,
        caption_owner,
        k_i2t,
        cfg,
    )
    t2i, search_t2i = _direction(
        "t2i",
        emb.caption,
        emb.caption_ids,
        emb.image,
        emb.image_ids,
        caption_owner,
        image_owner,
        k_t2i,
        cfg,
    )
    search = {"i2t": search_i2t, "t2i": search_t2i}
    recall = {d: r["recall"] for d, r in search.items()}
    false_negatives = None
    if ds.relation is not None:  # how many mined "negatives" the dataset knows to be matches
        cand = pl.from_arrow(pa.concat_tables([i2t, t2i]))
        false_negatives = false_negative_rate(cand, ds.relation)
        log.info("false negatives among mined non-positives: %s", false_negatives)
    if cfg.index != "flat":
        log.info(
            "%s index recall@k vs exact search: i2t %.4f (%s), t2i %.4f (%s)",
            cfg.index,
            recall["i2t"],
            search_i2t["settings"],
            recall["t2i"],
            search_t2i["settings"],
        )

    manifest = {
        "dataset": {"path": str(Path(cfg.data).resolve()), "fingerprint": ds.fingerprint},
        "split": cfg.split,
        "model": identity,
        "k": cfg.k,
        "k_used": {"i2t": k_i2t, "t2i": k_t2i},
        "index": cfg.index,
        "index_recall": recall,  # per direction: sampled recall@k vs exact search (flat: 1.0)
        "index_search": search,  # per direction: settings as used, recall sample, tuning, seconds
        "false_negatives": false_negatives,  # None: the dataset has no relation
        "counts": {
            "images": len(emb.image_ids),
            "captions": len(emb.caption_ids),
            "i2t": i2t.num_rows,
            "t2i": t2i.num_rows,
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    with atomic.atomic_dir(cfg.out, overwrite=cfg.overwrite, expect=CANDIDATES_JSON) as tmp:
        return write_candidates(tmp, pa.concat_tables([i2t, t2i]), emb, manifest)
