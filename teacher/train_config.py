"""The options of ``cprd train-teacher``: one frozen dataclass, one CLI flag per field.

Kept apart from the training code (and its torch/transformers imports) so that `cprd --help`
can read it instantly; written as ``train_config.json`` next to the trained teacher.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TeacherTrainConfig:
    data: str  # dataset directory (cprd import-data / demo-data)
    out: str  # output directory: a BLIP save_pretrained dir, written atomically
    base: str = "tiny"  # "tiny" (a small BLIP from scratch), or a BLIP ITM hub id / dir to tune
    epochs: int = 12  # passes over the training images (one random caption per image per pass)
    batch_size: int = 64  # images per batch (each with one caption)
    lr: float = 1e-3  # peak AdamW learning rate; ~1e-5 suits fine-tuning a pretrained BLIP
    weight_decay: float = 0.05  # AdamW weight decay
    warmup: int = 100  # linear warm-up steps, then cosine decay to 0
    seed: int = 0  # seeds initialisation, batch order, caption choice and negative sampling
    device: str | None = None  # "cpu", "cuda", ...; default CUDA when present
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
    val_images: int = 400  # first N val images evaluated after every epoch; 0 = no validation
    val_k: int = 8  # ITM re-ranks the ITC top-k in validation
    max_steps: int | None = None  # stop after this many optimiser steps (smoke tests)
    overwrite: bool = False  # replace an existing output directory

    def __post_init__(self) -> None:
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        for name in ("epochs", "batch_size", "group_size", "val_k", "image_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("num_hard_negatives", "num_random_negatives", "easy_epochs", "warmup"):
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
