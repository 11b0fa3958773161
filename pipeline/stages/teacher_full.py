"""The teacher's ceiling: the cross-encoder ranks every (image, caption) pair of a split.

Re-ranking a dual encoder's top-K (pipeline.rerank) is what a deployed two-stage system does; it
is capped by the candidates the dual encoder retrieves. Scoring every pair removes the cap: the
recall of the teacher alone, the most a student distilled from it could hope to reach. It costs
N x M cross-encoder passes (the vision encoder still runs once per image), affordable on a small
test split: the demo's 200 x 1000 pairs take about 100 s for the tiny teacher on 2 CPU cores.

The score matrix is kept under ``out`` (``scores.npy`` plus ``key.json``, written last) and
reused while the dataset fingerprint, split and teacher weights are the same.
Letters in shape comments: N images, M captions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.core import atomic
from pipeline.core.dataset import Dataset
from pipeline.core.metrics import full_relation_metrics, retrieval_metrics

log = logging.getLogger(__name__)

SCORES_FILE, KEY_FILE = "scores.npy", "key.json"


def teacher_full_scores(
    ds: Dataset,
    split: str,
    teacher,
    out: Path | None = None,
    images_per_step: int = 8,
    batch_size: int = 1024,
    progress: bool = True,
) -> tuple[np.ndarray, bool]:
    """((N, M) float32 ITM logits of every image against every caption of ``split``, whether
    they were read back from ``out`` rather than scored).

    ``teacher`` is a loaded teacher (``teacher.model.load_teacher``); rows and columns follow
    ``ds.split(split)``. With ``out``, a matrix already computed for the same dataset, split and
    teacher is read back instead of scored again, and a new one is saved there.
    """
    from teacher.model import score_grouped

    key = {"dataset": ds.fingerprint, "split": split, "teacher": teacher.identity}
    if out is not None and _matches(Path(out), key):
        log.info("teacher-full: reusing %s (same dataset, split and teacher)", out)
        return np.load(Path(out) / SCORES_FILE), True
    images, captions = ds.split(split)
    texts = captions["caption"].to_list()
    paths = [ds.image_path(p) for p in images["path"]]
    scores = np.zeros((len(paths), len(texts)), dtype=np.float32)  # (N, M)
    bar = tqdm(total=scores.size, desc="teacher-full", unit="pair", disable=not progress)
    for start in range(0, len(paths), images_per_step):
        pictures = []
        for p in paths[start : start + images_per_step]:
            with Image.open(p) as img:
                pictures.append(img.convert("RGB"))
        result = score_grouped(teacher, pictures, [texts] * len(pictures), batch_size=batch_size)
        scores[start : start + len(pictures)] = np.stack(result.logits)
        bar.update(len(pictures) * len(texts))
    bar.close()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / KEY_FILE).unlink(missing_ok=True)  # the key goes last: never a stale pairing
        with atomic.atomic_path(out / SCORES_FILE) as tmp, open(tmp, "wb") as fh:
            np.save(fh, scores)
        atomic.write_json(out / KEY_FILE, key)
    return scores, False


def _matches(out: Path, key: dict) -> bool:
    try:
        return json.loads((out / KEY_FILE).read_text()) == key and (out / SCORES_FILE).is_file()
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def teacher_full_metrics(
    ds: Dataset,
    split: str,
    teacher,
    out: Path | None = None,
    progress: bool = True,
) -> dict:
    """``{"metrics", "metrics_full", "pairs", "reused"}``: recall of the teacher ranking every
    pair of ``split``, on the dataset's labels and (None without a relation) on its full
    relation; ``reused``: the scores came from ``out``."""
    scores, reused = teacher_full_scores(ds, split, teacher, out=out, progress=progress)
    images, captions = ds.split(split)
    row_of = {image_id: row for row, image_id in enumerate(images["image_id"].to_list())}
    owner = np.array([row_of[i] for i in captions["image_id"].to_list()], dtype=np.int64)
    rows = ds.relation_rows(images, captions)
    return {
        "metrics": retrieval_metrics(scores, owner),
        "metrics_full": None if rows is None else full_relation_metrics(scores, *rows),
        "pairs": int(scores.size),
        "reused": reused,
    }
