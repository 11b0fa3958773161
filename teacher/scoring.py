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


def score_pairs(
    teacher,
    pairs: pl.DataFrame,
    image_path,
    text,
    *,
    batch_size: int = 64,
    images_per_step: int = 16,
    bar: tqdm | None = None,
) -> pl.DataFrame:
    """``pairs`` (image_id, caption_id) with the teacher's ``score`` and ``prob`` added.

    Pairs are grouped by image so that each image is encoded once; ``image_path[i]`` is image
    i's file and ``text[c]`` caption c's text (any indexable: dict, list, Series).
    """
    groups = pairs.group_by("image_id", maintain_order=True).agg("caption_id")
    out = []
    for start in range(0, groups.height, images_per_step):
        step = groups.slice(start, images_per_step)
        images = []
        for image_id in step["image_id"]:
            with Image.open(image_path[image_id]) as img:
                images.append(img.convert("RGB"))
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
    return pl.concat(out)
