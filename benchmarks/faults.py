"""Crash-safety trials: kill -9 score-teacher at random moments, resume, compare with a clean run.

Each trial starts the real `cprd score-teacher` process on a fresh cache, kills it with SIGKILL
after a random delay (uniform over a clean run's wall time), runs the same command again to
completion, and compares every pair's score with the clean run. Writes
benchmarks/results/faults.md: trials, interruptions, results identical, data lost (must be 0).

    python benchmarks/faults.py --quick --json
    python benchmarks/faults.py --trials 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import write_result  # noqa: E402


def cprd(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def run(*args) -> dict:
    proc = cprd(*args, "--json")
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"cprd {args[0]} failed: {err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def scores(cache_path: str):
    from pipeline.cache import load_scores

    return load_scores(Path(cache_path))[1].sort("image_id", "caption_id")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="5 trials")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.trials = 5
    import torch

    from pipeline.dataset import Dataset
    from teacher.tiny import build_tiny_teacher

    work = Path(tempfile.mkdtemp(prefix="cprd-faults-"))
    run(
        "demo-data",
        "--out",
        work / "data",
        "--train-images",
        24,
        "--val-images",
        4,
        "--test-images",
        4,
        "--captions-per-image",
        3,
    )
    run("mine-candidates", "--data", work / "data", "--out", work / "cand", "--k", 6)
    torch.manual_seed(0)
    texts = Dataset.load(work / "data").captions["caption"].to_list()
    model, processor = build_tiny_teacher(texts)
    model.save_pretrained(work / "teacher")
    processor.save_pretrained(work / "teacher")
    cmd = [
        "score-teacher",
        "--candidates",
        work / "cand",
        "--teacher",
        work / "teacher",
        "--shards",
        16,
        "--batch-size",
        8,
    ]

    t0 = time.monotonic()
    clean = scores(run(*cmd, "--cache-dir", work / "clean")["cache_path"])
    wall = time.monotonic() - t0
    rng = random.Random(args.seed)
    interrupted = identical = lost = leftovers = 0
    for trial in range(args.trials):
        cache_dir = work / f"trial{trial}"
        proc = cprd(*cmd, "--cache-dir", cache_dir, "--json")
        time.sleep(rng.uniform(0, wall))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            interrupted += 1
        proc.communicate()
        summary = run(*cmd, "--cache-dir", cache_dir)
        got = scores(summary["cache_path"])
        identical += got.equals(clean)
        lost += clean.join(got, on=["image_id", "caption_id"], how="anti").height
        leftovers += sum(".tmp-" in p.name for p in Path(summary["cache_path"]).iterdir())
    result = {
        "trials": args.trials,
        "interrupted": interrupted,
        "identical": identical,
        "pairs_lost": lost,
        "temporaries_left": leftovers,
        "pairs": clean.height,
        "clean_wall_s": wall,
    }
    body = (
        f"| trials | interrupted by SIGKILL | results identical | pairs lost | temporaries "
        f"left |\n| --- | --- | --- | --- | --- |\n| {args.trials} | {interrupted} | "
        f"{identical} | {lost} | {leftovers} |\n\n{clean.height} unique pairs per run, 16 "
        f"shards; kill delay uniform in [0, {wall:.1f} s] (a clean run's wall time, start-up "
        "included)."
    )
    if not args.quick:
        write_result("faults", "Crash safety of score-teacher (SIGKILL trials)", body, result)
    print(json.dumps(result, sort_keys=True) if args.json else body)


if __name__ == "__main__":
    main()
