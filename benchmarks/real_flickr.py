"""Real photographs: the whole pipeline on the Flickr8k fixture with the towers that exist offline.

Stages (DESIGN 6b), each reused when its output is already under ``--out``, so an interrupted
run continues where it stopped:

1. import the Karpathy JSON (``--quick``: the first quarter of each split) -> OUT/data;
2. the pretrained dual encoder ``effnet-minilm`` (frozen ImageNet EfficientNet-Lite0 and MiniLM
   towers, linear heads trained with ITC) -> OUT/students/effnet-minilm: the miner, and a row;
3. the teacher ``--base effnet-minilm`` (a cross-encoder over the towers' token features with the
   dual encoder's similarity as a prior) -> OUT/teacher;
4. mine the train split's candidates with the dual encoder; score them once with the teacher;
5. mine the test split too and score it into the same cache (the ranking agreement's input);
6. cheap students, all from that one cache: the fast query encoder
   ``effnet-minilm:text-layers=2,text-width=128`` (frozen image tower, a 2-layer text tower from
   scratch), one row per entry of LOSSES, ``--seeds`` seeds each, at equal optimizer steps
   (random batches get 1 + NEIGHBOURS times the epochs); each keeps its best epoch on val ->
   OUT/students/ROW (seed 0) and OUT/students/ROW-seedS. Every row is paired seed by seed with the
   control: the teacher-free row best on val (``none``, random batches, or ``itc-hard``, hard
   batches in the miner's order; both with ground-truth labels only);
7. evaluate everything on test (with the ranking agreement), plus the teacher re-ranking the
   dual encoder's top-K.

Frozen towers' features are computed once into OUT/features (pipeline/features.py). Writes
``benchmarks/results/real_flickr.md`` (not with ``--quick``). Last line with ``--json``: one
JSON object.

    python benchmarks/real_flickr.py --seeds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    METRICS,
    paired,
    strongest_control,
    summarise,
    val_curve,
    write_result,
)

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-3k"
DUAL = "effnet-minilm"
CHEAP = "effnet-minilm:text-layers=2,text-width=128"
# row name -> train-student options. Hard batches in the miner's order with ground-truth labels
# and no teacher (`itc-hard`) are the control every other row is paired with; each query
# receives its top hard_k cached negatives in every hard row (the defaults).
LOSSES: dict[str, dict] = {
    "none": {"loss": "none", "batching": "random"},  # plain ITC, random batches
    "itc-hard": {"loss": "none", "batching_order": "miner"},  # control: no teacher at all
    "itc-teacher-batches": {"loss": "none", "batching_order": "teacher"},  # teacher batches only
    "cprd": {"loss": "cprd"},
    "kl": {"loss": "kl"},
    "listmle": {"loss": "listmle"},
    "margin-mse": {"loss": "margin-mse"},
    # random batches: each query's cached negatives still delivered (hard batches cost ITC here)
    "cprd-random": {"loss": "cprd", "batching": "random"},
    "kl-random": {"loss": "kl", "batching": "random"},
}
TEACHER_FREE = ("none", "itc-hard")  # the control is whichever of these is best on val
NEIGHBOURS = 1  # hard batching: neighbour pairs per seed (an epoch is 1 + NEIGHBOURS times longer)


@dataclass(frozen=True)
class Profile:
    fraction: float  # of each split of the fixture
    dual_epochs: int
    teacher_epochs: int
    student_epochs: int
    k: int  # candidates mined per query; also the teacher's re-rank depth on test
    seeds: int | None  # None: --seeds


PROFILES = {
    "full": Profile(1.0, dual_epochs=5, teacher_epochs=4, student_epochs=10, k=16, seeds=None),
    "quick": Profile(0.25, dual_epochs=3, teacher_epochs=1, student_epochs=3, k=8, seeds=1),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", type=Path, default=FIXTURE, help="folder with the Karpathy JSON")
    ap.add_argument("--out", type=Path, default=Path("data/real-flickr"))
    ap.add_argument("--seeds", type=int, default=3, help="seeds of every row")
    ap.add_argument("--rows", default=",".join(LOSSES), help="comma-separated subset of rows")
    ap.add_argument("--quick", action="store_true", help="a quarter of the data, 1 seed")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    karpathy = args.fixture / "dataset_flickr8k.json"
    if not karpathy.is_file():
        ap.error(f"--fixture {args.fixture}: no dataset_flickr8k.json there")
    p = PROFILES["quick" if args.quick else "full"]
    seeds = p.seeds or args.seeds
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ["CPRD_FEATURE_CACHE"] = str((out / "features").resolve())

    from pipeline.stages.evaluate import EvalConfig, evaluate
    from pipeline.stages.mine import MineConfig, mine_candidates
    from pipeline.stages.score import ScoreConfig, score_teacher
    from teacher.train import train_teacher
    from teacher.train_config import TeacherTrainConfig

    stages: list[dict] = []

    # Seconds each stage took when it ran, kept across runs: a reused stage reports the time it
    # cost when it was computed, so the table always shows what the whole run costs.
    timings_file = out / "stage_seconds.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}

    def stage(name: str, done: bool, fn, no_op=lambda result: False):
        t0 = time.perf_counter()
        result = None if done else fn()
        done = done or no_op(result)  # e.g. score-teacher with every pair already cached
        if not done or name not in timings:
            timings[name] = round(time.perf_counter() - t0, 1)
            timings_file.write_text(json.dumps(timings, indent=1))
        stages.append({"stage": name, "seconds": timings[name], "reused": done})
        print(
            f"[real_flickr] {name}: {timings[name]} s{' (reused)' if done else ''}",
            file=sys.stderr,
        )
        return result

    data = out / "data"
    stage("import", (data / "dataset.json").is_file(), lambda: _import(karpathy, data, p))
    students = out / "students"
    dual = students / DUAL
    stage(
        "dual-encoder",
        _done(dual),
        lambda: _student(
            data, dual, DUAL, p.dual_epochs, 0, args.device, loss="none", batching="random"
        ),
    )
    teacher = out / "teacher"
    stage(
        "train-teacher",
        (teacher / "train_config.json").is_file(),
        lambda: train_teacher(
            TeacherTrainConfig(
                data=str(data),
                out=str(teacher),
                base="effnet-minilm",
                epochs=p.teacher_epochs,
                device=args.device,
                overwrite=True,
            )
        ),
    )

    def mine_and_score(split: str, cand: Path, suffix: str) -> dict:
        """Mine ``split`` with the dual encoder into ``cand``, score it into the one cache
        (always: with everything cached it scores nothing)."""
        stage(
            "mine-candidates" + suffix,
            (cand / "candidates.json").is_file(),
            lambda: mine_candidates(
                MineConfig(
                    data=data,
                    student=str(dual),
                    out=cand,
                    split=split,
                    k=p.k,
                    device=args.device,
                    overwrite=True,
                )
            ),
        )
        return stage(
            "score-teacher" + suffix,
            False,
            lambda: score_teacher(
                ScoreConfig(
                    candidates=cand,
                    teacher=str(teacher),
                    cache_dir=out / "cache",
                    shards=16,
                    device=args.device,
                )
            ),
            no_op=lambda result: result["pairs_scored"] == 0,
        )

    cand = out / "candidates"
    score = mine_and_score("train", cand, "")
    cache = Path(score["cache_path"])
    # The test split's candidates, scored into the same cache: the ranking agreement's input.
    mine_and_score("test", out / "candidates-test", " test")

    runs: dict[str, list[dict]] = {}
    val: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}
    t_eval = 0.0
    for name in args.rows.split(","):
        kw = dict(LOSSES[name])
        epochs = p.student_epochs
        if kw.get("batching") == "random":
            epochs *= 1 + NEIGHBOURS  # equal optimizer steps: a hard epoch is that much longer
        if kw.get("batching") != "random" or kw["loss"] != "none":
            kw.update(teacher_scores=cache, candidates=cand)
        for seed in range(seeds):
            where = students / (name if seed == 0 else f"{name}-seed{seed}")
            stage(
                f"student {name} seed {seed}",
                _done(where),
                lambda w=where, s=seed, k=kw, e=epochs: _student(
                    data, w, f"{CHEAP},seed={s}", e, s, args.device, **k
                ),
            )
            t0 = time.perf_counter()
            res = evaluate(
                EvalConfig(
                    data=data,
                    student=str(where),
                    split="test",
                    device=args.device,
                    teacher_scores=cache,
                ),
                progress=False,
            )
            t_eval += time.perf_counter() - t0
            agree = res["ranking_agreement"]
            runs.setdefault(name, []).append(
                {
                    **res["metrics"],
                    "tau": (agree["i2t"]["kendall_tau"] + agree["t2i"]["kendall_tau"]) / 2,
                }
            )
            val.setdefault(name, []).append(_best_val(where))
            if seed == 0:
                extra[name] = _run_facts(where)
            print(
                f"[real_flickr] {name} seed {seed}: test rsum {res['metrics']['rsum']:.1f}",
                file=sys.stderr,
            )

    t0 = time.perf_counter()
    res = evaluate(
        EvalConfig(
            data=data,
            student=str(dual),
            split="test",
            device=args.device,
            rerank_teacher=str(teacher),
            rerank_k=p.k,
        )
    )
    stages.append(
        {
            "stage": "evaluate",
            "seconds": round(t_eval + time.perf_counter() - t0, 1),
            "reused": False,
        }
    )
    runs = {"teacher-rerank": [res["rerank_metrics"]], DUAL: [res["metrics"]], **runs}
    val = {"teacher-rerank": [_teacher_val(teacher)], DUAL: [_best_val(dual)], **val}

    rows = [_summary(n, r, val.get(n)) for n, r in runs.items()]
    by = {r["name"]: r for r in rows}
    control = strongest_control(val, TEACHER_FREE)
    diff = paired(runs, control) if control else {}
    for r in rows:
        r.update(extra.get(r["name"], {}))
        r["vs_control"] = diff.get(r["name"])
        taus = [x["tau"] for x in runs[r["name"]] if "tau" in x]
        r["kendall_tau"] = round(statistics.fmean(taus), 3) if taus else None
    if "none" in by:
        lo, hi = by["none"]["rsum_mean"], by["teacher-rerank"]["rsum_mean"]
        for r in rows:
            r["gap_closed"] = round((r["rsum_mean"] - lo) / (hi - lo), 3) if hi != lo else None
    result = {
        "profile": "quick" if args.quick else "full",
        "seeds": seeds,
        "rows": rows,
        "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages), 1),
        "teacher_cache": {k: score[k] for k in ("cache_path", "pairs_total", "pairs_scored")},
        "control": control,
        "out": str(out),
    }
    body = _markdown(result)
    print(body)
    if not args.quick:
        path = write_result("real_flickr", "Real photographs: Flickr8k fixture", body, result)
        print(f"written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


def _import(karpathy: Path, data: Path, p: Profile) -> dict:
    """The fixture, or (quick) the first ``p.fraction`` of each split, imported as a user would."""
    from pipeline.stages.importers import import_karpathy

    source = karpathy
    if p.fraction < 1.0:
        doc = json.loads(karpathy.read_text(encoding="utf-8"))
        keep, seen = [], {}
        for split in ("train", "val", "test"):
            seen[split] = sum(1 for im in doc["images"] if im["split"] == split)
        taken = dict.fromkeys(seen, 0)
        for im in doc["images"]:
            if taken[im["split"]] < int(seen[im["split"]] * p.fraction):
                keep.append(im)
                taken[im["split"]] += 1
        data.parent.mkdir(parents=True, exist_ok=True)
        source = data.parent / "karpathy-subset.json"
        source.write_text(json.dumps({**doc, "images": keep}), encoding="utf-8")
    return import_karpathy(source, karpathy.parent / "images", data, progress=False, overwrite=True)


def _student(data: Path, out: Path, spec: str, epochs: int, seed: int, device, **kw) -> dict:
    from student.train import train_student
    from student.train_config import StudentTrainConfig

    cfg = StudentTrainConfig(
        data=data,
        out=out,
        student=spec,
        epochs=epochs,
        batch_size=128,
        lr=1e-3,
        warmup_steps=20,
        seed=seed,
        device=device,
        num_workers=0,
        neighbours_per_seed=NEIGHBOURS,
        overwrite=True,
        **kw,
    )
    return train_student(cfg, progress=False)


def _run_facts(student_dir: Path) -> dict:
    """Optimizer steps, val RSUM per epoch and what the losses received (last epoch), from a
    student's metrics.jsonl."""
    vals = [
        rec
        for rec in map(json.loads, (student_dir / "metrics.jsonl").read_text().splitlines())
        if rec.get("event") == "val"
    ]
    return {
        "steps": vals[-1]["step"],
        "val_curve": val_curve(student_dir),
        "negatives_per_query": vals[-1].get("negatives_per_query"),
    }


def _done(student_dir: Path) -> bool:
    """A student that trained all its epochs (a killed run is trained again)."""
    from student.checkpoint import finished

    return finished(student_dir)


def _best_val(student_dir: Path) -> float | None:
    """The val RSUM of the epoch a student kept (its selection on val)."""
    best = None
    for line in (student_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "val":
            best = max(best or rec["val"]["rsum"], rec["val"]["rsum"])
    return best


def _teacher_val(teacher: Path) -> float | None:
    """The teacher's best val re-rank RSUM, when its metrics say."""
    best = None
    path = teacher / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        value = rec.get("rerank_rsum")
        if value is not None:
            best = max(best or value, value)
    return best


def _summary(name: str, runs: list[dict], val: list | None) -> dict:
    row = summarise(name, runs)
    kept = [v for v in (val or []) if v is not None]
    row["val_rsum_mean"] = round(statistics.fmean(kept), 2) if kept else None
    return row


def _diff(d: dict | None) -> str:
    return "" if d is None else f"{d['mean']:+.1f} ± {d['sd']:.1f}"


def _markdown(result: dict) -> str:
    head = (
        "| row | n | steps | "
        + " | ".join(METRICS)
        + f" | vs {result['control']} (paired) | Kendall tau "
        "| val RSUM | gap closed |"
    )
    lines = [head, "|" + "---|" * (len(METRICS) + 7)]
    for r in result["rows"]:
        cells = [f"{r[f'{m}_mean']:.1f} ± {r[f'{m}_sd']:.1f}" for m in METRICS]
        v, gap = r.get("val_rsum_mean"), r.get("gap_closed")
        d = r.get("vs_control")
        lines.append(
            f"| {r['name']} | {r['n']} | {r.get('steps') or ''} | "
            + " | ".join(cells)
            + f" | {_diff(d)}"
            + f" | {'' if r.get('kendall_tau') is None else r['kendall_tau']}"
            + f" | {'' if v is None else f'{v:.1f}'} | {'' if gap is None else gap} |"
        )
    curves = [f"- `{r['name']}`: {r['val_curve']}" for r in result["rows"] if r.get("val_curve")]
    stage_lines = ["| stage | seconds (when computed) | reused in this run |", "|---|---|---|"]
    stage_lines += [f"| {s['stage']} | {s['seconds']} | {s['reused']} |" for s in result["stages"]]
    return (
        f"Profile `{result['profile']}`; test split of the fixture; mean ± standard deviation "
        f"over seeds (n). `{DUAL}`: the pretrained dual encoder (frozen towers, linear heads), the "
        f"miner. `teacher-rerank`: the teacher re-ranking its top-K. Every other row is the cheap "
        f"student `{CHEAP}` trained with that loss from the one teacher cache and kept at its "
        "best val epoch. `gap closed` = (RSUM - none) / (teacher-rerank - none), from the means. "
        f"Total {result['total_seconds']} s.\n\n"
        + "\n".join(lines)
        + "\n\nVal RSUM after each epoch (seed 0; a control that still climbs at the end was "
        "not trained out):\n\n" + "\n".join(curves) + "\n\n" + "\n".join(stage_lines)
    )


if __name__ == "__main__":
    main()
