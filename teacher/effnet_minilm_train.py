"""``cprd train-teacher --base effnet-minilm``: fit the prior, then the fusion, over frozen towers.

1. Tower features of the train and val images and captions, through the feature caches (computed
   once, then read back by every later run).
2. The prior (the dual encoder the teacher is measured against): its two projections fitted by
   ITC on the pooled features; the best of ``prior_epochs`` by val RSUM is kept, then frozen.
   Per fold, a prior fitted as long on the other folds gives the out-of-fold similarities and
   hard negatives the fusion trains on (teacher.effnet_minilm_prior says why).
3. The fusion, w and b on ITM groups: per image and epoch, one caption query (its image, then
   negative images) and one image query (one of its captions, then negative captions), all in
   the image's fold. Negatives: ``num_hard_negatives`` drawn uniformly from the query's top
   ``negative_pool`` under the out-of-fold prior (true matches, identical caption texts included,
   never) plus ``num_random_negatives`` uniform ones. ``itm_loss``: softmax (cross-entropy of the
   positive in its group) or bce (match / no match per pair).
4. After every epoch: val RSUM of the prior and of the teacher re-ranking the prior's top
   ``val_k`` (as ``cprd evaluate --rerank-teacher``: positives beyond it are misses); the best
   epoch by re-rank RSUM is saved.

Letters in shape comments: N images, M captions, B images in a batch, G = 2B query groups, K
negatives per group.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from pipeline.core import atomic, tracking
from pipeline.core.dataset import Dataset
from pipeline.core.metrics import (
    i2t_ranks,
    retrieval_metrics,
    retrieval_metrics_from_ranks,
    t2i_ranks,
)
from pipeline.torchkit import features
from pipeline.torchkit.encode import autocast, pick_device
from teacher.effnet_minilm import (
    MODEL_FILE,
    TEACHER_JSON,
    EffnetMiniLMHead,
    HeadConfig,
    score_pairs_batched,
    teacher_json,
)
from teacher.effnet_minilm_prior import (
    FoldPriors,
    SplitFeatures,
    fit_prior,
    fold_priors,
    prior_embeddings,
    split_features,
)
from teacher.effnet_minilm_towers import Towers
from teacher.train_config import TeacherTrainConfig

log = logging.getLogger(__name__)


class RerankEval:
    """Val RSUM of the prior and of the teacher re-ranking the prior's top-k (fixed pairs)."""

    def __init__(self, head, va: SplitFeatures, k: int, device):
        self.va, self.device = va, device
        image, text = prior_embeddings(head.prior, va, device)
        sim = image @ text.t()  # (N, M)
        self.prior = retrieval_metrics(sim, va.caption_image)
        self.top_c = sim.topk(min(k, sim.shape[1]), dim=1).indices.numpy()  # (N, k)
        self.top_i = sim.t().topk(min(k, sim.shape[0]), dim=1).indices.numpy()  # (M, k)
        n, m = sim.shape
        pairs = np.concatenate(
            [
                np.stack([np.repeat(np.arange(n), self.top_c.shape[1]), self.top_c.ravel()], 1),
                np.stack([self.top_i.ravel(), np.repeat(np.arange(m), self.top_i.shape[1])], 1),
            ]
        )
        self.pairs = np.unique(pairs, axis=0)  # (P, 2) sorted by image: each scored once

    def __call__(self, head, batch_size: int) -> dict[str, float]:
        va = self.va
        scores = score_pairs_batched(
            head, va.maps, va.states, self.pairs[:, 0], self.pairs[:, 1], batch_size, self.device
        )
        n, m = len(va.maps), len(va.states)
        dense = np.full((n, m), -np.inf, dtype=np.float32)  # only pairs in a top-k are finite
        dense[self.pairs[:, 0], self.pairs[:, 1]] = scores
        i2t = np.full_like(dense, -np.inf)
        np.put_along_axis(i2t, self.top_c, np.take_along_axis(dense, self.top_c, 1), 1)
        t2i = np.full((m, n), -np.inf, dtype=np.float32)
        np.put_along_axis(t2i, self.top_i, np.take_along_axis(dense.T, self.top_i, 1), 1)
        owner = torch.as_tensor(va.caption_image)
        return retrieval_metrics_from_ranks(
            i2t_ranks(i2t, torch.arange(n), owner), t2i_ranks(t2i, owner)
        )


def _draw(members: list[np.ndarray], qfold: np.ndarray, n: int, bad, rng) -> np.ndarray:
    """(B, n) items drawn uniformly from each query's fold (``members[qfold[q]]``), redrawn
    where ``bad(items)`` (B, n) marks a true match."""
    out = np.zeros((len(qfold), n), dtype=np.int64)
    redo = np.ones(out.shape, dtype=bool)
    for _ in range(100):  # true matches are rare: a redraw or two clears them
        for f in np.unique(qfold[redo.any(1)]):
            sel = redo & (qfold == f)[:, None]
            out[sel] = members[f][rng.integers(len(members[f]), size=int(sel.sum()))]
        redo = bad(out)
        if not redo.any():
            break
    return out


class GroupSampler:
    """Scored ITM query groups of a batch of train images (see the module docstring, step 3)."""

    def __init__(self, tr: SplitFeatures, folds: FoldPriors, hard: int, rand: int, device):
        self.tr, self.folds, self.device = tr, folds, device
        self.hard, self.rand = hard, rand
        self.positive = tr.positive.numpy()  # (M, N)

    def _negatives(self, pool, queries, qfold, members, bad, rng) -> np.ndarray:
        pick = np.argsort(rng.random((len(queries), pool.shape[1])), axis=1)[:, : self.hard]
        out = [np.take_along_axis(pool[queries], pick, 1)]  # hard: uniform from the pool
        if self.rand:
            out.append(_draw(members, qfold, self.rand, bad, rng))
        return np.concatenate(out, axis=1)  # (B, K)

    def sample(self, rows: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """(image, caption) rows of the 2B * (1 + K) pairs of the groups of image ``rows`` (B,):
        B caption queries, then B image queries, each group positive first."""
        tr, folds, positive = self.tr, self.folds, self.positive
        qfold = folds.fold[rows]  # (B,)
        caps = np.array([rng.choice(tr.captions_of[r]) for r in rows])  # (B,) caption queries
        neg_i = self._negatives(
            folds.pool_c,
            caps,
            qfold,
            folds.fold_images,
            lambda items: positive[caps[:, None], items],
            rng,
        )  # (B, K) images
        pos_c = np.array([rng.choice(tr.captions_of[r]) for r in rows])  # (B,) image queries'
        neg_c = self._negatives(
            folds.pool_i,
            rows,
            qfold,
            folds.fold_captions,
            lambda items: positive[items, rows[:, None]],
            rng,
        )  # (B, K) captions
        k = neg_i.shape[1]
        pair_img = np.concatenate([np.c_[rows, neg_i].ravel(), np.repeat(rows, k + 1)])
        pair_cap = np.concatenate([np.repeat(caps, k + 1), np.c_[pos_c, neg_c].ravel()])
        return pair_img, pair_cap

    def scores(self, head: EffnetMiniLMHead, pairs: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        """(G, 1 + K) scores of the sampled ``pairs``, with the out-of-fold prior cosines."""
        pair_img, pair_cap = pairs
        uniq, index = np.unique(pair_img, return_inverse=True)
        with autocast(self.device):
            scored = head.score(
                head.encode_images(self.tr.maps[uniq].to(self.device)),
                [self.tr.states[c] for c in pair_cap],
                torch.as_tensor(index.reshape(-1), device=self.device),
                cos=self.folds.cos(pair_img, pair_cap).to(self.device),
            )
        return scored["score"].float().view(-1, 1 + self.hard + self.rand)

    def calibrate(self, head: EffnetMiniLMHead, kind: str, rng, steps: int = 300) -> None:
        """Fit w and b alone (fusion 0) to one epoch of groups' out-of-fold prior cosines.

        The prior's ITC temperature overstates how sure its similarities are on unseen pairs
        (the ITM loss starts above chance level); fitted here in a second, w and b would
        otherwise take thousands of steps at the fusion's learning rate to get there.
        """
        pair_img, pair_cap = self.sample(rng.permutation(len(self.tr.maps)), rng)
        cos = self.folds.cos(pair_img, pair_cap).view(-1, 1 + self.hard + self.rand)  # (G, 1+K)
        w = head.w.detach().clone().requires_grad_(True)
        b = head.b.detach().clone().requires_grad_(kind == "bce")  # softmax: b cancels out
        opt = torch.optim.Adam([w, b] if b.requires_grad else [w], lr=0.05)
        for _ in range(steps):
            loss = itm_loss(w * cos + b, kind)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            head.w.copy_(w)
            head.b.copy_(b)


def itm_loss(groups: torch.Tensor, kind: str) -> torch.Tensor:
    """ITM loss of (G, 1 + K) group scores whose column 0 is the positive.

    softmax: mean_g [ logsumexp_j s_gj - s_g0 ] (the positive against its own negatives);
    bce: mean over all pairs of BCE(sigmoid(s), 1 for column 0 else 0).
    """
    if groups.ndim != 2 or groups.shape[1] < 2:
        raise ValueError(f"groups must be (G, 1 + K) with K >= 1, got {tuple(groups.shape)}")
    if kind == "softmax":
        target = torch.zeros(len(groups), dtype=torch.long, device=groups.device)
        return F.cross_entropy(groups, target)
    if kind == "bce":
        labels = torch.zeros_like(groups)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(groups, labels)
    raise ValueError(f"itm loss must be softmax or bce, got {kind!r}")


def train_fusion(
    head: EffnetMiniLMHead,
    tr: SplitFeatures,
    folds: FoldPriors,
    evaluate: RerankEval | None,
    cfg: TeacherTrainConfig,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[dict], int]:
    """Train the fusion, w and b (the prior stays frozen); leave ``head`` at the best epoch by
    val re-rank RSUM (the last without val). Return (one record per epoch, best epoch)."""
    t0, cpu0 = time.time(), time.process_time()
    rng = np.random.default_rng(cfg.seed)
    head.prior.requires_grad_(False)
    with torch.no_grad():  # the score starts as the prior at its ITC temperature ...
        head.w.fill_(1.0 / cfg.itc_temperature)
    hard = min(cfg.num_hard_negatives, folds.pool_c.shape[1], folds.pool_i.shape[1])
    sampler = GroupSampler(tr, folds, hard, cfg.num_random_negatives, device)
    sampler.calibrate(head, cfg.itm_loss, rng)  # ... recalibrated to unseen pairs
    log.info("calibrated prior term: w %.3f b %.3f", head.w.item(), head.b.item())
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr.maps) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    history, best, step = [], (-math.inf, None, 0), 0
    bar = tqdm(total=total, desc="train-teacher", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        head.train()
        sums, epoch_start = {"itm": 0.0, "itm_acc": 0.0}, step
        for rows in np.array_split(rng.permutation(len(tr.maps)), steps_per_epoch):
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step, total)
            groups = sampler.scores(head, sampler.sample(rows, rng))  # (G, 1 + K), positive 1st
            loss = itm_loss(groups, cfg.itm_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

            step += 1
            sums["itm"] += float(loss.detach())
            sums["itm_acc"] += float((groups.detach().argmax(1) == 0).float().mean())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, itm=f"{float(loss.detach()):.3f}")
        n_steps = max(1, step - epoch_start)
        record = {"epoch": epoch + 1, "step": step, "lr": cfg.lr_at(max(step - 1, 0), total)}
        record.update({f"train_{k}": round(v / n_steps, 4) for k, v in sums.items()})
        record["w"], record["b"] = round(head.w.item(), 4), round(head.b.item(), 4)
        if evaluate is not None:
            head.eval()
            record.update(_prefixed("prior", evaluate.prior))
            record.update(_prefixed("rerank", evaluate(head, cfg.batch_size * 4)))
        record["seconds"] = round(time.time() - t0, 1)
        record["cpu_seconds"] = round(time.process_time() - cpu0, 1)
        history.append(record)
        tracking.report(cfg.out, {"event": "fusion", **record})
        log.info("epoch %d: %s", epoch + 1, record)
        if progress:
            tqdm.write(_epoch_line(record))
        score = record.get("rerank_rsum", float(epoch))  # without val: the last epoch
        if score > best[0]:
            best = (score, copy.deepcopy(head.state_dict()), epoch + 1)
        if step >= total:
            break
    bar.close()
    if best[1] is not None:
        head.load_state_dict(best[1])
    head.eval()
    return history, best[2]


def train_effnet_minilm(cfg: TeacherTrainConfig, progress: bool = True) -> dict:
    """Train the effnet-minilm teacher, save it to ``cfg.out``; return a summary."""
    out = Path(cfg.out)
    atomic.check_out(out, cfg.overwrite, TEACHER_JSON)  # fail before minutes of work
    ds = Dataset.load(cfg.data)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0, cpu0 = time.time(), time.process_time()
    tracking.enable(cfg.out, cfg.report_to, cfg.report_dir)

    # ---- 1. tower features, from the cache where present
    tw = Towers(cfg.feature_cache or features.default_root(), device)
    tr = split_features(tw, ds, "train", None, progress)
    va = None
    if cfg.val_images and ds.meta["counts"]["val"]["images"]:
        va = split_features(tw, ds, "val", cfg.val_images, progress)
    cache_stats = {"image": tw.image_store.stats(), "text": tw.text_store.stats()}
    log.info("feature cache: %s", cache_stats)
    feature_seconds = round(time.time() - t0, 1)

    # ---- 2. the prior on all images (best val epoch), then as long per fold
    head_cfg = HeadConfig(
        embed_dim=cfg.embed_dim,
        fusion_dim=cfg.fusion_dim,
        fusion_layers=cfg.fusion_layers,
        fusion_heads=cfg.fusion_heads,
        dropout=cfg.dropout,
    )
    head = EffnetMiniLMHead(head_cfg).to(device)
    prior_log = fit_prior(head.prior, tr, va, cfg.prior_epochs, cfg, device, progress)
    for record in prior_log:  # the prior's epochs come first, on their own step axis
        tracking.report(cfg.out, {"event": "prior", "step": record.get("prior_epoch", 0), **record})
    prior_epochs = cfg.prior_epochs
    if va is not None and prior_log:
        prior_epochs = max(prior_log, key=lambda r: r["prior_rsum"])["prior_epoch"]
    folds = fold_priors(
        tr, head.prior, prior_epochs, cfg.prior_folds, cfg.negative_pool, cfg, device, progress
    )
    prior_seconds = round(time.time() - t0 - feature_seconds, 1)

    # ---- 3. the fusion (and w, b) on ITM groups, validated every epoch
    evaluate = RerankEval(head, va, cfg.val_k, device) if va is not None else None
    history, best_epoch = train_fusion(head, tr, folds, evaluate, cfg, device, progress)
    _save(cfg, out, head, tw, [*prior_log, *history])
    tracking.close(cfg.out)
    return {
        "out": str(out),
        "base": cfg.base,
        "device": str(device),
        "parameters_M": round(sum(p.numel() for p in head.parameters()) / 1e6, 3),
        "steps": history[-1]["step"] if history else 0,
        "best_epoch": best_epoch,
        "prior_epochs": prior_epochs,
        "feature_seconds": feature_seconds,
        "prior_seconds": prior_seconds,
        "feature_cache": cache_stats,
        "train_seconds": round(time.time() - t0, 1),
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "epochs": history,
        "final": next((r for r in history if r["epoch"] == best_epoch), {}),
    }


def _save(cfg, out: Path, head: EffnetMiniLMHead, tw: Towers, history: list[dict]) -> None:
    """Head weights, description, config and metrics land together in one rename."""
    with atomic.atomic_dir(out, overwrite=cfg.overwrite, expect=TEACHER_JSON) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        atomic.write_bytes(tmp / MODEL_FILE, safetensors_bytes(state))
        atomic.write_json(tmp / TEACHER_JSON, teacher_json(head.cfg, tw))
        atomic.write_json(tmp / "train_config.json", dataclasses.asdict(cfg))
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
        atomic.write_bytes(tmp / "metrics.jsonl", lines.encode())


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}_{k}": round(v, 2) for k, v in metrics.items()}


def _epoch_line(r: dict) -> str:
    parts = [f"epoch {r['epoch']}"]
    if "train_itm" in r:
        parts += [f"itm {r['train_itm']:.3f}", f"acc {r['train_itm_acc']:.3f}", f"w {r['w']:.2f}"]
    for key in ("prior_rsum", "rerank_rsum"):
        if key in r:
            parts.append(f"{key} {r[key]:.1f}")
    return "  ".join(parts) + (f"  ({r['seconds']}s)" if "seconds" in r else "")
