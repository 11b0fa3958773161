"""Crash safety: real subprocesses killed with SIGKILL mid-run, then resumed."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run

from pipeline.core import cache

ROOT = Path(__file__).resolve().parents[1]


def cprd(*args, **kwargs) -> subprocess.Popen:
    """Start `cprd ARGS` as a real process (the module entry point of this checkout)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scoring_inputs(small_dataset, tiny_teacher_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(candidates with k=8, the session's tiny BLIP teacher) for the small dataset."""
    out = tmp_path_factory.mktemp("faults") / "cand"
    mined = run(
        "mine-candidates", "--student", "tiny", "--data", small_dataset, "--out", out, "--k", "8"
    )
    assert mined.exit_code == 0, mined.output
    return out, tiny_teacher_dir


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; assert it was still running (it was killed)."""
    started = time.monotonic()
    while not ready():
        assert proc.poll() is None, (
            f"the run ended before {what}: " + proc.communicate()[1].decode()
        )
        assert time.monotonic() - started < 240, f"no {what} after 240 s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself before {what}"


def test_score_teacher_survives_sigkill(scoring_inputs, tmp_path):
    """kill -9 when the first shard marker appears, and when half are there, then the same
    command: the same scores as a clean run, no temporaries left."""
    cand, teacher = scoring_inputs
    shards = 12
    args = [
        "score-teacher",
        "--candidates",
        cand,
        "--teacher",
        teacher,
        "--shards",
        shards,
        "--batch-size",
        "2",
        "--json",
    ]

    def score(cache_dir: Path) -> dict:  # in this process: the same code, no start-up
        result = run(*args, "--cache-dir", cache_dir)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    clean_summary = score(tmp_path / "clean")
    clean = cache.load_scores(Path(clean_summary["cache_path"]))[1].sort("image_id", "caption_id")

    for trial, markers in enumerate((1, shards // 2)):
        cache_dir = tmp_path / f"killed{trial}"

        def done(cache_dir=cache_dir) -> int:
            return len(list(cache_dir.glob("*/shard-*.json")))

        kill_when(
            cprd(*args, "--cache-dir", cache_dir),
            lambda cache_dir=cache_dir, markers=markers: done(cache_dir) >= markers,
            f"{markers} shard markers",
        )
        assert markers <= done() < shards  # killed part-way: there is something to resume
        assert not list(cache_dir.glob("*/cache.json"))
        summary = score(cache_dir)
        path = Path(summary["cache_path"])
        assert summary["complete"] and 0 < summary["pairs_scored"] < clean.height
        got = cache.load_scores(path)[1].sort("image_id", "caption_id")
        assert got.equals(clean), f"trial {trial} differs from the clean run"
        assert not [p for p in path.iterdir() if ".tmp-" in p.name]
        assert sorted(p.name for p in path.glob("shard-*.parquet")) == sorted(
            p.name for p in Path(clean_summary["cache_path"]).glob("shard-*.parquet")
        )


def test_concurrent_workers_remine_and_kills(small_dataset, tiny_teacher_dir, tmp_path):
    """benchmarks/faults.py --concurrent, one small trial: two workers per round (the seed has
    one of each round SIGKILLed while scoring), a re-mine between rounds; no stale manifest is
    ever seen, no false `complete`, and after recovery the cache verifies and equals a clean
    run."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import chaos

    for k in (2, 4):
        mined = run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            small_dataset,
            "--out",
            tmp_path / f"k{k}",
            "--k",
            k,
        )
        assert mined.exit_code == 0, mined.output
    cmd = ["score-teacher", "--teacher", tiny_teacher_dir, "--shards", "6", "--batch-size", "2"]
    inputs = chaos.clean_run(
        tmp_path, cmd, tmp_path / "k2", tmp_path / "k4", in_process=True, workers=(2,)
    )
    res = chaos.trial(tmp_path / "trial", inputs, random.Random(17))  # kills w1 of each round
    assert res["kills"] >= 1 and res["manifest_checks"] >= 1, res
    for key in ("stale_manifests", "false_complete", "worker_errors", "recovery_failed"):
        assert res[key] == 0, (key, res)
    for key in ("verify_failed", "pairs_lost", "pairs_extra", "mismatched_scores"):
        assert res[key] == 0, (key, res)


def test_train_student_survives_sigkill(scoring_inputs, small_dataset, tmp_path):
    """kill -9 at a random moment after the first checkpoint, then --resume: the same steps,
    weights and metrics as an uninterrupted run with the same seed (CPRD, hard batches)."""
    cand, teacher = scoring_inputs
    scored = run(
        "score-teacher",
        "--candidates",
        cand,
        "--teacher",
        teacher,
        "--shards",
        "2",
        "--cache-dir",
        tmp_path / "cache",
        "--json",
    )
    assert scored.exit_code == 0, scored.output
    epochs = 3  # 12 steps each; a checkpoint after every epoch
    args = [
        "train-student",
        "--data",
        small_dataset,
        "--teacher-scores",
        json.loads(scored.stdout.strip().splitlines()[-1])["cache_path"],
        "--loss",
        "cprd",
        "--epochs",
        epochs,
        "--batch-size",
        "4",
        "--warmup-steps",
        "2",
        "--num-workers",
        "0",
        "--seed",
        "3",
        "--json",
    ]
    out, ref = tmp_path / "killed", tmp_path / "clean"
    clean_proc = cprd(*args, "--out", ref)  # runs alongside: the results do not depend on timing
    proc = cprd(*args, "--out", out)
    started = time.monotonic()
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() - started < 240, "no checkpoint after 240 s"
        time.sleep(0.01)
    # A random moment within about the next epoch (mid-step or mid-save), but before the last
    # epoch ends: each checkpoint is a new file (atomic rename), so count them by inode changes.
    deadline, inode, saved = time.monotonic() + random.uniform(0, 1.5), None, 0
    while time.monotonic() < deadline and saved < epochs - 1:
        with contextlib.suppress(FileNotFoundError):
            now = (out / "last.pt").stat().st_ino
            saved, inode = saved + (now != inode), now
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the kill: give it more epochs"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = torch.load(out / "last.pt", weights_only=True)["state"]["epoch"]
    assert 1 <= done < epochs
    clean = finish(clean_proc)

    resumed = finish(cprd(*args, "--out", out, "--resume"))
    assert resumed["steps"] == clean["steps"] and resumed["epochs"] == clean["epochs"] == epochs
    assert resumed["best_epoch"] == clean["best_epoch"]
    for name in ("last.pt", "model.pt"):  # the final state and the best epoch's weights
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys()
        for key, tensor in a.items():
            assert torch.equal(tensor, b[key]), (name, key)
    # Lines logged past the checkpoint before the kill are not logged twice.
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
