"""The training state of train-student: ``out/last.pt``, one self-describing dict.

``{"model", "optimizer", "config", "rng", "state"}``; ``state`` holds the bookkeeping the loop
keeps (step, epochs done, every metrics.jsonl record, the best epoch, hard-negative counts,
training seconds). It is written atomically after every epoch, so a crash loses at most the epoch
in flight, and it loads with ``torch.load(weights_only=True)``: plain containers and tensors only.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from pipeline.core import atomic
from pipeline.core.safe_load import load_tensors
from student.distributed import DistEnv, barrier
from student.train_config import StudentTrainConfig, check_resumable, config_dict

LAST = "last.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


def fresh_state() -> dict:
    """The bookkeeping of a run that has not taken a step."""
    return {
        "step": 0,  # optimizer steps taken
        "epoch": 0,  # epochs completed
        "metrics": [],  # every metrics.jsonl record so far
        "train_seconds": 0.0,  # wall time in training epochs, summed over resumes
        "final_val": None,  # the latest validation metrics
        "best": {"epoch": None, "rsum": -math.inf, "metrics": None},  # by val RSUM
        "delivery": None,  # what the losses received, summed (student.batch_loss.Delivery)
        "staleness": None,  # negative bank reads: {"mean", "max", "reads"} in steps
    }


def start(cfg: StudentTrainConfig, env: DistEnv, model, optimizer) -> dict:
    """Fresh state, or out/last.pt loaded into model and optimizer; rank 0 prepares ``out``."""
    out = Path(cfg.out)
    state = fresh_state()
    if cfg.resume:
        ckpt = load_tensors(out / LAST, "resume only from a last.pt train-student wrote")
        check_resumable(cfg, ckpt["config"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state = ckpt["state"]
    if env.main:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)  # check_config made sure it is a train-student output
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out / CONFIG, config_dict(cfg))
        # Lines past the checkpoint (a crash mid-epoch) would be logged twice: rewrite the file.
        lines = "".join(json.dumps(r) + "\n" for r in state["metrics"])
        atomic.write_bytes(out / METRICS, lines.encode())
    barrier(env)
    return state


def save_last(cfg: StudentTrainConfig, model, optimizer, state: dict) -> None:
    """Write out/last.pt atomically (rank 0)."""
    ckpt = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": config_dict(cfg),
        "rng": {"torch": torch.get_rng_state()},
        "state": state,
    }
    with atomic.atomic_path(Path(cfg.out) / LAST) as tmp:
        torch.save(ckpt, tmp)


def finished(out: str | Path) -> bool:
    """True when ``out`` holds a train-student run that trained all its epochs (the best model
    in ``student.json`` is written from the first epoch on, so its presence alone says nothing:
    a killed run leaves one too)."""
    out = Path(out)
    if not (out / "student.json").is_file() or not (out / CONFIG).is_file():
        return False
    epochs = json.loads((out / CONFIG).read_text()).get("epochs")
    vals = [
        json.loads(line).get("epoch")
        for line in (out / METRICS).read_text().splitlines()
        if '"event": "val"' in line
    ]
    return bool(vals) and vals[-1] == epochs
