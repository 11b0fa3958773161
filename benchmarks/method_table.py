"""The method table: every student row trained from one teacher cache, several seeds each.

Runs (or reuses) ``cprd demo`` under ``--out`` for the data (generator version 3: captions that
fit several images, and the full caption-image relation), the teacher, the miner and the teacher
cache, then trains every row of ``pipeline.stages.demo.ROWS`` for each seed with the demo's
student settings (equal optimizer steps; every hard row receives each query's cached negatives),
evaluates each on ``test`` on both label sets (``rsum``: the dataset's labels; ``rsum_full``: any
truly matching item counts) with its ranking agreement (Kendall tau with the teacher over the
test split's scored candidates), and writes ``benchmarks/results/method.md``: mean and spread per
row, and each row's seed-by-seed difference from the control, the teacher-free row (``itc`` or
``itc-hard``, hard batches in the miner's order; ground-truth labels only) best on val. The
teacher rows come from the demo: ``teacher-full`` ranks every test pair, ``teacher-rerank``
re-ranks the ITC student's top-k.

Every student lands in ``OUT/method/ROW/seedS`` and is reused on a re-run, so an interrupted
run continues where it stopped. Last line of stdout with ``--json``: one JSON object.

    python benchmarks/method_table.py --seeds 3 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    METRICS,
    RESULTS,
    paired,
    strongest_control,
    summarise,
    val_curve,
    write_result,
)

TEACHER_FREE = ("itc", "itc-hard")  # the control is whichever of these is best on val


def main(argv: list[str] | None = None) -> dict:
    from pipeline.stages.demo import PROFILES, DemoConfig, _done, run_demo
    from pipeline.stages.demo_rows import ROWS, agreement, best_val, train_row
    from pipeline.stages.evaluate import EvalConfig, evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/method-run"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the demo's quick profile, 1 seed")
    ap.add_argument("--variants", default=",".join(ROWS), help="comma-separated subset of rows")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of variants this run does not train from the existing results file "
        "(same profile and seeds): adds variants to the table without retraining the others",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(ROWS)}")
    seeds = 1 if args.quick else args.seeds

    profile = "quick" if args.quick else "full"
    cfg = DemoConfig(out=args.out, profile=profile)
    t0 = time.perf_counter()
    demo = run_demo(cfg)
    demo_seconds = round(time.perf_counter() - t0, 1)
    cache = Path(demo["teacher_cache"]["cache_path"])
    p = PROFILES[profile]
    data, cand = args.out / "data", args.out / "candidates"

    runs: dict[str, list[dict]] = {}
    for r in demo["rows"]:
        if r["name"].startswith("teacher-"):
            runs[r["name"]] = [{**{m: r[m] for m in METRICS}, "rsum_full": r.get("rsum_full")}]
    seconds: dict[str, float] = {}
    facts: dict[str, dict] = {}
    for name in names:
        for seed in range(seeds):
            out = args.out / "method" / name / f"seed{seed}"
            t = time.perf_counter()
            if not _done(out):
                train_row(replace(cfg, seed=seed), p, name, out, cache, cand)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
            res = evaluate(
                EvalConfig(data=data, student=str(out), split="test", teacher_scores=cache)
            )
            runs.setdefault(name, []).append(
                {
                    **res["metrics"],
                    "rsum_full": res.get("rsum_full"),
                    "tau": agreement(res["ranking_agreement"]),
                    "val_rsum": best_val(out),
                }
            )
            if seed == 0:
                recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                facts[name] = {
                    "steps": [r for r in recs if r.get("event") == "val"][-1]["step"],
                    "val_curve": val_curve(out),
                }
            print(f"{name} seed {seed}: rsum {res['metrics']['rsum']:.1f}", file=sys.stderr)

    rows = []
    control = strongest_control(
        {n: [x.get("val_rsum") for x in r] for n, r in runs.items()}, TEACHER_FREE
    )
    diffs = {k: paired(runs, control, k) if control else {} for k in ("rsum", "rsum_full")}
    for n, r in runs.items():
        row = {**summarise(n, r), **facts.get(n, {})}
        for k in ("rsum_full", "tau", "val_rsum"):
            vals = [x[k] for x in r if x.get(k) is not None]
            row[f"{k}_mean"] = round(statistics.fmean(vals), 3) if vals else None
            row[f"{k}_sd"] = round(statistics.stdev(vals), 3) if len(vals) > 1 else 0.0
        row["vs_control"] = diffs["rsum"].get(n)
        row["vs_control_full"] = diffs["rsum_full"].get(n)
        rows.append(row)
    merged_from: list[str] = []
    if args.merge:
        rows, merged_from = _merged(rows, profile, seeds)
    result = {
        "profile": profile,
        "seeds": seeds,
        "rows": rows,
        "demo_seconds": demo_seconds,
        "student_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cache": str(cache),
        "mined_false_negatives": demo.get("mined_false_negatives"),
        "control": control,
        "merged_from": merged_from,
    }
    path = write_result(
        "method",
        "Method table: every student row from one teacher cache",
        _markdown(result),
        result,
    )
    print(_markdown(result))
    print(f"written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


def _merged(rows: list[dict], profile: str, seeds: int) -> tuple[list[dict], list[str]]:
    """(``rows`` plus the existing results file's rows of other variants, the commands that
    made those), when it was written for the same profile and seed count (the demo is
    deterministic: same data, teacher and cache)."""
    path = RESULTS / "method.md"
    if not path.is_file():
        return rows, []
    text = path.read_text()
    old = json.loads(text[text.rindex("```json") + len("```json") : text.rindex("```")])
    if (old["profile"], old["seeds"]) != (profile, seeds):
        print(f"--merge: {path} is for another profile or seed count; not merged", file=sys.stderr)
        return rows, []
    command = text.split("Command: `", 1)[1].split("`", 1)[0]
    mine = {r["name"] for r in rows}
    kept = [r for r in old["rows"] if r["name"] not in mine]
    merged = [*[r for r in rows if r["name"] == "teacher-rerank"], *kept] + [
        r for r in rows if r["name"] != "teacher-rerank"
    ]
    return merged, [*old.get("merged_from", []), command]


def _pm(mean, sd) -> str:
    return "" if mean is None else f"{mean:.1f} ± {sd:.1f}"


def _diff(d: dict | None) -> str:
    return "" if d is None else f"{d['mean']:+.1f} ± {d['sd']:.1f}"


def _markdown(result: dict) -> str:
    head = (
        "| row | n | steps | " + " | ".join(METRICS) + f" | rsum_full | vs {result['control']} "
        f"(rsum) | vs {result['control']} (rsum_full) | Kendall tau | val RSUM |"
    )
    lines = [head, "|" + "---|" * (len(METRICS) + 8)]
    for r in result["rows"]:
        cells = [_pm(r[f"{m}_mean"], r[f"{m}_sd"]) for m in METRICS]
        lines.append(
            f"| {r['name']} | {r['n']} | {r.get('steps') or ''} | "
            + " | ".join(cells)
            + f" | {_pm(r.get('rsum_full_mean'), r.get('rsum_full_sd') or 0)}"
            + f" | {_diff(r.get('vs_control'))} | {_diff(r.get('vs_control_full'))}"
            + f" | {'' if r.get('tau_mean') is None else r['tau_mean']}"
            + f" | {_pm(r.get('val_rsum_mean'), r.get('val_rsum_sd') or 0)} |"
        )
    curves = [f"- `{r['name']}`: {r['val_curve']}" for r in result["rows"] if r.get("val_curve")]
    fn = result.get("mined_false_negatives") or {}
    return (
        f"Profile `{result['profile']}` of `cprd demo` (generator version 3), {result['seeds']} "
        "seed(s) per row, test split; mean ± standard deviation over seeds. `rsum` counts the "
        "dataset's labels, `rsum_full` any truly matching item (the generator's full relation). "
        f"`vs {result['control']}`: seed-by-seed difference from the control, the teacher-free "
        "row (`itc`: random batches; `itc-hard`: hard batches in the miner's order) best on "
        "val, mean ± sd. Kendall tau: the student's order "
        "of each test query's teacher-scored candidates against the teacher's. Every student row "
        "takes the same optimizer steps; every hard row receives each query's cached negatives. "
        f"Mined negatives that truly match: {fn.get('all')}."
        + "".join(
            f" Rows not trained by this command come from `{c}`."
            for c in result.get("merged_from", [])
        )
        + "\n\n"
        + "\n".join(lines)
        + "\n\nVal RSUM after each epoch (seed 0):\n\n"
        + "\n".join(curves)
    )


if __name__ == "__main__":
    main()
