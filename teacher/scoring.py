"""How a teacher scores: the result every teacher kind returns, and the one entry point that
scores a table of (image, caption) pairs.

Both teacher kinds (teacher.model.LoadedTeacher, BLIP; teacher.effnet_minilm.EffnetMiniLMTeacher)
have a ``score_grouped(images, captions, batch_size)`` method returning :class:`TeacherScores`;
:func:`score_pairs` drives it for the stages (``score-teacher`` fills the cache with it,
``evaluate --rerank-teacher`` re-ranks with it). Nothing here imports a teacher kind, so both can
import this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from PIL import Image
from tqdm import tqdm


@dataclass(frozen=True)
class TeacherScores:
    """Per image, one float32 array over its captions (in the order given)."""

    # the log-odds of a match, logit(prob): for the ITM head itm[:, 1] - itm[:, 0]; what the
    # cache stores as `score` and re-ranking sorts by
    logits: list[np.ndarray]
    probs: list[np.ndarray]  # match_prob(logits): sigmoid, equal to softmax(itm_head)[:, 1]


def match_prob(log_odds: np.ndarray) -> np.ndarray:
    """float32 sigmoid of float32 log-odds, computed one way for every teacher, so that a cached
    ``prob`` is bit-for-bit ``match_prob(score)``."""
    return torch.sigmoid(torch.from_numpy(np.array(log_odds, dtype=np.float32))).numpy()


class _Steps(torch.utils.data.Dataset):
    """Step k's images decoded, and preprocessed when the teacher offers ``preprocess`` (a
    (S, 3, H, W) tensor; else a list of PIL images): what DataLoader workers prepare while the
    teacher scores the step before."""

    def __init__(self, steps: list[list[int]], image_path, preprocess):
        self.steps, self.image_path, self.preprocess = steps, image_path, preprocess

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k: int):
        images = []
        for image_id in self.steps[k]:
            with Image.open(self.image_path[image_id]) as img:
                images.append(img.convert("RGB"))
        return self.preprocess(images) if self.preprocess is not None else images


def score_pairs(
    teacher,
    pairs: pl.DataFrame,
    image_path,
    text,
    *,
    batch_size: int = 64,
    images_per_step: int = 16,
    num_workers: int = 0,
    bar: tqdm | None = None,
) -> pl.DataFrame:
    """``pairs`` (image_id, caption_id) with the teacher's ``score`` and ``prob`` added.

    Pairs are grouped by image so that each image is encoded once; ``image_path[i]`` is image
    i's file and ``text[c]`` caption c's text (any indexable: dict, list, Series). With
    ``num_workers`` > 0, worker processes decode and preprocess the next steps' images while the
    teacher runs (a DataLoader, two steps prefetched per worker).
    """
    groups = pairs.group_by("image_id", maintain_order=True).agg("caption_id")
    steps = [
        groups.slice(start, images_per_step) for start in range(0, groups.height, images_per_step)
    ]
    loader = torch.utils.data.DataLoader(
        _Steps([st["image_id"].to_list() for st in steps], image_path, _preprocessor(teacher)),
        batch_size=None,  # one item is one step
        num_workers=num_workers,
    )
    out = []
    for step, images in zip(steps, loader, strict=True):
        captions = [[text[c] for c in ids] for ids in step["caption_id"]]
        result = teacher.score_grouped(images, captions, batch_size=batch_size)
        out.append(
            pl.DataFrame(
                {
                    "image_id": np.repeat(step["image_id"].to_numpy(), [len(c) for c in captions]),
                    "caption_id": np.concatenate(step["caption_id"].to_list()).astype(np.int64),
                    "score": np.concatenate(result.logits).astype(np.float32),
                    "prob": np.concatenate(result.probs).astype(np.float32),
                }
            )
        )
        if bar is not None:
            bar.update(sum(len(c) for c in captions))
    return (
        pl.concat(out)
        if out
        else pairs.with_columns(
            score=pl.lit(None, pl.Float32), prob=pl.lit(None, pl.Float32)
        ).clear()
    )


def _preprocessor(teacher):
    """The teacher's image preprocessing, for the workers (None: it takes PIL images itself)."""
    return getattr(teacher, "preprocess", None)
