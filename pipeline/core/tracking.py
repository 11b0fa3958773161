"""``--report-to tensorboard``: the records a trainer writes to metrics.jsonl, also as TensorBoard
scalars (metrics.jsonl stays the record of truth; this is a view of it).

A trainer calls ``enable(key, report_to, log_dir)`` once (rank 0 only), ``report(key, record)``
wherever it appends a metrics.jsonl line, and ``close(key)`` at the end. ``key`` names the run
(its output dir), so the trainer needs no new object threaded through its loop. Every number in
a record becomes a scalar named ``EVENT/NAME`` (nested dicts joined with ``/``, e.g.
``val/rsum``, ``val/train/itc``, ``train/total``, ``train/hard_negatives_per_query``) at the
record's ``step``.
TensorBoard is an optional extra: ``pip install 'cprd[tensorboard]'``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard")
_writers: dict[str, Any] = {}  # run key -> open SummaryWriter


def check_report_to(report_to: str) -> None:
    """ValueError naming --report-to for an unknown value or a missing tensorboard package."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got '{report_to}'")
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError(
                "--report-to tensorboard needs the tensorboard package: pip install "
                "'cprd[tensorboard]' (or pip install tensorboard), or drop the option"
            ) from None


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, flattened to ``prefix/key/...`` names."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(scalars(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                out[name] = float(value)
    return out


def enable(key: str | Path, report_to: str, log_dir: str | Path, resume_step: int = 0) -> None:
    """Open the run's TensorBoard writer in ``log_dir`` (nothing for ``report_to == "none"``).

    ``resume_step``: a resumed run drops what an earlier attempt logged after its checkpoint,
    as metrics.jsonl does."""
    check_report_to(report_to)
    if report_to == "none":
        return
    from torch.utils.tensorboard import SummaryWriter

    close(key)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    purge = {"purge_step": resume_step} if resume_step else {}
    _writers[str(key)] = SummaryWriter(log_dir=str(log_dir), **purge)
    log.info("reporting to TensorBoard in %s (tensorboard --logdir %s)", log_dir, log_dir)


def report(key: str | Path, record: dict) -> None:
    """Write a record's numbers as scalars at its ``step`` (``epoch`` when it has none)."""
    writer = _writers.get(str(key))
    if writer is None:
        return
    event = str(record.get("event", "train"))
    step = int(record.get("step", record.get("epoch", 0)))
    body = {k: v for k, v in record.items() if k not in ("event", "step", event)}
    if isinstance(record.get(event), dict):  # {"event": "val", "val": {...}} -> val/rsum
        body = {**record[event], **body}
    for name, value in scalars(body, event).items():
        writer.add_scalar(name, value, global_step=step)
    writer.flush()


def close(key: str | Path) -> None:
    """Flush and close the run's writer, if it has one."""
    writer = _writers.pop(str(key), None)
    if writer is not None:
        writer.close()
