"""Training data of the ``effnet-minilm`` teacher: split features, the prior's ITC fit, and the
out-of-fold prior similarities and hard negatives the fusion trains on.

Why out of fold: the prior's two projections memorise the training pairs within two epochs
(Flickr8k-3k: train RSUM about 490 on 2,000 images, val about 232 on 500). Trained on those
similarities, the fusion and its weight w learn to trust a prior that is far less reliable on
unseen pairs, and re-ranking falls below the prior on val. So the images are split into
``prior_folds`` folds; a prior fitted without fold f gives the similarities of fold f's pairs and
mines their hard negatives within fold f (a gallery of N / folds images, like val's). The saved
teacher uses the prior fitted on all training images.

Letters in shape comments: N images, M captions, E prior embedding width, W pool width.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.core.dataset import Dataset
from pipeline.core.metrics import retrieval_metrics
from pipeline.torchkit import features
from teacher.effnet_minilm import Prior
from teacher.effnet_minilm_towers import Towers, pad_texts
from teacher.losses import blip_itc_loss

log = logging.getLogger(__name__)

PRIOR_BATCH = 256  # captions per ITC step of the prior (with their images)


@dataclasses.dataclass
class SplitFeatures:
    """One split's cached tower features and its caption-image structure."""

    maps: torch.Tensor  # (N, V, C) fp16
    states: list[torch.Tensor]  # M captions' (L, T) fp16 states
    caption_image: np.ndarray  # (M,) image row of each caption
    captions_of: list[list[int]]  # caption rows of each image
    positive: torch.Tensor  # (M, N) bool: the image has this caption's text (own image included)

    def subset(self, rows: np.ndarray) -> tuple[SplitFeatures, np.ndarray]:
        """(the features of image ``rows`` and their captions, those captions' rows here)."""
        caps = np.array([c for r in rows for c in self.captions_of[r]], dtype=np.int64)
        new_row = np.full(len(self.maps), -1)
        new_row[rows] = np.arange(len(rows))
        caption_image = new_row[self.caption_image[caps]]
        captions_of: list[list[int]] = [[] for _ in rows]
        for c, r in enumerate(caption_image):
            captions_of[r].append(c)
        sub = SplitFeatures(
            maps=self.maps[torch.as_tensor(rows)],
            states=[self.states[c] for c in caps],
            caption_image=caption_image,
            captions_of=captions_of,
            positive=self.positive[torch.as_tensor(caps)][:, torch.as_tensor(rows)],
        )
        return sub, caps


def split_features(
    tw: Towers, ds: Dataset, name: str, max_images: int | None, progress: bool
) -> SplitFeatures:
    """The features of split ``name`` (its first ``max_images`` images that have captions)."""
    images, captions = ds.split(name)
    images = images.filter(pl.col("image_id").is_in(captions["image_id"].implode()))
    images = images.head(max_images) if max_images else images
    captions = captions.filter(pl.col("image_id").is_in(images["image_id"].implode()))
    paths = [ds.image_path(p) for p in images["path"]]
    row_of = {int(i): r for r, i in enumerate(images["image_id"])}
    caption_image = np.array([row_of[int(i)] for i in captions["image_id"]], dtype=np.int64)
    texts = captions["caption"].to_list()

    def load(rows: list[int]) -> list[Image.Image]:
        out = []
        for r in rows:
            with Image.open(paths[r]) as im:
                out.append(im.convert("RGB"))
        return out

    bar = tqdm(range(len(paths)), desc=f"{name} image keys", unit="img", disable=not progress)
    keys = [features.image_key(load([r])[0]) for r in bar]
    with tqdm(desc=f"{name} image features", unit="img", disable=not progress) as bar:
        maps = tw.image_features(keys, load, progress=bar.update)
    with tqdm(desc=f"{name} caption features", unit="cap", disable=not progress) as bar:
        states = tw.text_features(texts, progress=bar.update)

    captions_of: list[list[int]] = [[] for _ in paths]
    for c, r in enumerate(caption_image):
        captions_of[r].append(c)
    # A caption is a true match of every image that has a caption with the very same text.
    images_of_text: dict[str, list[int]] = {}
    for t, r in zip(texts, caption_image, strict=True):
        images_of_text.setdefault(t, []).append(int(r))
    positive = torch.zeros(len(texts), len(paths), dtype=torch.bool)
    for c, t in enumerate(texts):
        positive[c, images_of_text[t]] = True
    return SplitFeatures(
        maps=torch.from_numpy(np.stack(maps)),
        states=[torch.from_numpy(s) for s in states],
        caption_image=caption_image,
        captions_of=captions_of,
        positive=positive,
    )


@torch.no_grad()
def prior_embeddings(
    prior: Prior, f: SplitFeatures, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) image and (M, E) caption unit-norm embeddings of the prior, on CPU."""
    image = [prior.embed_image(f.maps[s : s + 512].to(device)) for s in range(0, len(f.maps), 512)]
    text = []
    for s in range(0, len(f.states), 1024):
        states, mask = pad_texts(f.states[s : s + 1024])
        text.append(prior.embed_text(states.to(device), mask.to(device)))
    return torch.cat(image).float().cpu(), torch.cat(text).float().cpu()


def fit_prior(
    prior: Prior,
    tr: SplitFeatures,
    va: SplitFeatures | None,
    epochs: int,
    cfg,
    device: torch.device,
    progress: bool = False,
) -> list[dict]:
    """Fit the prior's projections by ITC for ``epochs``; with ``va``, keep the best epoch by val
    RSUM. Return one record per epoch."""
    pooled = tr.maps.float().mean(1).to(device)  # (N, C)
    text_mean = torch.stack([s.float().mean(0) for s in tr.states]).to(device)  # (M, T)
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.prior_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    positive = tr.positive.to(device)
    caption_image = torch.as_tensor(tr.caption_image, device=device)
    history, best = [], (-1.0, None)
    for epoch in tqdm(range(epochs), desc="prior (ITC)", disable=not progress):
        order = torch.randperm(len(tr.states), generator=gen).to(device)
        total = 0.0
        for s in range(0, len(order), PRIOR_BATCH):
            caps = order[s : s + PRIOR_BATCH]  # (B,)
            imgs = caption_image[caps]  # (B,) image of each caption
            image = F.normalize(prior.image_proj(pooled[imgs]), dim=-1)  # (B, E)
            text = F.normalize(prior.text_proj(text_mean[caps]), dim=-1)  # (B, E)
            sim = image @ text.t() / cfg.itc_temperature  # (B, B)
            loss = blip_itc_loss(sim, positive[caps][:, imgs].t())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        steps = math.ceil(len(order) / PRIOR_BATCH)
        record = {"prior_epoch": epoch + 1, "itc": round(total / steps, 4)}
        if va is not None:
            image, text = prior_embeddings(prior, va, device)
            metrics = retrieval_metrics(image @ text.t(), va.caption_image)
            record.update({f"prior_{k}": round(v, 2) for k, v in metrics.items()})
            if metrics["rsum"] > best[0]:
                best = (metrics["rsum"], copy.deepcopy(prior.state_dict()))
        history.append(record)
        log.info("prior %s", record)
    if best[1] is not None:
        prior.load_state_dict(best[1])
    return history


@dataclasses.dataclass
class FoldPriors:
    """Out-of-fold prior similarities and hard negatives of the training pairs.

    A caption and an image only meet (as a pair or a negative) inside one fold, where both were
    unseen by the prior that embedded them.
    """

    image_emb: torch.Tensor  # (N, E) each image embedded by the prior that did not see its fold
    text_emb: torch.Tensor  # (M, E) each caption likewise
    pool_c: np.ndarray  # (M, W) hard negative images of each caption, best first (global rows)
    pool_i: np.ndarray  # (N, W') hard negative captions of each image
    fold_images: list[np.ndarray]  # image rows of each fold
    fold_captions: list[np.ndarray]  # caption rows of each fold
    fold: np.ndarray  # (N,) fold of each image

    def cos(self, images: np.ndarray, captions: np.ndarray) -> torch.Tensor:
        """(P,) prior cosine of pairs (images[p], captions[p]) of one fold each."""
        return (self.image_emb[images] * self.text_emb[captions]).sum(-1)


def fold_priors(
    tr: SplitFeatures,
    full: Prior,
    epochs: int,
    folds: int,
    pool: int,
    cfg,
    device: torch.device,
    progress: bool = False,
) -> FoldPriors:
    """Fit a prior per fold on the other folds (``epochs`` each; ``folds`` = 1: use ``full``, the
    prior fitted on all images, in sample) and mine each fold's hard negatives."""
    n, m = len(tr.maps), len(tr.states)
    fold = np.random.default_rng(cfg.seed).permutation(n) % folds
    image_emb = torch.zeros(n, full.image_proj.out_features)
    text_emb = torch.zeros(m, full.image_proj.out_features)
    members = [np.flatnonzero(fold == f) for f in range(folds)]
    subsets = [tr.subset(rows) for rows in members]
    # Widest pool that holds no true match of any query in any fold.
    width_c = min([pool] + [len(s.maps) - int(s.positive.sum(1).max()) for s, _ in subsets])
    width_i = min([pool] + [len(s.states) - int(s.positive.sum(0).max()) for s, _ in subsets])
    if min(width_c, width_i) < 1:
        raise ValueError(
            f"{len(tr.maps)} training images in {folds} folds leave some query without a "
            "negative; pass a smaller --prior-folds"
        )
    pool_c = np.zeros((m, width_c), dtype=np.int64)
    pool_i = np.zeros((n, width_i), dtype=np.int64)
    for f in tqdm(range(folds), desc="fold priors", disable=not progress or folds == 1):
        (held, caps), rows = subsets[f], members[f]
        prior = full
        if folds > 1:
            rest, _ = tr.subset(np.flatnonzero(fold != f))
            torch.manual_seed(cfg.seed + 1 + f)
            prior = Prior(full.image_proj.out_features).to(device)
            fit_prior(prior, rest, None, epochs, cfg, device)
        image, text = prior_embeddings(prior, held, device)
        image_emb[rows], text_emb[caps] = image, text
        sim = (text @ image.t()).masked_fill(held.positive, -torch.inf)  # (M_f, N_f)
        pool_c[caps] = rows[sim.topk(width_c, dim=1).indices.numpy()]
        pool_i[rows] = caps[sim.t().topk(width_i, dim=1).indices.numpy()]
    return FoldPriors(
        image_emb=image_emb,
        text_emb=text_emb,
        pool_c=pool_c,
        pool_i=pool_i,
        fold_images=members,
        fold_captions=[caps for _, caps in subsets],
        fold=fold,
    )
