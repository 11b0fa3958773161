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
