"""--report-to tensorboard: what metrics.jsonl records, TensorBoard's own reader reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_error, run

from pipeline.core.tracking import scalars

pytest.importorskip("tensorboard")


def _events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard's event reader finds in ``log_dir``: tag -> (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_scalars_flatten_numbers_only():
    """Nested dicts become slash names; None, strings, booleans and NaN are left out."""
    record = {"a": 1, "b": {"c": 2.5, "d": None, "e": "x"}, "f": True, "g": float("nan")}
    assert scalars(record, "train") == {"train/a": 1.0, "train/b/c": 2.5}


def test_train_student_reports_every_metrics_line(small_dataset, tmp_path):
    """Each number of each metrics.jsonl line is a TensorBoard scalar at its step."""
    out = tmp_path / "s"
    result = run(
        "train-student",
        "--data",
        small_dataset,
        "--out",
        out,
        "--loss",
        "none",
        "--batching",
        "random",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--report-to",
        "tensorboard",
        "--json",
    )
    assert result.exit_code == 0, result.output
    events = _events(out / "tensorboard")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    val = [r for r in records if r["event"] == "val"]
    assert [s for s, _ in events["train/total"]] == [r["step"] for r in train]
    assert [v for _, v in events["train/lr"]] == pytest.approx([r["lr"] for r in train])
    assert [v for _, v in events["train/itc"]] == pytest.approx([r["itc"] for r in train])
    assert [v for _, v in events["val/rsum"]] == pytest.approx([r["val"]["rsum"] for r in val])
    assert "val/train/total" in events and "train/logit_scale" in events


def test_train_teacher_reports_each_epoch(demo_dataset, tmp_path):
    """train-teacher writes its per-epoch numbers beside OUT while it trains."""
    out = tmp_path / "teacher"
    result = run(
        "train-teacher",
        "--data",
        demo_dataset,
        "--out",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--hidden-size",
        "32",
        "--vision-layers",
        "1",
        "--text-layers",
        "1",
        "--warmup",
        "2",
        "--val-images",
        "8",
        "--max-steps",
        "5",
        "--report-to",
        "tensorboard",
        "--json",
    )
    assert result.exit_code == 0, result.output
    events = _events(tmp_path / "teacher-tensorboard")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in events["epoch/train_itc"]] == pytest.approx(
        [r["train_itc"] for r in records]
    )
    assert [s for s, _ in events["epoch/lr"]] == [r["step"] for r in records]
    assert "epoch/itc_rsum" in events


def test_unknown_report_to_is_an_error(small_dataset, tmp_path):
    """A destination cprd does not know is named in one error line."""
    assert_error(
        run(
            "train-student",
            "--data",
            small_dataset,
            "--out",
            tmp_path / "x",
            "--loss",
            "none",
            "--batching",
            "random",
            "--report-to",
            "wandb",
        ),
        "--report-to",
        "wandb",
    )
