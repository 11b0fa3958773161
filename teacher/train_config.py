"""The options of ``cprd train-teacher``: one frozen dataclass, one CLI flag per field.

Kept apart from the training code (and its torch/transformers imports) so that `cprd --help`
can read it instantly; written as ``train_config.json`` next to the trained teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Options left unset (None) take their base's default: the effnet-minilm head trains on cached
# features in ~40 s epochs (Flickr8k-3k, 2 CPU cores) and overfits after 3-4 of them.
DEFAULTS = {"epochs": 12, "lr": 1e-3, "warmup": 100, "val_images": 400, "val_k": 8}
BASE_DEFAULTS = {
    "effnet-minilm": {"epochs": 4, "lr": 2e-3, "warmup": 30, "val_images": 1000, "val_k": 16},
}


@dataclass(frozen=True)
class TeacherTrainConfig:
    data: str  # dataset directory (cprd import-data / demo-data)
    out: str  # output directory: a BLIP save_pretrained dir, written atomically
    base: str = "tiny"  # "tiny", "effnet-minilm" (frozen pretrained towers), or a BLIP id / dir
    epochs: int | None = None  # passes over the training images (default 12; effnet-minilm 4)
    batch_size: int = 64  # images per batch (each with one caption)
    lr: float | None = None  # peak AdamW lr (default 1e-3; effnet-minilm 2e-3; BLIP tuning ~1e-5)
    weight_decay: float = 0.05  # AdamW weight decay
    warmup: int | None = None  # linear warm-up steps, then cosine decay to 0 (default 100; 30)
    seed: int = 0  # seeds initialisation, batch order, caption choice and negative sampling
    device: str | None = None  # "cpu", "cuda", ...; default CUDA when present
    precision: str | None = None  # fp32 | amp_bf16 | amp | bf16 | fp16; None: amp_bf16 on CUDA
    itm_weight: float = 1.0  # loss = itc + itm_weight * itm
    itc_temperature: float = 0.07  # ITC softmax temperature (BLIP's initial value)
    num_hard_negatives: int = 2  # ITM negatives mined from ITC per image and per caption (BLIP: 1)
    num_random_negatives: int = 1  # extra uniformly drawn ITM negatives (0 = BLIP's recipe)
    easy_epochs: int = 1  # "tiny" only: first epochs draw ITM negatives uniformly (see train.py)
    group_size: int = 4  # lexical neighbours kept together in a batch (seed included)
    image_size: int = 64  # "tiny" only: input resolution
    patch_size: int = 8  # "tiny" only: ViT patch side in pixels (keep below an object's size)
    hidden_size: int = 64  # "tiny" only: width of both towers
    vision_layers: int = 3  # "tiny" only: ViT depth
    text_layers: int = 2  # "tiny" only: BERT depth (each layer cross-attends to the image)
    val_images: int | None = None  # first N val images validated per epoch (400; 1000); 0 = none
    val_k: int | None = None  # validation re-ranks the ITC top-k (default 8; effnet-minilm 16)
    max_steps: int | None = None  # stop after this many optimiser steps (smoke tests)
    # With "relation", an under-specified caption is a positive for every image the dataset's
    # relation.parquet says it fits, never a negative (without that file: its own image).
    labels: str = "relation"  # tiny/BLIP positives: "relation" (full, when present) or "captions"
    overwrite: bool = False  # replace an existing output directory
    embed_dim: int = 256  # effnet-minilm only: width of the prior's (dual encoder's) embedding
    fusion_dim: int = 128  # effnet-minilm only: width of the fusion layers
    fusion_layers: int = 2  # effnet-minilm only: fusion layers over the caption and the image
    fusion_heads: int = 4  # effnet-minilm only: attention heads per fusion layer
    dropout: float = 0.1  # effnet-minilm only: dropout in the fusion layers
    prior_epochs: int = 20  # effnet-minilm only: ITC epochs of the prior (best val epoch kept)
    prior_lr: float = 1e-3  # effnet-minilm only: AdamW learning rate of the prior's ITC fit
    prior_folds: int = 4  # effnet-minilm only: the fusion trains on out-of-fold prior scores
    negative_pool: int = 32  # effnet-minilm only: hard negatives come from a query's prior top-N
    itm_loss: str = "bce"  # effnet-minilm only: "bce" (per pair) or "softmax" (listwise per query)
    feature_cache: str | None = None  # effnet-minilm only: feature cache root (default: see README)
    report_to: str = "none"  # none | tensorboard: each epoch's numbers also to OUT-tensorboard/

    @property
    def report_dir(self) -> str:
        """TensorBoard's folder: beside OUT, since OUT appears (atomically) only at the end."""
        return f"{str(self.out).rstrip('/')}-tensorboard"

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate at optimiser step ``step`` of ``total``: linear warm-up over ``warmup``
        steps, then cosine decay to 0."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, total - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def __post_init__(self) -> None:
        from pipeline.torchkit.encode import check_precision  # torch: only when configs are built

        check_precision(self.precision)
        from pipeline.core.tracking import check_report_to

        check_report_to(self.report_to)

        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name, value in {**DEFAULTS, **BASE_DEFAULTS.get(self.base, {})}.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: set once, here

        for name in (
            "epochs",
            "batch_size",
            "group_size",
            "image_size",
            "patch_size",
            "embed_dim",
            "fusion_dim",
            "fusion_layers",
            "fusion_heads",
            "negative_pool",
            "prior_folds",
            "val_k",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.prior_epochs < 0:
            raise ValueError(f"--prior-epochs must be >= 0, got {self.prior_epochs}")
        if not self.prior_lr > 0:
            raise ValueError(f"--prior-lr must be > 0, got {self.prior_lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must lie in [0, 1), got {self.dropout}")
        if self.fusion_dim % self.fusion_heads:
            raise ValueError(
                f"--fusion-dim {self.fusion_dim} must be a multiple of --fusion-heads "
                f"{self.fusion_heads}"
            )
        if self.labels not in ("relation", "captions"):
            raise ValueError(f"--labels must be relation or captions, got {self.labels!r}")
        if self.itm_loss not in ("softmax", "bce"):
            raise ValueError(f"--itm-loss must be softmax or bce, got {self.itm_loss!r}")
        for name in (
            "num_hard_negatives",
            "num_random_negatives",
            "easy_epochs",
            "warmup",
            "val_images",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "itc_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "itm_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.num_hard_negatives + self.num_random_negatives < 1:
            raise ValueError(
                "--num-hard-negatives + --num-random-negatives must be >= 1: ITM needs negatives"
            )
        if self.batch_size < 2:
            raise ValueError("--batch-size must be >= 2: in-batch negatives need a second pair")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"--image-size {self.image_size} must be a multiple of --patch-size "
                f"{self.patch_size}"
            )
