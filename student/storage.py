"""The on-disk format of a cprd student directory (what ``cprd train-student`` writes).

Layout::

    model.pt      the model's state dict (torch.save), written first
    student.json  {"format": "cprd-student", "version": 1, "base_spec", "model_cfg" (the open_clip
                  model config: embed_dim, vision_cfg, text_cfg, ...), "preprocess_cfg",
                  "image_size", "context_length", "weights_file", "weights_sha256", "train_cfg"}
                  written last, so its presence means the directory is complete

Both files are written to a temporary name, fsynced and renamed (pipeline.core.atomic). The sha256
of ``model.pt`` inside ``student.json`` catches a crash between the two renames of an overwrite.
This module knows nothing about building models; ``student.models.load_student`` does that.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.core import atomic

STUDENT_JSON = "student.json"
STUDENT_WEIGHTS = "model.pt"
STUDENT_FORMAT = "cprd-student"
STUDENT_VERSION = 1


def save_student(
    model: torch.nn.Module,
    model_cfg: dict[str, Any],
    directory: str | os.PathLike,
    *,
    base_spec: str,
    train_cfg: Any = None,
) -> Path:
    """Write ``model.pt`` then ``student.json`` into ``directory``; return the directory.

    ``model_cfg`` is the open_clip config the model was built from (``LoadedModel.model_cfg``),
    ``base_spec`` the spec training started from, ``train_cfg`` an optional JSON-able dict or
    dataclass recorded alongside. An existing student in ``directory`` is replaced.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if any(key not in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(
            "model_cfg must be an open_clip config dict with embed_dim, vision_cfg and "
            "text_cfg; pass LoadedModel.model_cfg"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic.atomic_path(out / STUDENT_WEIGHTS) as tmp:
        torch.save(state, tmp)
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    if dataclasses.is_dataclass(train_cfg) and not isinstance(train_cfg, type):
        train_cfg = dataclasses.asdict(train_cfg)
    meta = {
        "format": STUDENT_FORMAT,
        "version": STUDENT_VERSION,
        "base_spec": base_spec,
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_cfg,
        "image_size": preprocess_cfg.get("size", model_cfg["vision_cfg"].get("image_size")),
        "context_length": model_cfg["text_cfg"].get("context_length"),
        "weights_file": STUDENT_WEIGHTS,
        "weights_sha256": atomic.file_sha256(out / STUDENT_WEIGHTS),
        "train_cfg": train_cfg,
    }
    atomic.write_json(out / STUDENT_JSON, meta)
    return out


def read_student(directory: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Return (student.json contents, path of the verified weights file) for a student directory."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(
            f"student directory {str(d)!r} does not exist; pass a directory written by "
            "`cprd train-student`"
        )
    meta_path = d / STUDENT_JSON
    if not meta_path.is_file():
        raise ValueError(
            f"{str(d)!r} is not a cprd student directory (no {STUDENT_JSON}); pass a directory "
            "written by `cprd train-student`, `tiny`, or an open_clip model name"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STUDENT_FORMAT or meta.get("version") != STUDENT_VERSION:
        raise ValueError(
            f"{meta_path} has format {meta.get('format')!r} version {meta.get('version')!r}; this "
            f"cprd reads {STUDENT_FORMAT!r} version {STUDENT_VERSION}: re-save it with this cprd"
        )
    weights = d / meta.get("weights_file", STUDENT_WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the student in {d} is incomplete")
    if meta.get("weights_sha256") != atomic.file_sha256(weights):
        raise ValueError(
            f"{weights} does not match the sha256 in {meta_path} (an interrupted or mixed save); "
            "re-save the student"
        )
    return meta, weights
