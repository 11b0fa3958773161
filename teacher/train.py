"""``cprd train-teacher``: train (or fine-tune) a BLIP image-text-matching cross-encoder.

BLIP's retrieval objective: ITC on the unimodal [CLS] projections plus ITM (match / no match)
on in-batch hard negatives mined from the ITC similarities. Batches are built from lexical
neighbours (teacher.batches) so that the hard negatives are images and captions that share
words, which is what forces the model to bind attributes to objects. No momentum encoder or
queue (BLIP's ITC extras): at the demo scale the in-batch negatives are enough.

The output directory is a ``save_pretrained`` model plus processor, so ``load_teacher(out)``
loads it exactly like a hub checkpoint; ``train_config.json`` and ``metrics.jsonl`` sit beside.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.core import atomic, tracking
from pipeline.core.dataset import Dataset
from pipeline.torchkit.encode import autocast, pick_device, with_precision
from teacher.batches import lexical_neighbours, neighbour_batches
from teacher.evaluate import evaluate_teacher
from teacher.losses import blip_losses
from teacher.model import load_teacher, max_text_length
from teacher.tiny import build_tiny_teacher
from teacher.train_config import TeacherTrainConfig

log = logging.getLogger(__name__)


class _Split:
    """One split's image paths and captions, with pixel loading and tokenisation helpers.

    ``fits`` holds the (image row, caption row) pairs that truly match: the dataset's full
    caption-image relation when ``labels`` is "relation" and the dataset has one, else each
    caption's own image (the labels).
    """

    def __init__(self, ds: Dataset, name: str, max_images: int | None = None, labels: str = ""):
        images, captions = ds.split(name)
        # An image without captions has no positive pair: it can be neither query nor negative.
        with_captions = images.filter(pl.col("image_id").is_in(captions["image_id"].implode()))
        if with_captions.height < images.height:
            log.warning(
                "%s: %d images without captions skipped", name, images.height - with_captions.height
            )
        images = with_captions.head(max_images) if max_images else with_captions
        captions = captions.filter(pl.col("image_id").is_in(images["image_id"].implode()))
        row_of = {int(i): r for r, i in enumerate(images["image_id"])}
        self.paths = [ds.image_path(p) for p in images["path"]]
        self.texts = captions["caption"].to_list()
        self.caption_image = np.array([row_of[int(i)] for i in captions["image_id"]])  # (M,)
        self.captions_of = [[] for _ in self.paths]
        for c, r in enumerate(self.caption_image):
            self.captions_of[r].append(c)
        rows = ds.relation_rows(images, captions) if labels == "relation" else None
        if rows is None:
            rows = (self.caption_image, np.arange(len(self.caption_image)))
        self.fits = set(zip(rows[0].tolist(), rows[1].tolist(), strict=True))

    def fit_matrix(self, rows: np.ndarray, caps: list[int]) -> torch.Tensor:
        """(B, B) bool: image ``rows[a]`` truly matches caption ``caps[b]``."""
        return torch.tensor([[(int(r), c) in self.fits for c in caps] for r in rows])

    def match_matrix(self) -> np.ndarray:
        """(N, M) bool over the whole split: which captions truly match which images."""
        out = np.zeros((len(self.paths), len(self.texts)), dtype=bool)
        if self.fits:
            out[tuple(np.array(sorted(self.fits)).T)] = True
        return out

    def pixels(self, processor, rows: np.ndarray) -> torch.Tensor:
        images = []
        for r in rows:
            with Image.open(self.paths[int(r)]) as im:
                images.append(im.convert("RGB"))
        return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _tokenize(processor, model, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(
        processor.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=max_text_length(model, processor.tokenizer),
            return_tensors="pt",
            return_token_type_ids=False,
        )
    )


def _build_model(cfg: TeacherTrainConfig, train_texts: list[str]):
    """A fresh tiny BLIP, or the base checkpoint unfrozen for fine-tuning."""
    if cfg.base == "tiny":
        torch.manual_seed(cfg.seed)
        model, processor = build_tiny_teacher(
            train_texts,
            cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            vision_layers=cfg.vision_layers,
            text_layers=cfg.text_layers,
        )
        # ITM starts at its class prior (1 positive per 2 * negatives-per-query negatives), so
        # its first steps go into using the image rather than into learning the base rate.
        negatives = 2 * (cfg.num_hard_negatives + cfg.num_random_negatives)
        with torch.no_grad():
            model.itm_head.bias.copy_(torch.tensor([0.0, -math.log(negatives)]))
        return model, processor
    base = load_teacher(cfg.base, device="cpu")
    return base.model.requires_grad_(True), base.processor


@with_precision
def train_teacher(cfg: TeacherTrainConfig, progress: bool = True) -> dict:
    """Train the teacher, save it to ``cfg.out``; return a summary with per-epoch metrics."""
    if cfg.base == "effnet-minilm":  # a cross-encoder over frozen pretrained towers
        from teacher.effnet_minilm_train import train_effnet_minilm

        return train_effnet_minilm(cfg, progress=progress)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(
            f"output '{out}' already exists; choose another --out or pass --overwrite"
        )
    ds = Dataset.load(cfg.data)
    if cfg.labels == "relation" and ds.relation is None:
        log.info("positives: each caption's own image (the dataset has no relation file)")
    elif cfg.labels == "relation":
        log.info("positives: the dataset's full caption-image relation (%s)", ds.meta["relation"])
    else:
        log.info("positives: each caption's own image (--labels captions)")
    train = _Split(ds, "train", labels=cfg.labels)
    val = None
    if cfg.val_images and ds.meta["counts"]["val"]["images"]:
        val = _Split(ds, "val", cfg.val_images, labels="relation")  # scored on both label sets
    device = pick_device(cfg.device)
    tracking.enable(cfg.out, cfg.report_to, cfg.report_dir)
    model, processor = _build_model(cfg, train.texts)
    model.to(device).train()
    log.info("teacher: %s, %.2fM parameters, on %s", cfg.base, _millions(model), device)

    # Lexical neighbours decide which images share a batch (train) and the binding test (val).
    train_nb = lexical_neighbours(
        [[train.texts[c] for c in cs] for cs in train.captions_of], k=2 * cfg.group_size
    )
    val_nb = None
    if val is not None:
        val_nb = lexical_neighbours(
            [[val.texts[c] for c in cs] for cs in val.captions_of], k=cfg.group_size - 1
        )
        val_tokens = _tokenize(processor, model, val.texts)
        # Scored on the labels and, when the dataset knows more, on the full relation too.
        val_match = val.match_matrix() if ds.relation is not None else None

    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train.paths) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    history, step, t0, cpu0 = [], 0, time.time(), time.process_time()
    bar = tqdm(total=total, desc="train-teacher", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        model.train()
        sums, epoch_start = {"itc": 0.0, "itm": 0.0, "itm_acc": 0.0}, step
        batches = neighbour_batches(train_nb, cfg.batch_size, cfg.group_size, rng)
        # Curriculum: from scratch, the cross-attention first has to learn to look at the image
        # at all; sibling negatives (same words) give it nothing to learn from until it does.
        easy = epoch < cfg.easy_epochs and cfg.base == "tiny"
        n_random = max(1, cfg.num_random_negatives) if easy else cfg.num_random_negatives
        for rows in batches:
            if step >= total:
                break
            if len(rows) < 2:
                continue  # a lone pair has no in-batch negative
            lr = cfg.lr_at(step, total)
            for group in opt.param_groups:
                group["lr"] = lr

            # One random caption per image; identical texts of different images are positives
            # too (a caption cannot be a negative for an image it describes word for word), and
            # so is every pair the relation says matches: never an ITC or ITM negative.
            caps = [train.captions_of[r][rng.integers(len(train.captions_of[r]))] for r in rows]
            texts = [train.texts[c] for c in caps]
            same_image = torch.as_tensor(rows[:, None] == rows[None, :])
            same_text = torch.tensor([[a == b for b in texts] for a in texts])
            same_text |= train.fit_matrix(rows, caps)
            tok = _tokenize(processor, model, texts)
            with autocast(device):
                terms = blip_losses(
                    model,
                    train.pixels(processor, rows).to(device),
                    tok["input_ids"].to(device),
                    tok["attention_mask"].to(device),
                    (same_image | same_text).to(device),
                    temperature=cfg.itc_temperature,
                    num_hard_negatives=0 if easy else cfg.num_hard_negatives,
                    num_random_negatives=n_random,
                    generator=gen,
                )
            loss = terms["itc"] + cfg.itm_weight * terms["itm"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

            step += 1
            for key in sums:
                sums[key] += float(terms[key].detach())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, itc=f"{terms['itc']:.3f}", itm=f"{terms['itm']:.3f}")
        n_steps = max(1, step - epoch_start)
        record = {"epoch": epoch + 1, "step": step, "lr": cfg.lr_at(max(step - 1, 0), total)}
        record.update({f"train_{k}": round(v / n_steps, 4) for k, v in sums.items()})
        if val is not None:
            record.update(
                evaluate_teacher(
                    model,
                    lambda rows: val.pixels(processor, rows),
                    val_tokens,
                    val.caption_image,
                    val_nb,
                    k=cfg.val_k,
                    device=device,
                    match=val_match,
                )
            )
        record["seconds"] = round(time.time() - t0, 1)
        record["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # all threads of this process
        history.append(record)
        tracking.report(cfg.out, {"event": "epoch", **record})
        log.info("epoch %d: %s", epoch + 1, record)
        if progress:
            tqdm.write(_epoch_line(record))
        if step >= total:
            break
    bar.close()

    trained_on = {
        "dataset_fingerprint": ds.fingerprint,
        "source": ds.meta.get("source", {}),
        "relation": ds.meta.get("relation"),
        "labels": cfg.labels if ds.relation is not None else "captions",
    }
    _save(cfg, out, model, processor, history, trained_on)
    tracking.close(cfg.out)
    return {
        "out": str(out),
        "base": cfg.base,
        "device": str(device),
        "parameters_M": round(_millions(model), 3),
        "steps": step,
        "train_seconds": round(time.time() - t0, 1),
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "epochs": history,
        "final": history[-1] if history else {},
    }


def _save(
    cfg: TeacherTrainConfig, out: Path, model, processor, history: list[dict], trained_on: dict
) -> None:
    """Model, processor, config, metrics and the data it learnt from (``trained_on.json``: the
    dataset's fingerprint and source, e.g. the demo generator's version) land in one rename."""
    model.eval()
    with atomic.atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        atomic.write_json(tmp / "train_config.json", dataclasses.asdict(cfg))
        atomic.write_json(tmp / "trained_on.json", trained_on)
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
        atomic.write_bytes(tmp / "metrics.jsonl", lines.encode())


def _millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _epoch_line(r: dict) -> str:
    parts = [
        f"epoch {r['epoch']}",
        f"itc {r['train_itc']:.3f}",
        f"itm {r['train_itm']:.3f}",
        f"itm_acc {r['train_itm_acc']:.3f}",
    ]
    for key in (
        "itc_rsum",
        "itm_i2t_R@1",
        "itm_t2i_R@1",
        "hard_i2t_R@1",
        "hard_t2i_R@1",
        "hard_full_i2t_R@1",
        "hard_full_t2i_R@1",
    ):
        if key in r:
            parts.append(f"{key} {r[key]:.1f}")
    return "  ".join(parts) + f"  ({r['seconds']}s)"
