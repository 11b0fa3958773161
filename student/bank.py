"""The negative bank: the student's embedding of every training image and caption, so a query's
cached hard negatives reach its loss without being encoded in the step (DESIGN 5).

A step encodes only its pairs; each query's other cached negatives are read from the bank
(detached: the gradient flows through the query side, and through negatives that are also pairs
of the step). Rows are written when their item passes through a step (``write``, with the step
count) and all at once by ``refresh`` (the trainer refreshes at every epoch start, and every
``--bank-refresh`` steps when set), so a read is at most that many steps stale; ``read`` returns the
staleness of what it read. A modality whose tower is frozen (features cached) does not use the
bank: the trainer encodes its extras exactly through the current heads (cheap).

Rows are indexed by dataset id (dense 0..N-1 images, 0..M-1 captions); D is the embedding width.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from pipeline.torchkit.encode import autocast

MODALITIES = ("image", "caption")


class NegativeBank:
    """Unit-norm student embeddings by dataset id, with the step each row was written at."""

    def __init__(self, sizes: dict[str, int], dim: int, device: torch.device | str = "cpu"):
        self.rows = {m: torch.zeros(sizes[m], dim, device=device) for m in MODALITIES}  # (N, D)
        self.step = {m: np.full(sizes[m], -1, dtype=np.int64) for m in MODALITIES}  # -1: never

    def write(self, modality: str, ids: np.ndarray, emb: Tensor, step: int) -> None:
        """Store ``emb`` (E, D), detached, as the rows of ``ids`` (E,), written at ``step``."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(emb):
            raise ValueError(f"{len(ids)} ids but {len(emb)} embeddings")
        rows = self.rows[modality]
        rows[torch.from_numpy(ids).to(rows.device)] = emb.detach().to(rows)
        self.step[modality][ids] = step

    def read(self, modality: str, ids: np.ndarray, step: int) -> tuple[Tensor, np.ndarray]:
        """(embeddings (E, D) without gradient, staleness (E,) in steps) of ``ids``; ValueError
        if a row was never written (the trainer refreshes before the first step)."""
        ids = np.asarray(ids, dtype=np.int64)
        written = self.step[modality][ids]
        if (written < 0).any():
            raise ValueError(
                f"negative bank: {int((written < 0).sum())} {modality} rows were never written; "
                "refresh the bank before reading it"
            )
        rows = self.rows[modality]
        return rows[torch.from_numpy(ids).to(rows.device)], step - written

    @torch.no_grad()
    def refresh(
        self,
        modality: str,
        ids: np.ndarray,
        encode: Callable[[np.ndarray], Tensor],
        batch_size: int,
        step: int,
    ) -> None:
        """Write every row of ``ids`` from ``encode(chunk) -> (len(chunk), D)``, batch by batch."""
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            self.write(modality, chunk, encode(chunk).float(), step)


# ---- how train-student uses the bank ----------------------------------------------------


def make_bank(model, loaded, ds, cfg, live: dict, device):
    """The negative bank for the modalities whose extras are not encoded live (None if none)."""
    if cfg.negatives != "bank" or all(live.values()):
        return None
    sizes = {"image": ds.images.height, "caption": ds.captions.height}
    return NegativeBank(sizes, int(loaded.model_cfg["embed_dim"]), device)


@torch.no_grad()
def refresh_bank(bank, model, images, caption_inputs, planner, live, device, step: int) -> None:
    """Re-encode every training image and caption the bank serves (eval mode: no dropout, no
    batch-norm statistics moved), so its rows are at most one refresh interval stale.

    ``images`` is a ``student.inputs.ImageBatches``: the images are decoded by its workers."""
    was_training = model.training
    model.eval()
    try:
        with autocast(device):
            if not live["image"]:
                ids = np.asarray(planner.images, dtype=np.int64)
                chunks = [
                    ids[s : s + planner.batch_size] for s in range(0, len(ids), planner.batch_size)
                ]
                for chunk, px in zip(chunks, images.batches(chunks), strict=True):
                    rows = model.encode_image(px.to(device), normalize=True)
                    bank.write("image", chunk, rows.float(), step)
            if not live["caption"]:
                bank.refresh(
                    "caption",
                    planner.train_captions,
                    lambda ids: model.encode_text(caption_inputs(ids).to(device), normalize=True),
                    4 * planner.batch_size,
                    step,
                )
    finally:
        model.train(was_training)


def with_bank_extras(bank, batch, img, txt, live: dict, step: int, stale: list):
    """(image pool, caption pool) embeddings: the step's encoded rows plus the extras read from
    the bank (their staleness appended to ``stale``); the pairs' fresh rows go into the bank."""
    parts = {"image": img, "caption": txt}
    for m, pairs, extras in (
        ("image", batch.images, batch.extra_images),
        ("caption", batch.captions, batch.extra_captions),
    ):
        if live[m]:
            continue
        if len(extras):
            rows, age = bank.read(m, extras, step)
            parts[m] = torch.cat([parts[m], rows])
            stale.append(age)
        bank.write(m, pairs, parts[m][: len(pairs)], step)
    return parts["image"], parts["caption"]


def staleness(before: dict | None, ages: list[np.ndarray]) -> dict | None:
    """{"mean", "max", "reads"} of the bank rows read, in steps since written, merged into
    ``before``."""
    n = sum(len(a) for a in ages)
    total = float(sum(a.sum() for a in ages))
    worst = max((int(a.max()) for a in ages if len(a)), default=0)
    if before:
        n, total = n + before["reads"], total + before["mean"] * before["reads"]
        worst = max(worst, before["max"])
    return {"mean": total / n, "max": worst, "reads": n} if n else before
