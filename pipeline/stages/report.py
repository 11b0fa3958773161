"""The demo's report: one table (also report.json / report.md) and a PNG of the two findings that
motivate ranking distillation: score distributions, and validation RSUM per epoch."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core import atomic
from pipeline.core.metrics import METRIC_KEYS

STUDENTS = ("itc", "itc-hard", "cprd", "kl")
# Optional columns, shown when some row has them: RSUM where any truly matching item counts
# (the dataset's full relation), and the student's ranking agreement with the teacher.
EXTRA_COLUMNS = {"rsum_full": "rsum_full", "ranking_agreement": "agreement"}


def row(name: str, metrics: dict, metrics_full: dict | None = None, **extra) -> dict:
    """One report row: ``name``, the labelled-protocol metrics, ``rsum_full`` and ``metrics_full``
    (None when the dataset has no relation), and any extra fields (e.g. ``ranking_agreement``,
    ``note``)."""
    return {
        "name": name,
        **metrics,
        "rsum_full": None if metrics_full is None else metrics_full["rsum"],
        "metrics_full": metrics_full,
        **extra,
    }


def table(rows: list[dict], seconds: dict[str, float] | None = None) -> str:
    """A fixed-width table: one row per model, the six recalls, RSUM, RSUM on the full relation
    and the ranking agreement (when some row has them), and wall time."""
    seconds = seconds or {}
    width = max(len(r["name"]) for r in rows) + 2
    extra = [k for k in EXTRA_COLUMNS if any(r.get(k) is not None for r in rows)]
    head = (
        f"{'':<{width}}"
        + "".join(f"{k:>10}" for k in METRIC_KEYS)
        + "".join(f"{EXTRA_COLUMNS[k]:>10}" for k in extra)
        + f"{'time s':>9}"
    )
    lines = [head]
    for r in rows:
        t = seconds.get(r["name"])
        lines.append(
            f"{r['name']:<{width}}"
            + "".join(f"{r[k]:>10.2f}" for k in METRIC_KEYS)
            + "".join(f"{r[k]:>10.2f}" if r.get(k) is not None else f"{'':>10}" for k in extra)
            + (f"{t:>9.0f}" if t is not None else f"{'':>9}")
        )
    return "\n".join(lines)


def _row_seconds(stages: list[dict]) -> dict[str, float]:
    """Wall time behind each row: a student's training; the teacher's training plus scoring."""
    by = {s["stage"]: s["seconds"] for s in stages}
    out = {f"student-{n}": by.get(f"student-{n}", 0.0) for n in STUDENTS}
    out["teacher-rerank"] = by.get("train-teacher", 0.0) + by.get("score-teacher", 0.0)
    out["teacher-full"] = by.get("teacher-full", 0.0)
    return out


def write_report(
    out: Path,
    rows: list[dict],
    stages: list[dict],
    score: dict,
    profile: str,
    extra: dict | None = None,
) -> dict:
    """Write report.json, report.md and report.png under ``out``; return the report dict
    (``extra``'s keys are added to it, e.g. the mined negatives' false-negative rate)."""
    out = Path(out)
    seconds = _row_seconds(stages)
    by = {r["name"]: r for r in rows}
    itc, cprd, teacher = (by[n]["rsum"] for n in ("student-itc", "student-cprd", "teacher-rerank"))
    gap = teacher - itc
    verdict = {
        "teacher_above_itc": teacher > itc,
        "cprd_above_itc": cprd > itc,
        "cprd_above_itc_hard": cprd > by["student-itc-hard"]["rsum"],
        "kl_above_itc_hard": (
            by["student-kl"]["rsum"] > by["student-itc-hard"]["rsum"]
            if "student-kl" in by
            else None
        ),
        "gap_closed": (cprd - itc) / gap if gap > 0 else None,
    }
    report = {
        "profile": profile,
        "rows": [{**r, "seconds": seconds.get(r["name"])} for r in rows],
        "stages": stages,
        "teacher_cache": {
            k: score.get(k)
            for k in (
                "cache_path",
                "pairs_total",
                "pairs_scored",
                "shards_written",
                "shards_skipped",
            )
        },
        "score_distributions": {
            "teacher": score.get("teacher_score"),
            "miner": score.get("miner_score"),
        },
        "verdict": verdict,
        **(extra or {}),
    }
    atomic.write_json(out / "report.json", report)
    atomic.write_bytes(out / "report.md", _markdown(report, rows, seconds).encode())
    _plot(out, out / "report.png")
    return report


def summary_lines(report: dict) -> list[str]:
    """Two sentences under the table: the cache's reuse, and whether the method worked."""
    c, v = report["teacher_cache"], report["verdict"]
    gap = (
        f"Fraction of the ITC-to-teacher RSUM gap closed by CPRD: {v['gap_closed']:.2f}."
        if v["gap_closed"] is not None
        else "The teacher re-ranking is not above ITC."
    )
    lines = []
    fn = report.get("mined_false_negatives")
    if fn and fn.get("all") is not None:
        lines.append(
            f"Mined negatives that are true matches (the dataset's full relation): {fn['all']:.1%} "
            f"({fn['false_negatives']} of {fn['negatives']}); `rsum_full` counts any true match."
        )
    if report.get("best_student"):
        best = {r["name"]: r for r in report["rows"]}[report["best_student"]]
        lines.append(
            f"Best student on val (the recipe to use): {report['best_student']} (val RSUM "
            f"{best['val_rsum']:.1f}, test RSUM {best['rsum']:.1f})."
        )
    return lines + [
        f"Teacher cache: {c['pairs_total']} unique pairs, {c['pairs_scored']} scored in this run"
        + (
            " (all reused from the cache)."
            if c["pairs_scored"] == 0
            else "."
            if c["pairs_scored"] == c["pairs_total"]
            else " (the rest reused)."
        ),
        f"Teacher re-ranking above the ITC student: {v['teacher_above_itc']}. CPRD above ITC: "
        f"{v['cprd_above_itc']}; above the teacher-free hard-batch control: "
        f"{v['cprd_above_itc_hard']} (KL: {v.get('kl_above_itc_hard')}). " + gap,
    ]


def _markdown(report: dict, rows: list[dict], seconds: dict) -> str:
    lines = [
        f"# cprd demo ({report['profile']} profile), test split",
        "",
        "```",
        table(rows, seconds),
        "```",
        "",
    ]
    lines += [line + "\n" for line in summary_lines(report)]
    lines += [
        f"Cache: `{report['teacher_cache']['cache_path']}`",
        "",
        "| stage | seconds | reused |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {s['stage']} | {s['seconds']} | {s['reused']} |" for s in report["stages"]]
    return "\n".join(lines) + "\n"


def _plot(out: Path, path: Path) -> None:
    """Left: teacher ITM logits vs the miner's cosine scores; right: val RSUM per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    from pipeline.core.cache import load_scores
    from pipeline.core.candidates import load_candidates

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    report = json.loads((out / "report.json").read_text())
    cache_path = Path(report["teacher_cache"]["cache_path"])
    teacher = load_scores(cache_path, columns=["score"])[1]["score"].to_numpy()
    miner = load_candidates(out / "candidates")[1]["score"].to_numpy()
    for values, name in ((teacher, "teacher ITM logit"), (miner, "ITC student cosine")):
        z = (values - values.mean()) / (values.std() + 1e-9)  # standardised: compare shapes
        left.hist(z, bins=60, alpha=0.5, density=True, label=name)
    left.set_title("candidate scores (standardised)")
    left.legend()
    for name in STUDENTS:
        f = out / "students" / name / "metrics.jsonl"
        if not f.is_file():
            continue
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        val = pl.DataFrame(
            [
                {"epoch": r["epoch"], "rsum": r["val"]["rsum"]}
                for r in recs
                if r.get("event") == "val"
            ]
        )
        if val.height:
            right.plot(val["epoch"], val["rsum"], marker="o", label=f"student-{name}")
    right.set_xlabel("epoch")
    right.set_ylabel("val RSUM")
    right.set_title("validation RSUM per epoch")
    right.legend()
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
