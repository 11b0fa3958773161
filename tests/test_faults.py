"""Crash safety: real subprocesses killed with SIGKILL mid-run, then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import cache

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
    finish(cprd("mine-candidates", "--data", small_dataset, "--out", out, "--k", "8", "--json"))
    return out, tiny_teacher_dir


def test_score_teacher_survives_sigkill(scoring_inputs, tmp_path):
    """kill -9 at random moments, then the same command: the same scores as a clean run."""
    cand, teacher = scoring_inputs
    args = [
        "score-teacher",
        "--candidates",
        cand,
        "--teacher",
        teacher,
        "--shards",
        "12",
        "--batch-size",
        "2",
        "--json",
    ]
    t0 = time.monotonic()
    clean_summary = finish(cprd(*args, "--cache-dir", tmp_path / "clean"))
    wall = time.monotonic() - t0
    clean = cache.load_scores(Path(clean_summary["cache_path"]))[1].sort("image_id", "caption_id")

    # Start-up (imports) takes most of the first half of a run; kill in the scoring part.
    for trial, at in enumerate((0.6, 0.85)):
        cache_dir = tmp_path / f"killed{trial}"
        proc = cprd(*args, "--cache-dir", cache_dir)
        time.sleep(at * wall)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        summary = finish(cprd(*args, "--cache-dir", cache_dir))
        path = Path(summary["cache_path"])
        got = cache.load_scores(path)[1].sort("image_id", "caption_id")
        assert got.equals(clean), f"trial {trial} (killed: {killed}) differs from the clean run"
        assert not [p for p in path.iterdir() if ".tmp-" in p.name]
        assert sorted(p.name for p in path.glob("shard-*.parquet")) == sorted(
            p.name for p in Path(clean_summary["cache_path"]).glob("shard-*.parquet")
        )
