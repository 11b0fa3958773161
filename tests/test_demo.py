"""The demo end to end on its smallest profile: every stage through the real code, then a re-run."""

from __future__ import annotations

import json

from pipeline.core.metrics import METRIC_KEYS
from pipeline.stages.demo import DemoConfig, run_demo


def test_demo_smoke_then_rerun(tmp_path):
    """All stages run and report; a re-run reuses everything and scores 0 teacher pairs."""
    out = tmp_path / "demo"
    report = run_demo(DemoConfig(out=out, profile="smoke"))
    names = [r["name"] for r in report["rows"]]
    assert names == [
        "teacher-full",
        "teacher-rerank",
        "student-itc",
        "student-itc-hard",
        "student-cprd",
        "student-kl",
    ]
    students = [r for r in report["rows"] if r["name"].startswith("student-")]
    for row in students:  # agreement with the teacher over the scored test candidates, val RSUM
        assert -1 <= row["ranking_agreement"] <= 1 and row["val_rsum"] is not None
    assert report["best_student"] == max(students, key=lambda r: r["val_rsum"])["name"]
    for row in report["rows"]:
        assert all(0 <= row[k] <= 100 for k in METRIC_KEYS[:-1])
        assert row["rsum"] == sum(row[k] for k in METRIC_KEYS[:-1])
        # The demo data carries its full relation: a second RSUM where any true match counts.
        full = row["metrics_full"]
        assert row["rsum_full"] == full["rsum"] == sum(full[k] for k in METRIC_KEYS[:-1])
    fn = report["mined_false_negatives"]
    assert fn["negatives"] > 0 and 0 <= fn["all"] <= 1
    assert report["teacher_cache"]["pairs_scored"] == report["teacher_cache"]["pairs_total"] > 0
    for f in ("report.json", "report.md", "report.png"):
        assert (out / f).stat().st_size > 0
    assert json.loads((out / "report.json").read_text())["rows"][0]["name"] == "teacher-full"
    for student in ("itc", "itc-hard", "cprd", "kl"):
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
            "student-kl",
            "mine-candidates test",
            "teacher-full",
        )
    )
    assert [r["rsum"] for r in again["rows"]] == [r["rsum"] for r in report["rows"]]
    assert "0 scored in this run" in (out / "report.md").read_text()


def test_shipped_teacher_binds(tmp_path):
    """pipeline/stages/demo-teacher is current and tells contrast-group siblings apart on a fresh draw.

    Siblings share every word, so a bag-of-words model sits at 25%; the shipped teacher measured
    about 85% on its own val draw. Scored through the same code as score-teacher.
    """
    from PIL import Image

    from pipeline.core.dataset import Dataset
    from pipeline.stages.demo import _shipped_teacher
    from pipeline.stages.demo_data import GROUP_SIZE, generate_demo_data
    from teacher.model import load_teacher, score_grouped

    shipped = _shipped_teacher()
    assert shipped is not None, (
        "pipeline/stages/demo-teacher is missing or built for another generator"
    )
    generate_demo_data(
        tmp_path / "d", train_images=4, val_images=4, test_images=160, seed=7, progress=False
    )
    ds = Dataset.load(tmp_path / "d")
    images, captions = ds.split("test")
    first = captions.group_by("image_id", maintain_order=True).first()  # caption slot 0
    texts = dict(zip(first["image_id"], first["caption"], strict=True))
    ids = images["image_id"].to_list()
    teacher = load_teacher(str(shipped), device="cpu")
    hits = []
    for g in range(0, len(ids), GROUP_SIZE):
        group = ids[g : g + GROUP_SIZE]
        pictures = [Image.open(ds.image_path(p)).convert("RGB") for p in images["path"][g : g + 4]]
        scores = score_grouped(teacher, pictures, [[texts[i] for i in group]] * len(group))
        hits += [int(s.argmax()) == row for row, s in enumerate(scores.logits)]
    assert sum(hits) / len(hits) > 0.5, f"within-group R@1 {sum(hits) / len(hits):.2f}"


def test_a_new_generator_version_invalidates_data_and_shipped_teacher(tmp_path, monkeypatch):
    """Data or a teacher made by an older generator is never reused as if current."""
    import pipeline.stages.demo_data as demo_data
    from pipeline.stages.demo import PROFILES, _same_data, _shipped_teacher

    p = PROFILES["smoke"]
    cfg = DemoConfig(out=tmp_path, profile="smoke")
    demo_data.generate_demo_data(
        tmp_path / "data",
        train_images=p.train_images,
        val_images=p.val_images,
        test_images=p.test_images,
        progress=False,
    )
    assert _same_data(tmp_path / "data", cfg, p)
    assert _shipped_teacher() is not None
    monkeypatch.setattr(demo_data, "GENERATOR_VERSION", demo_data.GENERATOR_VERSION + 1)
    assert not _same_data(tmp_path / "data", cfg, p)
    assert _shipped_teacher() is None
