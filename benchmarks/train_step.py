"""Cost of the distillation term as shipped: a CPRD training step vs a plain ITC step.

Every mode is a real `train_student` run (tiny open_clip student, one epoch) on the same demo
data, teacher cache and hard batches, so the times include everything a step costs as shipped:
data loading, the negative bank's refresh at the epoch start and its reads, the lists, the loss,
backward and AdamW. Modes:
- `itc`: ITC over the batch's pairs only, no negatives delivered (the plain step);
- `cprd`: the default configuration (`--negatives bank`: each query's cached negatives read from
  the bank for the CPRD term; ITC over the pairs);
- `itc-pool`: ITC with the same delivery, the delivered negatives in its denominators;
- `cprd-explicit`: the extras encoded in the step instead (extra forward and backward passes);
- `cprd-inbatch`: only the negatives the batch happens to hold (the old default).
Per mode: seconds per step (the fastest of the interleaved repeats; noise only adds time) and the
cached negatives per query the losses received. `ratio` = cprd / itc (target <= 1.3).

    cprd demo --out data/demo-run          # once: the data and the teacher cache
    python benchmarks/train_step.py --demo data/demo-run --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import write_result  # noqa: E402

MODES = {
    "itc": {"loss": "none", "negatives": "inbatch", "itc_negatives": "batch"},
    "cprd": {"loss": "cprd"},
    "itc-pool": {"loss": "none", "itc_negatives": "pool"},
    "cprd-explicit": {"loss": "cprd", "negatives": "explicit"},
    "cprd-inbatch": {"loss": "cprd", "negatives": "inbatch"},
}


def _cache_of(demo: Path) -> Path:
    """The demo's teacher cache entry (the one directory under demo/cache holding a key.json)."""
    entries = sorted(p.parent for p in (demo / "cache").glob("*/key.json"))
    if len(entries) != 1:
        raise SystemExit(
            f"--demo {demo}: expected one teacher cache entry under {demo / 'cache'}, found "
            f"{len(entries)}; run `cprd demo --out {demo}` first"
        )
    return entries[0]


def run(mode: str, demo: Path, out: Path, batch: int, neighbours: int) -> dict:
    from student.train import train_student
    from student.train_config import StudentTrainConfig

    cfg = StudentTrainConfig(
        data=demo / "data",
        out=out,
        student="tiny",
        teacher_scores=_cache_of(demo),
        epochs=1,
        batch_size=batch,
        neighbours_per_seed=neighbours,
        num_workers=0,
        warmup_steps=10,
        overwrite=True,
        device="cpu",
        **MODES[mode],
    )
    s = train_student(cfg, progress=False)
    return {
        "seconds_per_step": s["train_seconds"] / s["steps"],
        "steps": s["steps"],
        "negatives_per_query": s["negatives_per_query"],
        "bank_staleness": s["bank_staleness"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=Path("data/demo-run"), help="a `cprd demo` out")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--neighbours", type=int, default=3, help="hard batching: per seed")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per mode")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    ap.add_argument("--quick", action="store_true", help="batch 32, 1 repeat, itc and cprd only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.quick:
        args.batch_size, args.repeats, modes = 32, 1, ["itc", "cprd"]
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved: drift in machine load hits every mode
            for mode in modes:
                got = run(mode, args.demo, Path(tmp) / mode, args.batch_size, args.neighbours)
                print(
                    f"repeat {r + 1} {mode}: {got['seconds_per_step']:.3f} s/step", file=sys.stderr
                )
                if mode not in best or got["seconds_per_step"] < best[mode]["seconds_per_step"]:
                    best[mode] = got
    itc = best["itc"]["seconds_per_step"]
    result = {
        "batch_size": args.batch_size,
        "neighbours_per_seed": args.neighbours,
        "repeats": args.repeats,
        "modes": best,
        "ratio": best["cprd"]["seconds_per_step"] / itc,
    }

    def used(m: str, d: str) -> str:
        got = best[m]["negatives_per_query"]
        return "-" if got is None else f"{got[d]['used']:.2f} / {got[d]['available']:.2f}"

    body = (
        "| mode | s/step | vs ITC | i2t used / available | t2i used / available | bank staleness "
        "(mean / max steps) |\n| --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(
            f"| {m} | {v['seconds_per_step']:.3f} | {v['seconds_per_step'] / itc:.2f}x | "
            f"{used(m, 'i2t')} | {used(m, 't2i')} | "
            + (
                f"{v['bank_staleness']['mean']:.1f} / {v['bank_staleness']['max']}"
                if v["bank_staleness"]
                else "-"
            )
            + " |"
            for m, v in best.items()
        )
        + f"\n\nOne epoch of `train_student` per mode on `{args.demo}` (tiny student, batch "
        f"{args.batch_size}, hard batches in teacher order with {args.neighbours} neighbours per "
        f"seed), the fastest of {args.repeats} interleaved runs; s/step = training seconds "
        "(bank refresh included, validation excluded) / steps."
    )
    if not args.quick:
        write_result("train_step", "Training step cost as shipped: CPRD vs ITC", body, result)
    print(json.dumps(result, sort_keys=True) if args.json else body)


if __name__ == "__main__":
    main()
