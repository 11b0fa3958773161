"""The demo's student rows: which students the demo and the method table train, with the demo
profile's settings, and the two numbers a row reports beyond recall (agreement, val RSUM)."""

from __future__ import annotations

import json
from pathlib import Path

# Student rows: name -> train-student options beyond the profile's. Every hard row receives each
# query's top hard_k cached negatives (the trainer's defaults). `itc-hard` is the teacher-free
# control: the miner's batch order, ground-truth labels. Random batches train 1 + neighbours
# times the epochs, so every row takes the same number of optimizer steps.
ROWS: dict[str, dict] = {
    "itc": {"loss": "none", "batching": "random"},  # plain ITC; the demo's miner
    "itc-hard": {"loss": "none", "batching_order": "miner"},
    "itc-teacher-batches": {"loss": "none", "batching_order": "teacher"},  # the teacher via batches
    "cprd": {"loss": "cprd"},  # teacher-ordered batches, the default with a cache
    "cprd-miner": {"loss": "cprd", "batching_order": "miner"},
    "kl": {"loss": "kl"},
    "listmle": {"loss": "listmle"},
    "margin-mse": {"loss": "margin-mse"},
}
DEMO_ROWS = ("itc", "itc-hard", "cprd", "kl")  # what `cprd demo` trains; the method table: all


def train_row(cfg, p, name: str, out: Path, cache: Path | None, cand: Path | None) -> dict:
    """Train student row ``name`` (ROWS) into ``out`` with demo config ``cfg`` and profile ``p``
    (pipeline.stages.demo's DemoConfig and DemoProfile)."""
    kw = dict(ROWS[name])
    epochs = p.student_epochs
    if kw.get("batching") == "random":
        epochs *= 1 + p.neighbours  # equal optimizer steps with the hard rows
    else:
        kw.update(teacher_scores=cache, candidates=cand)
    return _student(cfg, p, out, epochs=epochs, **kw)


def _student(cfg, p, out: Path, epochs: int | None = None, **kw):
    from student.train import train_student
    from student.train_config import StudentTrainConfig

    scfg = StudentTrainConfig(
        data=cfg.out / "data",
        out=out,
        student="tiny",
        epochs=epochs or p.student_epochs,
        batch_size=p.student_batch,
        seed=cfg.seed,
        device=cfg.device,
        num_workers=0,
        overwrite=True,
        neighbours_per_seed=p.neighbours,
        warmup_steps=p.warmup,
        **kw,
    )
    return train_student(scfg)


def agreement(ra: dict) -> float:
    """One number for a row: Kendall tau with the teacher, averaged over both directions."""
    return round((ra["i2t"]["kendall_tau"] + ra["t2i"]["kendall_tau"]) / 2, 3)


def best_val(student_dir: Path) -> float | None:
    """The val RSUM of the epoch a student kept (how the demo picks its recipe: val only)."""
    lines = (Path(student_dir) / "metrics.jsonl").read_text().splitlines()
    vals = [r["val"]["rsum"] for r in map(json.loads, lines) if r.get("event") == "val"]
    return round(max(vals), 2) if vals else None
