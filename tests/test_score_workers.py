"""score-teacher's input pipeline: images decoded and preprocessed in DataLoader workers give
the same cache as the main thread, and the teacher accepts preprocessed pixels."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import mine_and_score, run
from PIL import Image

from pipeline.core import cache
from pipeline.core.dataset import Dataset


def test_workers_fill_the_same_cache(small_dataset, tiny_teacher_dir, tmp_path):
    """--num-workers 2 scores every pair as the main thread does (to float rounding: the workers'
    preprocessing runs single-threaded)."""
    main = mine_and_score(tmp_path / "a", small_dataset, tiny_teacher_dir, 3, 2)
    result = run(
        "score-teacher",
        "--candidates",
        tmp_path / "a" / "cand",
        "--teacher",
        tiny_teacher_dir,
        "--cache-dir",
        tmp_path / "b",
        "--num-workers",
        2,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["num_workers"] == 2 and summary["pairs_scored"] > 0
    a = cache.load_scores(main)[1].sort("image_id", "caption_id")
    b = cache.load_scores(summary["cache_path"])[1].sort("image_id", "caption_id")
    assert a.select("image_id", "caption_id").equals(b.select("image_id", "caption_id"))
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=0, atol=1e-5)


def test_preprocessed_pixels_score_as_images(small_dataset, tiny_teacher_dir):
    """score_grouped on preprocess()-ed pixels equals score_grouped on the PIL images."""
    from teacher.model import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir))
    ds = Dataset.load(small_dataset)
    paths = [ds.image_path(p) for p in ds.images["path"].to_list()[:3]]
    images = [Image.open(p).convert("RGB") for p in paths]
    captions = [["a red circle", "a blue square"], [], ["a shape"]]
    pil = teacher.score_grouped(images, captions)
    pixels = teacher.preprocess(images)
    assert isinstance(pixels, torch.Tensor) and pixels.shape[0] == 3
    pre = teacher.score_grouped(pixels, captions)
    for x, y in zip(pil.logits, pre.logits, strict=True):
        np.testing.assert_array_equal(x, y)
