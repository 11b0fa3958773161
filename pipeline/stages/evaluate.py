"""``cprd evaluate``: Recall@1/5/10 in both directions and RSUM for a dual encoder on one split.

On the dataset's labels always; when the dataset carries its full caption-image relation
(``relation.parquet``), also where any truly matching item counts (``metrics_full``,
``rsum_full``; pipeline.metrics).

Letters in shape comments: N images, M captions, D embedding width, B queries in a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.dataset import Dataset
from pipeline.core.metrics import (
    ranks_from_embeddings,
    relation_mask,
    relation_ranks,
    retrieval_metrics_from_ranks,
    sort_pairs,
)
from pipeline.torchkit.encode import (
    encode_split,
    pick_device,
    resolve_precision,
    with_precision,
)


@dataclass(frozen=True)
class EvalConfig:
    data: Path  # dataset dir
    student: str  # model spec
    split: str = "test"  # split to evaluate on
    batch_size: int = 64  # encoding batch size
    chunk_size: int = 1024  # queries ranked at once (bounds memory to chunk x gallery)
    seed: int = 0  # torch seed, for the random init of `tiny`
    device: str | None = None  # None: CUDA when present, else CPU
    precision: str | None = None  # fp32 | amp_bf16 | amp | bf16 | fp16; None: amp_bf16 on CUDA
    rerank_teacher: str | None = None  # teacher spec: also report its re-ranking of the top-K
    rerank_k: int = 128  # dual-encoder candidates per query the teacher re-ranks
    teacher_scores: Path | None = None  # a teacher cache entry of this split's candidates: also
    # report the ranking agreement (pipeline/agreement.py)
    rerank_score: str = "itm"  # itm: ITM logit alone; itm+itc: plus the cosine (LAVIS)


def full_ranks_from_embeddings(
    image: np.ndarray,
    caption: np.ndarray,
    image_rows: np.ndarray,
    caption_rows: np.ndarray,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """(i2t ranks (N,), t2i ranks (M,)) where any true match counts, never holding N x M.

    The relation is its pairs: ``image_rows`` (P,) and ``caption_rows`` (P,), rows of ``image``
    and ``caption`` (``Dataset.relation_rows``).
    """
    img, cap = torch.from_numpy(image), torch.from_numpy(caption)  # (N, D), (M, D)
    iq, ig = sort_pairs(image_rows, caption_rows, "image")
    cq, cg = sort_pairs(image_rows, caption_rows, "caption")
    n, m = len(img), len(cap)
    i2t = [
        relation_ranks(
            img[s : s + chunk_size] @ cap.T, relation_mask(iq, ig, s, min(s + chunk_size, n), m)
        )
        for s in range(0, n, chunk_size)
    ]
    t2i = [
        relation_ranks(
            cap[s : s + chunk_size] @ img.T, relation_mask(cq, cg, s, min(s + chunk_size, m), n)
        )
        for s in range(0, m, chunk_size)
    ]
    return np.concatenate(i2t), np.concatenate(t2i)


def relation_metrics(
    ds: Dataset, images, captions, image: np.ndarray, caption: np.ndarray, chunk_size: int = 1024
) -> dict[str, float] | None:
    """R@K and RSUM on the dataset's full relation for one split's embeddings, or None when the
    dataset has no relation. ``images``/``captions`` are the split's tables (``ds.split``), in
    the row order of ``image`` (N, D) and ``caption`` (M, D)."""
    rows = ds.relation_rows(images, captions)
    if rows is None:
        return None
    return retrieval_metrics_from_ranks(
        *full_ranks_from_embeddings(image, caption, *rows, chunk_size)
    )


@with_precision
def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Encode the split and return ``{"split", "model", "images", "captions", "metrics"}``,
    plus ``metrics_full`` and ``rsum_full`` (and ``rerank_metrics_full``) when the dataset
    carries its full caption-image relation."""
    from student.models import load_model

    ds = Dataset.load(cfg.data)
    images, captions = ds.split(cfg.split)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    loaded = load_model(cfg.student, device=device)
    img, cap = encode_split(
        loaded, ds, images, captions, batch_size=cfg.batch_size, device=device, progress=progress
    )
    # Map each caption's image_id to its row among this split's images.
    row_of = {image_id: row for row, image_id in enumerate(images["image_id"].to_list())}
    owner = np.array([row_of[i] for i in captions["image_id"].to_list()], dtype=np.int64)
    i2t, t2i = ranks_from_embeddings(img, cap, owner, cfg.chunk_size)
    result = {
        "split": cfg.split,
        "model": loaded.identity,
        "precision": resolve_precision(device),
        "images": len(img),
        "captions": len(cap),
        "metrics": retrieval_metrics_from_ranks(i2t, t2i),
    }
    if cfg.teacher_scores is not None:
        result["ranking_agreement"] = _agreement(cfg, ds, images, captions, img, cap)
    full = relation_metrics(ds, images, captions, img, cap, cfg.chunk_size)
    if full is not None:
        result["metrics_full"] = full
        result["rsum_full"] = full["rsum"]
    if cfg.rerank_teacher:
        from pipeline.stages.rerank import rerank_both
        from teacher.model import load_teacher

        teacher = load_teacher(cfg.rerank_teacher, device=device)
        paths = [ds.image_path(p) for p in images["path"]]
        labelled, full = rerank_both(
            img,
            cap,
            owner,
            teacher,
            paths,
            captions["caption"].to_list(),
            cfg.rerank_k,
            ds.relation_rows(images, captions),
            progress=progress,
            score=cfg.rerank_score,
        )
        result["rerank_score"] = cfg.rerank_score
        result["rerank_metrics"] = labelled
        if full is not None:
            result["rerank_metrics_full"] = full
        result["rerank_k"] = cfg.rerank_k
    return result


def _agreement(cfg: EvalConfig, ds: Dataset, images, captions, img, cap) -> dict:
    """The student's agreement with the teacher on the split's cached candidates."""
    import polars as pl

    from pipeline.core.agreement import ranking_agreement
    from pipeline.core.cache import load_scores
    from pipeline.core.cache_entry import resolve_entry

    # only the split's pairs are kept as the shards stream by
    split = pl.col("image_id").is_in(images["image_id"].implode()) & pl.col("caption_id").is_in(
        captions["caption_id"].implode()
    )
    entry = resolve_entry(cfg.teacher_scores, ds.fingerprint)
    _, pairs = load_scores(entry, ds.fingerprint, where=split)
    got = ranking_agreement(
        pairs, img, images["image_id"].to_numpy(), cap, captions["caption_id"].to_numpy()
    )
    if got["i2t"]["queries"] == 0 and got["t2i"]["queries"] == 0:
        raise ValueError(
            f"--teacher-scores '{cfg.teacher_scores}' holds no candidates of split "
            f"'{cfg.split}'; mine that split (`cprd mine-candidates --split {cfg.split}`) and "
            "score it into the cache with `cprd score-teacher`"
        )
    return got
