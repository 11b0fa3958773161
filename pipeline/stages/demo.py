"""``cprd demo``: the whole pipeline on the embedded benchmark, on CPU, in minutes.

demo-data -> train-teacher -> student (ITC) -> mine-candidates (train, and test for the ranking
agreement) -> score-teacher -> students (DEMO_ROWS: ITC on hard batches in the miner's order, the
teacher-free control; CPRD; KL), all at equal optimizer steps -> evaluate all on test, plus the
teacher ranking every test pair (teacher-full) -> report. Rows carry RSUM on the dataset's labels
(``rsum``) and on its full caption-image relation (``rsum_full``), the students their ranking
agreement with the teacher (Kendall tau) and their val RSUM; the report names the student best on
val (the recipe the demo recommends) and the fraction of mined negatives that are true matches.

Every stage writes under ``out`` and is skipped when its output is already there, so a re-run
(or a run after a crash) redoes only what is missing, and the report says what was reused:
on a re-run the teacher cache answers every pair (pairs scored: 0).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from pipeline.core.dataset import Dataset
from pipeline.core.schemas import CANDIDATES_JSON, DATASET_JSON
from pipeline.stages.demo_rows import DEMO_ROWS, agreement, best_val, train_row

log = logging.getLogger(__name__)

# The demo's teacher, trained once by `cprd train-teacher` (longer than the whole demo may take)
# on a separate, larger draw of the same generator, with its full caption-image relation as
# labels; `make demo-teacher` rebuilds it (its README.md). Used only while the generator version
# it was trained on (its trained_on.json) is current. It ships as package data (pyproject.toml)
# and is found through importlib.resources, so a non-editable install finds it too
# (tests/test_package_data.py).
SHIPPED_TEACHER = Path(str(resources.files("pipeline.stages") / "demo-teacher"))
DEMO_MARKER = "demo.json"  # marks a directory as a demo run (a re-run may replace its stages)


@dataclass(frozen=True)
class DemoProfile:
    train_images: int  # demo-data split sizes
    val_images: int
    test_images: int
    teacher_epochs: int  # train-teacher epochs
    student_epochs: int  # train-student epochs, every student alike
    student_batch: int  # train-student batch size
    k: int  # candidates mined per query
    rerank_k: int  # teacher re-ranks the ITC student's top-k on test
    shards: int  # teacher cache shards
    neighbours: int = 1  # hard batching: neighbour pairs per seed (1 keeps epochs 2x, not 4x)
    warmup: int = 10  # lr warmup steps of teacher and students (the defaults of 100 would
    # outlast a whole short demo run)
    shipped_teacher: bool = (
        True  # use pipeline/stages/demo-teacher (trained once) instead of training one
    )


PROFILES = {
    # Targets on 2 CPU cores: 10 minutes (full) and 3 (quick). Measured on a quiet machine:
    # full 4 min 15 s (README). The hard-batch students and teacher scoring dominate.
    "full": DemoProfile(
        1000,
        200,
        200,
        teacher_epochs=8,
        student_epochs=6,
        student_batch=64,
        k=8,
        rerank_k=16,
        shards=16,
    ),
    "quick": DemoProfile(
        400,
        100,
        100,
        teacher_epochs=4,
        student_epochs=4,
        student_batch=64,
        k=8,
        rerank_k=16,
        shards=8,
    ),
    # For the end-to-end test: every stage runs (train-teacher included), nothing is expected
    # to learn.
    "smoke": DemoProfile(
        48,
        16,
        16,
        teacher_epochs=1,
        student_epochs=1,
        student_batch=16,
        k=4,
        rerank_k=4,
        shards=2,
        shipped_teacher=False,
    ),
}


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("data/demo-run")  # everything the demo writes
    profile: str = "full"  # full | quick (target: under 3 minutes on 2 CPU cores) | smoke (tests)
    seed: int = 0  # data, initialisation and batch order
    device: str | None = None  # None: CUDA when present, else CPU

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(
                f"unknown demo profile '{self.profile}'; choose one of {list(PROFILES)}"
            )
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")


class _Stages:
    """Runs named stages, timing each, skipping those whose output exists."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def run(self, name: str, done: bool, fn, note: str = "") -> object:
        t0 = time.perf_counter()
        log.info("[demo] %s%s", name, " (reused)" if done else "")
        result = None if done else fn()
        self.records.append(
            {
                "stage": name,
                "seconds": round(time.perf_counter() - t0, 1),
                "reused": done,
                "note": note,
            }
        )
        return result


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or finish) the demo under ``cfg.out``; return the report dict (also written)."""
    from pipeline.stages.demo_data import generate_demo_data
    from pipeline.stages.evaluate import EvalConfig, evaluate
    from pipeline.stages.mine import MineConfig, mine_candidates
    from pipeline.stages.score import ScoreConfig, score_teacher
    from teacher.train import train_teacher
    from teacher.train_config import TeacherTrainConfig

    p = PROFILES[cfg.profile]  # DemoConfig checked the name
    out = Path(cfg.out)
    _claim(out)
    data, teacher, students = out / "data", out / "teacher", out / "students"
    stages = _Stages()

    same = _same_data(data, cfg, p)
    if not same:  # new data: nothing trained or mined on the old data may be reused
        for stale in (teacher, students, out / "candidates", out / "candidates-test"):
            shutil.rmtree(stale, ignore_errors=True)
    stages.run(
        "demo-data",
        same,
        lambda: generate_demo_data(
            data,
            train_images=p.train_images,
            val_images=p.val_images,
            test_images=p.test_images,
            seed=cfg.seed,
            overwrite=True,
        ),
    )
    teacher, shipped = demo_teacher(out, p)
    stages.run(
        "train-teacher",
        shipped or (teacher / "config.json").is_file(),
        lambda: train_teacher(
            TeacherTrainConfig(
                data=str(data),
                out=str(teacher),
                epochs=p.teacher_epochs,
                warmup=p.warmup,
                seed=cfg.seed,
                device=cfg.device,
                overwrite=True,
            )
        ),
        note=f"shipped checkpoint {teacher}" if shipped else "",
    )
    stages.run(
        "student-itc",
        _done(students / "itc"),
        lambda: train_row(cfg, p, "itc", students / "itc", None, None),
    )

    def mine_and_score(split: str, cand: Path, suffix: str) -> dict:
        """Mine ``split`` with the ITC student into ``cand`` and score it into the one cache
        (always run: with everything cached it scores nothing, and the report shows that)."""
        stages.run(
            "mine-candidates" + suffix,
            (cand / CANDIDATES_JSON).is_file(),
            lambda: mine_candidates(
                MineConfig(
                    data=data,
                    student=str(students / "itc"),
                    out=cand,
                    split=split,
                    k=p.k,
                    seed=cfg.seed,
                    device=cfg.device,
                    overwrite=True,
                )
            ),
        )
        return stages.run(
            "score-teacher" + suffix,
            False,
            lambda: score_teacher(
                ScoreConfig(
                    candidates=cand,
                    teacher=str(teacher),
                    cache_dir=out / "cache",
                    shards=p.shards,
                    device=cfg.device,
                )
            ),
        )

    cand = out / "candidates"
    score = mine_and_score("train", cand, "")
    cache_path = Path(score["cache_path"])
    # The test split's candidates, scored into the same cache: what the ranking agreement reads.
    mine_and_score("test", out / "candidates-test", " test")
    for name in DEMO_ROWS[1:]:
        stages.run(
            f"student-{name}",
            _done(students / name),
            lambda n=name: train_row(cfg, p, n, students / n, cache_path, cand),
        )

    from pipeline.stages.report import row

    t0 = time.perf_counter()
    full = _teacher_full(data, teacher, out / "teacher-full", cfg.device)
    rows = [
        row(
            "teacher-full",
            full["metrics"],
            full["metrics_full"],
            note=f"the teacher ranks all {full['pairs']} test pairs",
        )
    ]
    stages.records.append(
        {
            "stage": "teacher-full",
            "seconds": round(time.perf_counter() - t0, 1),
            "reused": full["reused"],
            "note": "every test pair",
        }
    )
    base = EvalConfig(
        data=data,
        student=str(students / "itc"),
        split="test",
        device=cfg.device,
        teacher_scores=cache_path,
    )
    t0 = time.perf_counter()
    itc = evaluate(replace(base, rerank_teacher=str(teacher), rerank_k=p.rerank_k))
    rows.append(
        row(
            "teacher-rerank",
            itc["rerank_metrics"],
            itc.get("rerank_metrics_full"),
            note=f"ITC student's top-{p.rerank_k} re-ranked by the teacher",
        )
    )
    for name in DEMO_ROWS:
        res = itc if name == "itc" else evaluate(replace(base, student=str(students / name)))
        rows.append(
            row(
                f"student-{name}",
                res["metrics"],
                res.get("metrics_full"),
                ranking_agreement=agreement(res["ranking_agreement"]),
                val_rsum=best_val(students / name),
            )
        )
    stages.records.append(
        {
            "stage": "evaluate",
            "seconds": round(time.perf_counter() - t0, 1),
            "reused": False,
            "note": "test split",
        }
    )

    from pipeline.core.candidates import read_manifest
    from pipeline.stages.report import write_report

    students_by_val = sorted(
        (r for r in rows if r["name"].startswith("student-") and r["val_rsum"] is not None),
        key=lambda r: -r["val_rsum"],
    )
    mined = {
        "mined_false_negatives": read_manifest(cand).get("false_negatives"),
        # the recipe the demo recommends: the student best on val (test never chooses)
        "best_student": students_by_val[0]["name"] if students_by_val else None,
    }
    return write_report(out, rows, stages.records, score, profile=cfg.profile, extra=mined)


def _teacher_full(data: Path, teacher: Path, out: Path, device: str | None) -> dict:
    """The teacher ranking every test pair (kept under ``out``, reused while unchanged)."""
    from pipeline.stages.teacher_full import teacher_full_metrics
    from teacher.model import load_teacher

    loaded = load_teacher(str(teacher), device=device)
    return teacher_full_metrics(Dataset.load(data), "test", loaded, out=out)


def _claim(out: Path) -> None:
    """Make ``out`` a demo run dir: absent, empty or a demo's own; anything else is refused.

    A re-run deletes stale stages under ``out`` (teacher/, students/, candidates/), so a
    directory that no demo wrote, such as a dataset, must never be taken for one.
    """
    from pipeline.core.atomic import check_out, write_json

    if not out.exists():
        check_out(out)  # names a parent that is a file
    elif not out.is_dir():
        raise NotADirectoryError(f"--out '{out}' is a file; choose a directory for the demo run")
    elif any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        raise FileExistsError(
            f"--out '{out}' is a non-empty directory that no `cprd demo` wrote (no {DEMO_MARKER}); "
            "choose a new or empty --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / DEMO_MARKER, {"written_by": "cprd demo"})


def demo_teacher(out: Path, p: DemoProfile) -> tuple[Path, bool]:
    """(the teacher dir a demo run under ``out`` uses, whether it is the shipped one)."""
    shipped = _shipped_teacher() if p.shipped_teacher else None
    return (shipped, True) if shipped is not None else (out / "teacher", False)


def _shipped_teacher() -> Path | None:
    """The shipped demo teacher, or None (with a warning) when it is absent or out of date."""
    from pipeline.stages.demo_data import GENERATOR_VERSION

    marker = SHIPPED_TEACHER / "trained_on.json"  # written by train-teacher beside the model
    if not marker.is_file():
        log.warning("no shipped teacher at %s: training one (slow, see its README)", marker.parent)
        return None
    version = json.loads(marker.read_text())["source"].get("generator_version")
    if version != GENERATOR_VERSION:
        log.warning(
            "shipped teacher was trained on demo-data version %s, this is %s: training one",
            version,
            GENERATOR_VERSION,
        )
        return None
    return SHIPPED_TEACHER


def _done(student_dir: Path) -> bool:
    """A student that trained all its epochs (a killed run is trained again)."""
    from student.checkpoint import finished

    return finished(student_dir)


def _same_data(data: Path, cfg: DemoConfig, p: DemoProfile) -> bool:
    """True when ``data`` already holds the demo dataset this profile and seed would generate."""
    if not (data / DATASET_JSON).is_file():
        return False
    from pipeline.stages.demo_data import GENERATOR_VERSION

    src = Dataset.load(data).meta.get("source", {})
    want = {
        "generator_version": GENERATOR_VERSION,  # a newer generator draws other pictures
        "seed": cfg.seed,
        "train_images": p.train_images,
        "val_images": p.val_images,
        "test_images": p.test_images,
    }
    return all(src.get(k) == v for k, v in want.items())
