"""Crash-safety trials: kill -9 score-teacher and train-student at random moments, recover, compare.

score-teacher: each trial starts the real `cprd score-teacher` on a fresh cache, kills it with
SIGKILL at a random moment after it has loaded the teacher (uniform over a clean run's
scoring time: start-up is most of a small run and not worth killing), runs the same command
again to completion and compares every pair's score with the clean run.

train-student: each trial starts `cprd train-student --loss cprd` (reading the clean cache) into a
fresh dir, kills it the same way, then recovers as a user would: `--resume` when a checkpoint
exists, else `--overwrite`; the final step count and every weight must equal the clean run's.

--concurrent: several score-teacher workers on one cache, random SIGKILLs, a re-mine with a
larger k between rounds (benchmarks/chaos.py says what a trial does and checks).

Writes benchmarks/results/faults.md (not with --quick); a run of one kind (--concurrent, or the
two single-process kinds) keeps the other kind's section of the file. The single-process modes:
trials, interruptions, results identical, pairs lost (must be 0), temporaries left (must be 0).

    python benchmarks/faults.py --quick --json
    python benchmarks/faults.py --trials 16 --train-trials 10
    python benchmarks/faults.py --concurrent --trials 20 --json
"""

from __future__ import annotations

import argparse
import contextlib
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

from benchmarks.common import RESULTS, command, write_result  # noqa: E402

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


def setup(work: Path) -> tuple[list, Path, Path]:
    """Data, candidates (k=3 and its re-mine with k=6) and a tiny teacher; return the
    score-teacher command without --candidates and --cache-dir, and the two candidate dirs."""
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
    for k in (3, 6):
        run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            work / "data",
            "--out",
            work / f"cand-k{k}",
            "--k",
            k,
        )
    torch.manual_seed(0)
    texts = Dataset.load(work / "data").captions["caption"].to_list()
    model, processor = build_tiny_teacher(texts)
    model.save_pretrained(work / "teacher")
    processor.save_pretrained(work / "teacher")
    cmd = ["score-teacher", "--teacher", work / "teacher", "--shards", 16, "--batch-size", 8]
    return cmd, work / "cand-k3", work / "cand-k6"


def score_trials(
    work: Path, cmd: list, cand: Path, trials: int, rng: random.Random
) -> tuple[dict, str]:
    """Kill one score-teacher per trial at a random moment after it loaded the teacher (uniform
    over a clean run's scoring time), run the same command again (in this process), compare
    with the clean run."""
    from benchmarks import chaos

    ref = chaos.clean_run(work, cmd, cand, cand)
    clean, clean_path = ref.clean, chaos.summary_of(work / "clean.out")["cache_path"]
    res = {"trials": trials, "interrupted": 0, "identical": 0, "pairs_lost": 0, "failed": 0}
    res |= {"temporaries_left": 0, "pairs": clean.height}
    res |= {"clean_startup_s": round(ref.startup_s, 2), "clean_scoring_s": round(ref.scoring_s, 2)}
    for trial in range(trials):
        cache_dir, out = work / f"score{trial}", work / f"score{trial}.out"
        args = [*cmd, "--candidates", cand, "--cache-dir", cache_dir]
        worker = chaos.Worker(
            chaos.spawn(args, out), out, cand, rng.uniform(0, 1.5 * ref.scoring_s)
        )
        while worker.proc.poll() is None:
            if worker.due(time.monotonic()):
                worker.proc.send_signal(signal.SIGKILL)
                worker.killed = True
            time.sleep(0.005)
        res["interrupted"] += worker.proc.returncode == -signal.SIGKILL
        # Recovery: the same command, through click in this process (no interpreter start-up).
        again = work / f"score{trial}-again.out"
        if chaos.invoke(args, again):
            err = again.with_suffix(".err").read_text()[-2000:]
            print(f"score trial {trial}: recovery failed: {err}", file=sys.stderr)
            res["failed"] += 1
            continue
        got = scores(chaos.summary_of(again)["cache_path"])
        res["identical"] += got.equals(clean)
        res["pairs_lost"] += clean.join(got, on=["image_id", "caption_id"], how="anti").height
        res["temporaries_left"] += temporaries(cache_dir)
    return res, clean_path


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


SINGLE_TABLE = (
    "| command | trials | interrupted by SIGKILL | results identical | data lost | "
    "temporaries left | recovery failed |\n| --- | --- | --- | --- | --- | --- | --- |\n"
)


def single_body(score: dict, train: dict) -> str:
    """The section of the single-process trials."""
    return (
        SINGLE_TABLE
        + f"| score-teacher | {score['trials']} | {score['interrupted']} | {score['identical']} | "
        f"{score['pairs_lost']} pairs | {score['temporaries_left']} | {score['failed']} |\n"
        f"| train-student | {train['trials']} | {train['interrupted']} | {train['identical']} | "
        f"{train['trials'] - train['identical'] - train['failed']} runs differ | "
        f"{train['temporaries_left']} | {train['failed']} |\n\n"
        f"score-teacher: {score['pairs']} unique pairs per run (candidates and positives), 16 "
        "shards; killed at a moment uniform over "
        f"{score['clean_scoring_s']:.1f} s after its log says the teacher is loaded (a clean "
        f"run: {score['clean_startup_s']:.1f} s start-up, {score['clean_scoring_s']:.1f} s "
        "scoring), so kills land in scoring, not in imports; recovery is the same command "
        "again (run through click inside the benchmark process, which saves an interpreter "
        "start-up per trial); identical = every score and prob equal (polars equals) to the "
        "clean run.\n\n"
        f"train-student: --loss cprd from that cache, {TRAIN_EPOCHS} epochs, {train['steps']} "
        f"steps, a checkpoint per epoch; kill delay uniform in [0, {train['clean_wall_s']:.1f} "
        f"s]; recovery is --resume when last.pt exists ({train['resumed']} trials), else "
        f"--overwrite ({train['restarted']}); identical = same step count and every weight "
        "equal (torch.equal) to an uninterrupted run."
    )


def concurrent_body(c: dict) -> str:
    """The section of the concurrent chaos trials."""
    return (
        "| trials | workers started | SIGKILLs | rounds overlapping | pairs lost | "
        "stale manifests (of checks) | mismatched scores | false `complete` (of claims) | "
        "worker errors | recovery or verify failed |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {c['trials']} | {c['workers']} | {c['kills']} | {c['overlapped']} | "
        f"{c['pairs_lost']} | {c['stale_manifests']} (of {c['manifest_checks']}) | "
        f"{c['mismatched_scores']} | {c['false_complete']} (of {c['completed']}) | "
        f"{c['worker_errors']} | {c['recovery_failed'] + c['verify_failed']} |\n\n"
        f"Pairs whose score differs from the clean run only by float32 rounding: "
        f"{c['rounding_differences']} (largest difference {c['max_difference']:.2g}; a pair "
        "scored in another batch is padded to another length); mismatched means a difference "
        "above 1e-5 in score or prob.\n\n"
        "Each trial: 2 or 3 `score-teacher` workers (every shard each, or a --rank share) on a "
        "fresh 16-shard cache with the k=3 candidates, then as many on the k=6 re-mine (mined "
        "once beforehand: mining is deterministic), started at a random moment, often while "
        "round 1 runs; each worker SIGKILLed with probability 0.6 at a moment uniform over "
        f"1.5 x {c['clean_scoring_s']:.1f} s x workers / 2 after it loaded the teacher (a "
        f"clean run: {c['clean_startup_s']:.1f} s start-up, {c['clean_scoring_s']:.1f} s "
        "scoring). A monitor checks every ~50 ms, under the cache's entry lock, that a "
        "manifest on disk matches the shard files and markers; a worker exiting `complete` "
        "must have every pair of its candidates cached. Recovery is one more run of the k=6 "
        "command; then `cache verify` with both candidate sets must pass and all "
        f"{c['pairs']} pairs (candidates and positives) must equal, score and prob, a clean "
        "single-worker run of the k=6 candidates."
    )


SECTIONS = {  # the keys each kind of run writes, and one only the current format has
    "single": (("score_teacher", "train_student", "single_command"), "clean_scoring_s"),
    "concurrent": (("concurrent", "concurrent_command"), "clean_scoring_s"),
}


def merged_result(new: dict) -> dict:
    """``new`` on top of the other kind's section of the current results file (dropped when it
    was written in an older format)."""
    path = RESULTS / "faults.md"
    old = {}
    if path.is_file():
        text = path.read_text()
        with contextlib.suppress(ValueError, IndexError):
            old = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    kept = {}
    for keys, marker in SECTIONS.values():
        if marker in old.get(keys[0], {}):
            kept |= {k: old[k] for k in keys if k in old}
    return {**kept, **new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=16, help="score-teacher kill trials")
    ap.add_argument("--train-trials", type=int, default=10, help="train-student kill trials")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    ap.add_argument(
        "--quick", action="store_true", help="3 + 2 trials (--concurrent: 1), no results file"
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    ap.add_argument(
        "--concurrent", action="store_true", help="the chaos trials (--trials of them) instead"
    )
    args = ap.parse_args()
    if args.quick:
        args.trials, args.train_trials = (1 if args.concurrent else 3), 2

    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cprd-faults-"))
    rng = random.Random(args.seed)
    cmd, small, large = setup(work)
    if args.concurrent:
        from benchmarks import chaos

        inputs = chaos.clean_run(work, cmd, small, large)
        result = chaos.run_trials(work, inputs, args.trials, rng)
        result["total_wall_s"] = round(time.monotonic() - t0, 1)
        new = {"concurrent": result, "concurrent_command": command()}
        body = concurrent_body(result)
    else:
        score, cache_path = score_trials(work, cmd, large, args.trials, rng)
        train = train_trials(work, cache_path, args.train_trials, rng)
        result = {"score_teacher": score, "train_student": train}
        result["total_wall_s"] = round(time.monotonic() - t0, 1)
        new = {**result, "single_command": command()}
        body = single_body(score, train)
    if not args.quick:
        merged = merged_result(new)
        sections = []
        if "score_teacher" in merged:
            sections.append(
                f"## One process killed\n\nCommand: `{merged.get('single_command', '?')}`"
                f"\n\n{single_body(merged['score_teacher'], merged['train_student'])}"
            )
        if "concurrent" in merged:
            sections.append(
                "## Concurrent workers, re-mining and kills\n\nCommand: "
                f"`{merged.get('concurrent_command', '?')}`\n\n"
                f"{concurrent_body(merged['concurrent'])}"
            )
        trials = sum(
            merged.get(k, {}).get("trials", 0)
            for k in ("score_teacher", "train_student", "concurrent")
        )
        head = (
            "Machine load: 2 CPU cores shared with other work (timings are indicative only); "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. {trials} trials in "
            "all; each section is one run of the command it names (the latest run of each "
            "kind; a run keeps the other kind's section)."
        )
        write_result("faults", "Crash safety under SIGKILL", "\n\n".join([head, *sections]), merged)
    print(json.dumps(result, sort_keys=True) if args.json else body)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
