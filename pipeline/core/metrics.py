"""Image-text retrieval recall (Flickr30K / COCO protocol), computed in chunks of queries.

Letters used in shape comments: I images, T captions (texts), B queries in one chunk.

Protocol: image->text, an image query is correct at K when ANY of its captions is among its top K;
text->image, a caption query is correct at K when its own image is among its top K. ``rsum`` is
the sum of the six recalls (percent), so a perfect model scores 600.

Ranks are 0-based: the rank of a query is the number of *non-positive* items scoring greater than
**or equal to** its best positive. Ties therefore count against the query (pessimistic): a
collapsed model that gives every pair the same score gets rank = number of negatives, not a
perfect rank 0, and a tie can never inflate a reported recall. With continuous float scores ties
are rare and this equals the usual argsort-based protocol.

Three ways to call it:
- ``retrieval_metrics(sim, caption_to_image)`` for a full (I, T) score matrix (sliced into chunks
  of queries internally, so the temporaries stay at (chunk_size, max(I, T)));
- streaming, for an evaluator that never holds the matrix: compute each chunk of similarities
  from embeddings, pass it to ``i2t_ranks`` / ``t2i_ranks``, concatenate the ranks, and call
  ``retrieval_metrics_from_ranks``;
- re-ranked, for a second stage that scores only each query's own top K (everything else ranks
  behind them): ``topk_ranks`` from the (B, K) scores, never a (B, I) row.

**The full relation** (ECCV Caption / CxC style): when a dataset knows every true image-caption
match, not just the image each caption was written for, the same R@K and RSUM are computed with
*any* truly matching item counting as a positive, in both directions: ``full_relation_metrics``
for a matrix, ``relation_ranks`` + ``relation_mask`` for the streaming path. The result has the
same keys; callers report it under a name of its own (``metrics_full``, ``rsum_full``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

RECALL_AT = (1, 5, 10)
METRIC_KEYS = tuple(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in RECALL_AT) + ("rsum",)

ArrayLike = np.ndarray | torch.Tensor | Sequence[int] | Sequence[float]


def _as_tensor(x: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if isinstance(x, Sequence) else x)
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_scores(sim: torch.Tensor, name: str) -> None:
    # A NaN positive would compare False with everything and get rank 0: refuse instead.
    if sim.is_floating_point() and torch.isnan(sim).any():
        raise ValueError(f"{name} contains NaN scores; check the embeddings for NaN/inf first")


def i2t_ranks(
    sim_chunk: ArrayLike, image_index: ArrayLike, caption_to_image: ArrayLike
) -> np.ndarray:
    """Return the (B,) int64 rank of each image query's best caption (0 = retrieved first).

    ``sim_chunk`` is (B, T): rows are image queries, columns all T captions. ``image_index`` (B,)
    is the global image index of each row and ``caption_to_image`` (T,) the image of each caption.
    """
    sim = _as_tensor(sim_chunk, "sim_chunk", 2)  # (B, T)
    rows = _as_tensor(image_index, "image_index", 1).to(sim.device, torch.long)  # (B,)
    cap_img = _as_tensor(caption_to_image, "caption_to_image", 1).to(sim.device, torch.long)  # (T,)
    if sim.shape[0] != rows.shape[0]:
        raise ValueError(
            f"image_index has {rows.shape[0]} entries but sim_chunk has {sim.shape[0]} rows; "
            "pass one image index per row of the chunk"
        )
    if sim.shape[1] != cap_img.shape[0]:
        raise ValueError(
            f"caption_to_image has {cap_img.shape[0]} entries but sim_chunk has {sim.shape[1]} "
            "captions (columns); pass the image of every caption, in column order"
        )
    _check_scores(sim, "sim_chunk")
    positive = cap_img[None, :] == rows[:, None]  # (B, T)
    no_caption = ~positive.any(dim=1)  # (B,)
    if no_caption.any():
        bad = rows[no_caption][:5].tolist()
        raise ValueError(
            f"image(s) {bad} have no caption in caption_to_image; image->text recall is undefined "
            "for them, so drop images without captions before evaluating"
        )
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
    best = torch.where(positive, sim, neg_inf).amax(dim=1)  # (B,)
    beats = (sim >= best[:, None]) & ~positive  # (B, T)
    return beats.sum(dim=1).cpu().numpy().astype(np.int64)


def t2i_ranks(sim_chunk: ArrayLike, caption_image: ArrayLike) -> np.ndarray:
    """Return the (B,) int64 rank of each caption query's own image (0 = retrieved first).

    ``sim_chunk`` is (B, I), caption-major: rows are caption queries, columns all I images (the
    natural shape of ``text_emb_chunk @ image_emb.T``). ``caption_image`` (B,) is each row's image.
    """
    sim = _as_tensor(sim_chunk, "sim_chunk", 2)  # (B, I)
    own = _as_tensor(caption_image, "caption_image", 1).to(sim.device, torch.long)  # (B,)
    if sim.shape[0] != own.shape[0]:
        raise ValueError(
            f"caption_image has {own.shape[0]} entries but sim_chunk has {sim.shape[0]} rows; "
            "pass the image of every caption row"
        )
    if own.numel() and (own.min() < 0 or own.max() >= sim.shape[1]):
        raise ValueError(
            f"caption_image values must lie in [0, {sim.shape[1] - 1}] (sim_chunk has "
            f"{sim.shape[1]} image columns), got range [{own.min().item()}, {own.max().item()}]"
        )
    _check_scores(sim, "sim_chunk")
    positive_score = sim.gather(1, own[:, None])  # (B, 1)
    beats = sim >= positive_score  # (B, I); includes the own image itself
    return (beats.sum(dim=1) - 1).cpu().numpy().astype(np.int64)


def relation_ranks(sim_chunk: ArrayLike, positive: ArrayLike) -> np.ndarray:
    """Return the (B,) int64 rank of each query's best positive among its non-positives.

    ``sim_chunk`` (B, G) scores B queries against the whole gallery; ``positive`` (B, G) bool
    marks every gallery item that truly matches each query. Ties count against the query.
    """
    sim = _as_tensor(sim_chunk, "sim_chunk", 2)  # (B, G)
    pos = _as_tensor(positive, "positive", 2).to(sim.device, torch.bool)  # (B, G)
    if pos.shape != sim.shape:
        raise ValueError(
            f"positive {tuple(pos.shape)} must have the shape of sim_chunk {tuple(sim.shape)}"
        )
    _check_scores(sim, "sim_chunk")
    empty = ~pos.any(dim=1)  # (B,)
    if empty.any():
        bad = torch.nonzero(empty).flatten()[:5].tolist()
        raise ValueError(
            f"query rows {bad} of the chunk have no true match; the relation must hold every "
            "labelled pair (drop queries without one before evaluating)"
        )
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
    best = torch.where(pos, sim, neg_inf).amax(dim=1)  # (B,)
    beats = (sim >= best[:, None]) & ~pos  # (B, G)
    return beats.sum(dim=1).cpu().numpy().astype(np.int64)


def topk_ranks(
    scores: np.ndarray, positive: np.ndarray, n_positive: np.ndarray, n_gallery: int
) -> np.ndarray:
    """Return the (B,) int64 rank of each query's best positive when only its own top-K are scored.

    ``scores`` (B, K) are each query's scores for its K candidates (distinct gallery items), every
    other gallery item scoring -inf; ``positive`` (B, K) bool marks the candidates that truly
    match; ``n_positive`` (B,) counts each query's true matches in the whole gallery of
    ``n_gallery`` items. Equal to ``relation_ranks`` on the dense (B, G) rows without building
    them: a query whose positives are all outside its top-K (or score -inf) ranks behind every
    non-positive, ``n_gallery - n_positive``; otherwise ties with its best positive count
    against it.
    """
    s = np.asarray(scores)  # (B, K)
    pos = np.asarray(positive, dtype=bool)  # (B, K)
    n_pos = np.asarray(n_positive, dtype=np.int64)  # (B,)
    if s.ndim != 2 or pos.shape != s.shape or n_pos.shape != s.shape[:1]:
        raise ValueError(
            f"scores {s.shape} and positive {pos.shape} must be equal (B, K) and n_positive "
            f"{n_pos.shape} must be (B,); pass one row per query"
        )
    if np.issubdtype(s.dtype, np.floating) and np.isnan(s).any():
        raise ValueError("scores contains NaN scores; check the embeddings for NaN/inf first")
    if (n_pos < 1).any():
        bad = np.flatnonzero(n_pos < 1)[:5].tolist()
        raise ValueError(
            f"query rows {bad} of the chunk have no true match; the relation must hold every "
            "labelled pair (drop queries without one before evaluating)"
        )
    best = np.where(pos, s, -np.inf).max(axis=1, initial=-np.inf)  # (B,)
    beats = ((s >= best[:, None]) & ~pos).sum(axis=1)  # (B,)
    return np.where(best == -np.inf, n_gallery - n_pos, beats).astype(np.int64)


def relation_mask(
    query_rows: ArrayLike, gallery_rows: ArrayLike, start: int, stop: int, n_gallery: int
) -> torch.Tensor:
    """(stop - start, G) bool: the true matches of queries ``start..stop-1`` as a dense block.

    The relation is given as pairs: ``query_rows`` (P,) and ``gallery_rows`` (P,) with query row
    ``query_rows[p]`` matching gallery row ``gallery_rows[p]``, sorted by query row.
    """
    q = np.asarray(query_rows, dtype=np.int64)
    g = np.asarray(gallery_rows, dtype=np.int64)
    lo, hi = np.searchsorted(q, [start, stop])
    mask = torch.zeros((stop - start, n_gallery), dtype=torch.bool)
    mask[torch.from_numpy(q[lo:hi] - start), torch.from_numpy(g[lo:hi])] = True
    return mask


def sort_pairs(image_rows: ArrayLike, caption_rows: ArrayLike, by: str) -> tuple:
    """The relation's pairs ordered for ``relation_mask``: (query rows, gallery rows) where the
    queries are images (``by="image"``, for image->text) or captions (``by="caption"``)."""
    i = np.asarray(image_rows, dtype=np.int64)
    c = np.asarray(caption_rows, dtype=np.int64)
    if i.shape != c.shape or i.ndim != 1:
        raise ValueError(f"image_rows {i.shape} and caption_rows {c.shape} must be equal 1-D")
    q, g = (i, c) if by == "image" else (c, i)
    order = np.lexsort((g, q))
    return q[order], g[order]


def full_relation_metrics(
    sim: ArrayLike, image_rows: ArrayLike, caption_rows: ArrayLike, chunk_size: int = 1024
) -> dict[str, float]:
    """``retrieval_metrics`` keys (percent) where any truly matching item counts as correct.

    ``sim`` (I, T) scores every image against every caption; the relation is its true pairs,
    ``image_rows`` (P,) and ``caption_rows`` (P,) (e.g. from ``Dataset.relation_rows``): an
    image query is correct at K when any caption true of it is in its top K, a caption query
    when any image it is true of is.
    """
    scores = _as_tensor(sim, "sim", 2)  # (I, T)
    n_images, n_captions = scores.shape
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    iq, ig = sort_pairs(image_rows, caption_rows, "image")
    cq, cg = sort_pairs(image_rows, caption_rows, "caption")
    if iq.size and (iq.max() >= n_images or cq.max() >= n_captions or min(iq.min(), cq.min()) < 0):
        raise ValueError(
            f"relation rows must lie within sim's {n_images} images and {n_captions} captions"
        )
    i2t = [
        relation_ranks(
            scores[s : s + chunk_size],
            relation_mask(iq, ig, s, min(s + chunk_size, n_images), n_captions),
        )
        for s in range(0, n_images, chunk_size)
    ]
    t2i = [
        relation_ranks(
            scores[:, s : s + chunk_size].T,
            relation_mask(cq, cg, s, min(s + chunk_size, n_captions), n_images),
        )
        for s in range(0, n_captions, chunk_size)
    ]
    return retrieval_metrics_from_ranks(np.concatenate(i2t), np.concatenate(t2i))


def retrieval_metrics_from_ranks(i2t: ArrayLike, t2i: ArrayLike) -> dict[str, float]:
    """Return R@1/5/10 in percent for both directions plus ``rsum``, from 0-based ranks."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks)
        if r.ndim != 1 or r.size == 0:
            raise ValueError(f"{name} ranks must be a non-empty 1-D array, got shape {r.shape}")
        for k in RECALL_AT:
            out[f"{name}_R@{k}"] = float(100.0 * np.mean(r < k))
    out["rsum"] = float(sum(out[key] for key in METRIC_KEYS[:-1]))
    return out


def retrieval_metrics(
    sim: ArrayLike, caption_to_image: ArrayLike, chunk_size: int = 1024
) -> dict[str, float]:
    """Return ``{i2t_R@1,5,10, t2i_R@1,5,10, rsum}`` (percent) for an (I, T) score matrix.

    ``caption_to_image`` (T,) holds the image index (0..I-1) of every caption; ``chunk_size`` is
    the number of queries ranked at once.
    """
    scores = _as_tensor(sim, "sim", 2)  # (I, T)
    cap_img = _as_tensor(caption_to_image, "caption_to_image", 1).to(scores.device, torch.long)
    n_images, n_captions = scores.shape
    if cap_img.shape[0] != n_captions:
        raise ValueError(
            f"caption_to_image has {cap_img.shape[0]} entries but sim has {n_captions} captions "
            "(columns); sim must be (n_images, n_captions) with one image index per caption"
        )
    if n_images == 0 or n_captions == 0:
        raise ValueError(
            f"sim must have at least one image and one caption, got {tuple(scores.shape)}"
        )
    if cap_img.min() < 0 or cap_img.max() >= n_images:
        raise ValueError(
            f"caption_to_image values must lie in [0, {n_images - 1}] (sim has {n_images} image "
            f"rows), got range [{cap_img.min().item()}, {cap_img.max().item()}]"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    i2t = [
        i2t_ranks(
            scores[s : s + chunk_size], torch.arange(s, min(s + chunk_size, n_images)), cap_img
        )
        for s in range(0, n_images, chunk_size)
    ]
    t2i = [
        t2i_ranks(scores[:, s : s + chunk_size].T, cap_img[s : s + chunk_size])
        for s in range(0, n_captions, chunk_size)
    ]
    return retrieval_metrics_from_ranks(np.concatenate(i2t), np.concatenate(t2i))


def ranks_from_embeddings(
    image: np.ndarray, caption: np.ndarray, caption_to_image: np.ndarray, chunk_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(i2t ranks (N,), t2i ranks (M,)) from unit-norm embeddings, never holding the N x M matrix.

    ``caption_to_image`` (M,) is the row of ``image`` that each caption describes.
    """
    img, cap = torch.from_numpy(image), torch.from_numpy(caption)  # (N, D), (M, D)
    owner = torch.as_tensor(caption_to_image, dtype=torch.long)  # (M,)
    i2t = [
        i2t_ranks(
            img[s : s + chunk_size] @ cap.T, torch.arange(s, min(s + chunk_size, len(img))), owner
        )
        for s in range(0, len(img), chunk_size)
    ]
    t2i = [
        t2i_ranks(cap[s : s + chunk_size] @ img.T, owner[s : s + chunk_size])
        for s in range(0, len(cap), chunk_size)
    ]
    return np.concatenate(i2t), np.concatenate(t2i)
