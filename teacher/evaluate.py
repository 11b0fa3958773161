"""Validation of a teacher during training: ITC retrieval, ITM re-ranking, and binding.

Three views, each cheap enough for every epoch on CPU:
- ``itc_*``: full retrieval recall of the contrastive (dual-encoder) similarities;
- ``itm_{i2t,t2i}_R@1``: the ITM head re-ranking the ITC top ``k`` (BLIP's retrieval protocol;
  a positive outside the top ``k`` counts as a miss);
- ``hard_{i2t,t2i}_R@1``: ITM R@1 among an image's lexical neighbours (images whose captions use
  nearly the same words). On the demo data these are its contrast group, so only a teacher that
  binds attributes to objects beats chance (1 / neighbourhood size);
- with ``match`` (the dataset's full caption-image relation), ``itm_full_*`` and ``hard_full_*``:
  the same R@1 where any truly matching item counts, so a teacher that ranks another true match
  of an under-specified caption first is not counted wrong.

Letters in shape comments: N images, M captions, V image tokens, D hidden width, E embedding width.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from pipeline.core.metrics import retrieval_metrics
from pipeline.torchkit.encode import autocast
from teacher.model import itm_log_odds, itm_logits


@torch.no_grad()
def encode_blip(
    model: BlipForImageTextRetrieval,
    load_pixels: Callable[[np.ndarray], torch.Tensor],
    n_images: int,
    tokens: dict[str, torch.Tensor],
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V, D) image tokens, (N, E) and (M, E) unit-norm ITC features of a split."""
    embeds, img_feat, txt_feat = [], [], []
    for s in range(0, n_images, batch_size):
        with autocast(device):
            e = model.vision_model(
                pixel_values=load_pixels(np.arange(s, min(s + batch_size, n_images))).to(device)
            ).last_hidden_state  # (B, V, D)
            img_feat.append(F.normalize(model.vision_proj(e[:, 0, :]).float(), dim=-1))
        embeds.append(e.float())
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    for s in range(0, ids.shape[0], batch_size):
        with autocast(device):
            cls = model.text_encoder(
                input_ids=ids[s : s + batch_size], attention_mask=mask[s : s + batch_size]
            ).last_hidden_state[:, 0, :]
            txt_feat.append(F.normalize(model.text_proj(cls).float(), dim=-1))
    return torch.cat(embeds), torch.cat(img_feat), torch.cat(txt_feat)


@torch.no_grad()
def score_rows(
    model: BlipForImageTextRetrieval,
    image_embeds: torch.Tensor,
    tokens: dict[str, torch.Tensor],
    pairs: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """(P,) ITM log-odds of a match of (image row, caption row) ``pairs`` (P, 2)."""
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    out = []
    for s in range(0, len(pairs), batch_size):
        p = torch.as_tensor(pairs[s : s + batch_size], device=device)
        with autocast(device):
            logits = itm_logits(model, image_embeds[p[:, 0]], ids[p[:, 1]], mask[p[:, 1]])
        out.append(itm_log_odds(logits).cpu().numpy())  # what the cache stores and ranks by
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _hit(scores: np.ndarray, positive: np.ndarray) -> bool:
    """Whether the best positive strictly beats every negative (ties count against the query)."""
    if not positive.any():
        return False
    best_negative = scores[~positive].max() if (~positive).any() else -np.inf
    return bool(scores[positive].max() > best_negative)


@torch.no_grad()
def evaluate_teacher(
    model: BlipForImageTextRetrieval,
    load_pixels: Callable[[np.ndarray], torch.Tensor],
    tokens: dict[str, torch.Tensor],
    caption_image: np.ndarray,
    neighbours: np.ndarray,
    *,
    k: int = 8,
    batch_size: int = 128,
    device: torch.device,
    match: np.ndarray | None = None,
) -> dict[str, float]:
    """ITC recall, ITM R@1 over the ITC top ``k``, and ITM R@1 among lexical neighbours.

    ``load_pixels(rows)`` returns the processed images of rows 0..N-1; ``tokens`` the M
    tokenised captions, ``caption_image`` (M,) the image row of each; ``neighbours`` (N, G) the
    lexical neighbours of each image (-1 = none); ``match`` (N, M) bool, optional, every true
    image-caption match (it must hold the labelled pairs): adds the ``*_full_*`` R@1.
    """
    model.eval()
    n = neighbours.shape[0]
    embeds, img_feat, txt_feat = encode_blip(model, load_pixels, n, tokens, batch_size, device)
    sim = (img_feat @ txt_feat.t()).cpu()  # (N, M)
    out = {f"itc_{key}": v for key, v in retrieval_metrics(sim, caption_image).items()}

    captions_of = [np.flatnonzero(caption_image == i) for i in range(n)]
    k_t, k_i = min(k, sim.shape[1]), min(k, n)
    top_t = sim.topk(k_t, dim=1).indices.numpy()  # (N, k) captions per image
    top_i = sim.t().topk(k_i, dim=1).indices.numpy()  # (M, k) images per caption
    hood = [np.concatenate([[i], nb[nb >= 0]]) for i, nb in enumerate(neighbours)]

    # Score every pair any of the four protocols needs, once.
    wanted = {(i, int(c)) for i in range(n) for c in top_t[i]}
    wanted |= {(int(i), c) for c in range(len(caption_image)) for i in top_i[c]}
    wanted |= {(int(j), c) for i in range(n) for j in hood[i] for c in captions_of[i]}
    wanted |= {(i, int(c)) for i in range(n) for j in hood[i] for c in captions_of[j]}
    pairs = np.array(sorted(wanted), dtype=np.int64).reshape(-1, 2)
    logits = score_rows(model, embeds, tokens, pairs, batch_size, device)
    lookup = dict(zip(map(tuple, pairs.tolist()), logits.tolist(), strict=True))

    def itm(images: np.ndarray, captions: np.ndarray) -> np.ndarray:
        return np.array([lookup[(int(i), int(c))] for i, c in zip(images, captions, strict=True)])

    m = len(caption_image)
    for name, fits in (("", None), ("full_", match)):
        if name and fits is None:
            continue

        def i2t_hit(i: int, cands: np.ndarray, fits=fits) -> bool:
            positive = caption_image[cands] == i if fits is None else fits[i, cands]
            return _hit(itm(np.full(len(cands), i), cands), positive)

        def t2i_hit(c: int, cands: np.ndarray, fits=fits) -> bool:
            positive = cands == caption_image[c] if fits is None else fits[cands, c]
            return _hit(itm(cands, np.full(len(cands), c)), positive)

        out[f"itm_{name}i2t_R@1"] = 100.0 * np.mean([i2t_hit(i, top_t[i]) for i in range(n)])
        out[f"itm_{name}t2i_R@1"] = 100.0 * np.mean([t2i_hit(c, top_i[c]) for c in range(m)])
        out[f"hard_{name}i2t_R@1"] = 100.0 * np.mean(
            [i2t_hit(i, np.concatenate([captions_of[j] for j in hood[i]])) for i in range(n)]
        )
        out[f"hard_{name}t2i_R@1"] = 100.0 * np.mean(
            [t2i_hit(c, hood[caption_image[c]]) for c in range(m)]
        )
    out["hard_chance_R@1"] = 100.0 * np.mean([1.0 / len(h) for h in hood])
    return {key: round(float(v), 3) for key, v in out.items()}
