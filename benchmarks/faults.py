"""Crash-safety trials: kill -9 score-teacher and train-student at random moments, recover, compare.

score-teacher: each trial starts the real `cprd score-teacher` on a fresh cache, kills it with
SIGKILL after a random delay (uniform over a clean run's wall time, start-up included), runs the
same command again to completion and compares every pair's score with the clean run.

train-student: each trial starts `cprd train-student --loss cprd` (reading the clean cache) into a
fresh dir, kills it the same way, then recovers as a user would: `--resume` when a checkpoint
exists, else `--overwrite`; the final step count and every weight must equal the clean run's.

Writes benchmarks/results/faults.md (not with --quick): trials, interruptions, results identical,
pairs lost (must be 0), temporaries left (must be 0).

    python benchmarks/faults.py --quick --json
    python benchmarks/faults.py --trials 16 --train-trials 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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

TRAIN_EPOCHS = 3


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
        raise RuntimeError(f"cprd {args[0]} failed: {err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def kill_after(args: list, delay: float) -> bool:
    """Start `cprd ARGS`, SIGKILL it after ``delay`` seconds; True if it was still running."""
    proc = cprd(*args)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return alive


def temporaries(path: Path) -> int:
    return sum(".tmp-" in p.name for p in path.rglob("*")) if path.exists() else 0


def scores(cache_path: str):
    from pipeline.core.cache import load_scores

    return load_scores(Path(cache_path))[1].sort("image_id", "caption_id")


def weights(out: Path) -> dict:
    import torch

    return torch.load(out / "last.pt", weights_only=True)["model"]


def setup(work: Path) -> list:
    """Data, candidates and a tiny teacher; return the score-teacher command (no --cache-dir)."""
    import torch

    from pipeline.core.dataset import Dataset
    from teacher.tiny import build_tiny_teacher

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
    run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        work / "data",
        "--out",
        work / "cand",
        "--k",
        6,
    )
    torch.manual_seed(0)
    texts = Dataset.load(work / "data").captions["caption"].to_list()
    model, processor = build_tiny_teacher(texts)
    model.save_pretrained(work / "teacher")
    processor.save_pretrained(work / "teacher")
    return [
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


def score_trials(work: Path, cmd: list, trials: int, rng: random.Random) -> tuple[dict, str]:
    t0 = time.monotonic()
    clean_summary = run(*cmd, "--cache-dir", work / "clean")
    wall = time.monotonic() - t0
    clean = scores(clean_summary["cache_path"])
    res = {"trials": trials, "interrupted": 0, "identical": 0, "pairs_lost": 0, "failed": 0}
    res |= {"temporaries_left": 0, "pairs": clean.height, "clean_wall_s": round(wall, 2)}
    for trial in range(trials):
        cache_dir = work / f"score{trial}"
        res["interrupted"] += kill_after([*cmd, "--cache-dir", cache_dir], rng.uniform(0, wall))
        try:
            got = scores(run(*cmd, "--cache-dir", cache_dir)["cache_path"])
        except RuntimeError as e:
            print(f"score trial {trial}: recovery failed: {e}", file=sys.stderr)
            res["failed"] += 1
            continue
        res["identical"] += got.equals(clean)
        res["pairs_lost"] += clean.join(got, on=["image_id", "caption_id"], how="anti").height
        res["temporaries_left"] += temporaries(cache_dir)
    return res, clean_summary["cache_path"]


def train_trials(work: Path, cache_path: str, trials: int, rng: random.Random) -> dict:
    import torch

    cmd = [
        "train-student",
        "--data",
        work / "data",
        "--teacher-scores",
        cache_path,
        "--loss",
        "cprd",
        "--epochs",
        TRAIN_EPOCHS,
        "--batch-size",
        4,
        "--warmup-steps",
        2,
        "--num-workers",
        0,
    ]
    t0 = time.monotonic()
    clean = run(*cmd, "--out", work / "train-clean")
    wall = time.monotonic() - t0
    ref = weights(work / "train-clean")
    res = {"trials": trials, "interrupted": 0, "resumed": 0, "restarted": 0, "identical": 0}
    res |= {"failed": 0, "temporaries_left": 0, "steps": clean["steps"]}
    res["clean_wall_s"] = round(wall, 2)
    for trial in range(trials):
        out = work / f"train{trial}"
        res["interrupted"] += kill_after([*cmd, "--out", out], rng.uniform(0, wall))
        # What a user does: continue from the checkpoint, or start over when there is none.
        how = "--resume" if (out / "last.pt").exists() else "--overwrite"
        res["resumed" if how == "--resume" else "restarted"] += out.exists()
        try:
            summary = run(*cmd, "--out", out, *([how] if out.exists() else []))
        except RuntimeError as e:
            print(f"train trial {trial}: recovery failed: {e}", file=sys.stderr)
            res["failed"] += 1
            continue
        got = weights(out)
        same = summary["steps"] == clean["steps"] and got.keys() == ref.keys()
        res["identical"] += same and all(torch.equal(got[k], ref[k]) for k in ref)
        res["temporaries_left"] += temporaries(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=16, help="score-teacher kill trials")
    ap.add_argument("--train-trials", type=int, default=10, help="train-student kill trials")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    ap.add_argument("--quick", action="store_true", help="3 + 2 trials, no results file")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.train_trials = 3, 2

    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cprd-faults-"))
    rng = random.Random(args.seed)
    cmd = setup(work)
    score, cache_path = score_trials(work, cmd, args.trials, rng)
    train = train_trials(work, cache_path, args.train_trials, rng)
    result = {"score_teacher": score, "train_student": train}
    result["total_wall_s"] = round(time.monotonic() - t0, 1)
    body = (
        "Machine load: 2 CPU cores shared with other work (timings are indicative only); "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, total wall "
        f"{result['total_wall_s'] / 60:.1f} min.\n\n"
        "| command | trials | interrupted by SIGKILL | results identical | data lost | "
        "temporaries left | recovery failed |\n| --- | --- | --- | --- | --- | --- | --- |\n"
        f"| score-teacher | {score['trials']} | {score['interrupted']} | {score['identical']} | "
        f"{score['pairs_lost']} pairs | {score['temporaries_left']} | {score['failed']} |\n"
        f"| train-student | {train['trials']} | {train['interrupted']} | {train['identical']} | "
        f"{train['trials'] - train['identical'] - train['failed']} runs differ | "
        f"{train['temporaries_left']} | {train['failed']} |\n\n"
        f"score-teacher: {score['pairs']} unique pairs per run, 16 shards; kill delay uniform "
        f"in [0, {score['clean_wall_s']:.1f} s] (a clean run's wall time, start-up included); "
        "recovery is the same command again.\n\n"
        f"train-student: --loss cprd from that cache, {TRAIN_EPOCHS} epochs, {train['steps']} "
        f"steps, a checkpoint per epoch; kill delay uniform in [0, {train['clean_wall_s']:.1f} "
        f"s]; recovery is --resume when last.pt exists ({train['resumed']} trials), else "
        f"--overwrite ({train['restarted']}); identical = same step count and every weight "
        "equal (torch.equal) to an uninterrupted run."
    )
    if not args.quick:
        write_result("faults", "Crash safety under SIGKILL", body, result)
    print(json.dumps(result, sort_keys=True) if args.json else body)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
