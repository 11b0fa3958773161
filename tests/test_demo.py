"""The demo end to end on its smallest profile: every stage through the real code, then a re-run."""

from __future__ import annotations

import json

from pipeline.demo import DemoConfig, run_demo
from pipeline.metrics import METRIC_KEYS


def test_demo_smoke_then_rerun(tmp_path):
    """All stages run and report; a re-run reuses everything and scores 0 teacher pairs."""
    out = tmp_path / "demo"
    report = run_demo(DemoConfig(out=out, profile="smoke"))
    names = [r["name"] for r in report["rows"]]
    assert names == ["teacher-rerank", "student-itc", "student-itc-hard", "student-cprd"]
    for row in report["rows"]:
        assert all(0 <= row[k] <= 100 for k in METRIC_KEYS[:-1])
        assert row["rsum"] == sum(row[k] for k in METRIC_KEYS[:-1])
    assert report["teacher_cache"]["pairs_scored"] == report["teacher_cache"]["pairs_total"] > 0
    for f in ("report.json", "report.md", "report.png"):
        assert (out / f).stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["rows"][0]["name"] == "teacher-rerank"
    for student in ("itc", "itc-hard", "cprd"):
        assert (out / "students" / student / "student.json").is_file()

    again = run_demo(DemoConfig(out=out, profile="smoke"))
    assert again["teacher_cache"]["pairs_scored"] == 0
    reused = {s["stage"]: s["reused"] for s in again["stages"]}
    assert all(
        reused[s]
        for s in (
            "demo-data",
            "train-teacher",
            "student-itc",
            "mine-candidates",
            "student-itc-hard",
            "student-cprd",
        )
    )
    assert [r["rsum"] for r in again["rows"]] == [r["rsum"] for r in report["rows"]]
    assert "0 scored in this run" in (out / "report.md").read_text()
