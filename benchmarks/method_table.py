"""The method table: every distillation loss trained from one teacher cache, several seeds each.

Runs (or reuses) ``cprd demo`` under ``--out`` for the data, the teacher, the miner and the
teacher cache, then trains one student per (variant, seed) from that same cache with the demo's
student settings, evaluates each on ``test``, and writes ``benchmarks/results/method.md``: the
mean and spread of every metric per variant, and the fraction of the ITC -> teacher-rerank gap
(RSUM) each closes. This is the reproduction of the paper's claims on the embedded benchmark:
CPRD above logit distillation (``kl``), and the full ranking over all negatives (``listmle``,
``cprd-all``) no better than the partial ranking (``cprd``).

Every student lands in ``OUT/method/VARIANT/seedS`` and is reused on a re-run, so an interrupted
run continues where it stopped. Last line of stdout with ``--json``: one JSON object.

    python benchmarks/method_table.py --seeds 3 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import METRICS, RESULTS, summarise, write_result  # noqa: E402

# name -> train-student options (every variant but `itc` uses the demo's hard batches and cache)
VARIANTS: dict[str, dict] = {
    "itc": {"loss": "none", "batching": "random"},
    "itc-hard": {"loss": "none"},
    "kl": {"loss": "kl"},
    "margin-mse": {"loss": "margin-mse"},
    "listmle": {"loss": "listmle"},
    "cprd": {"loss": "cprd"},  # the first 4 negatives in teacher order are anchors
    "cprd-top1": {"loss": "cprd", "valid_top": 1},
    "cprd-p0.5": {"loss": "cprd", "valid_min_prob": 0.5},
    "cprd-all": {"loss": "cprd", "valid_top": 10_000},  # every cached negative: full ranking
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/method-run"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the demo's quick profile, 1 seed")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of variants this run does not train from the existing results file "
        "(same profile and seeds): adds variants to the table without retraining the others",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = 1 if args.quick else args.seeds

    from pipeline.stages.demo import PROFILES, DemoConfig, _done, _student, demo_teacher, run_demo
    from pipeline.stages.evaluate import EvalConfig, evaluate

    profile = "quick" if args.quick else "full"
    cfg = DemoConfig(out=args.out, profile=profile)
    t0 = time.perf_counter()
    demo = run_demo(cfg)
    demo_seconds = round(time.perf_counter() - t0, 1)
    cache = Path(demo["teacher_cache"]["cache_path"])
    p = PROFILES[profile]
    data = args.out / "data"
    teacher, _ = demo_teacher(args.out, p)

    runs: dict[str, list[dict]] = {n: [] for n in ["teacher-rerank", *names]}
    seconds: dict[str, float] = {}
    for name in names:
        for seed in range(seeds):
            out = args.out / "method" / name / f"seed{seed}"
            kw = dict(VARIANTS[name])
            if kw.get("batching") != "random":
                kw["teacher_scores"] = cache
            t = time.perf_counter()
            if not _done(out):
                _student(replace(cfg, seed=seed), p, out, **kw)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
            ev = EvalConfig(data=data, student=str(out), split="test")
            if name == "itc":  # the teacher re-ranks each ITC student's top-k
                ev = replace(ev, rerank_teacher=str(teacher), rerank_k=p.rerank_k)
            res = evaluate(ev)
            runs[name].append(res["metrics"])
            if name == "itc":
                runs["teacher-rerank"].append(res["rerank_metrics"])
            print(f"{name} seed {seed}: rsum {res['metrics']['rsum']:.1f}", file=sys.stderr)

    rows = [summarise(n, r) for n, r in runs.items() if r]
    merged_from: list[str] = []
    if args.merge:
        rows, merged_from = _merged(rows, profile, seeds)
    by = {r["name"]: r for r in rows}
    if "itc" in by:
        lo, hi = by["itc"]["rsum_mean"], by["teacher-rerank"]["rsum_mean"]
        for r in rows:
            r["gap_closed"] = round((r["rsum_mean"] - lo) / (hi - lo), 3) if hi != lo else None
    result = {
        "profile": profile,
        "seeds": seeds,
        "rows": rows,
        "demo_seconds": demo_seconds,
        "student_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cache": str(cache),
        "merged_from": merged_from,
    }
    path = write_result(
        "method",
        "Method table: distillation losses from one teacher cache",
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


def _markdown(result: dict) -> str:
    head = "| variant | n | " + " | ".join(METRICS) + " | gap closed |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    for r in result["rows"]:
        cells = [f"{r[f'{m}_mean']:.1f} ± {r[f'{m}_sd']:.1f}" for m in METRICS]
        gap = r.get("gap_closed")
        lines.append(
            f"| {r['name']} | {r['n']} | "
            + " | ".join(cells)
            + f" | {'' if gap is None else gap} |"
        )
    return (
        f"Profile `{result['profile']}` of `cprd demo`, {result['seeds']} seed(s) per variant, "
        "test split; mean ± standard deviation over seeds. `gap closed` = (RSUM - ITC RSUM) / "
        "(teacher-rerank RSUM - ITC RSUM), from the means. `teacher-rerank` is the teacher "
        "re-ranking each ITC student's top-k."
        + "".join(
            f" Rows not trained by this command come from `{c}`."
            for c in result.get("merged_from", [])
        )
        + "\n\n"
        + "\n".join(lines)
    )


if __name__ == "__main__":
    main()
