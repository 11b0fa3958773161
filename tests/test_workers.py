"""Several workers on one machine: each picks its own GPU, and score-teacher splits the shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import run

from pipeline.core import cache
from pipeline.torchkit.encode import worker_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("device", "env", "gpus", "want"),
    [
        (None, {"LOCAL_RANK": "3"}, 4, "cuda:3"),  # torchrun's 4th process on a 4-GPU machine
        ("cuda", {"LOCAL_RANK": "1"}, 2, "cuda:1"),  # plain cuda means this worker's GPU
        (None, {"SLURM_LOCALID": "1"}, 2, "cuda:1"),  # srun task 1
        (None, {"LOCAL_RANK": "5"}, 4, "cuda:1"),  # more workers than GPUs: they share
        (None, {"LOCAL_RANK": "1", "SLURM_LOCALID": "0"}, 2, "cuda:1"),  # torchrun's wins
        ("cuda:0", {"LOCAL_RANK": "1"}, 2, "cuda:0"),  # an explicit index is kept
        ("cpu", {"LOCAL_RANK": "1"}, 2, "cpu"),  # so is cpu
        (None, {"LOCAL_RANK": "1"}, 0, None),  # no GPU: pick_device decides (cpu)
        (None, {}, 4, None),  # not launched as workers: the default device
        ("cuda", {}, 4, "cuda"),
    ],
)
def test_worker_device(device, env, gpus, want):
    """Each worker of a multi-process launch gets cuda:LOCAL_RANK unless told otherwise."""
    assert worker_device(device, env, gpus) == want


def test_two_score_teacher_processes_split_the_shards(small_dataset, tiny_teacher_dir, tmp_path):
    """Two score-teacher processes started together as torchrun would start them score
    disjoint shards, each pair once, and the cache equals one process's."""
    cand = tmp_path / "cand"
    assert (
        run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            small_dataset,
            "--out",
            cand,
            "--k",
            "4",
        ).exit_code
        == 0
    )
    common = ["--candidates", cand, "--teacher", tiny_teacher_dir, "--shards", "6", "--json"]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "CUDA_VISIBLE_DEVICES": "",  # CPU: every worker falls back to the CPU
            "OMP_NUM_THREADS": "1",
        }
        args = [sys.executable, "-m", "cli", "score-teacher", "--cache-dir", tmp_path / "two"]
        procs.append(
            subprocess.Popen(
                [str(a) for a in args + common],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    summaries = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = sorted(summaries, key=lambda s: s["rank"])
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["device"] == r1["device"] == "cpu"
    assert r0["shards_written_ids"] == [0, 2, 4] and r1["shards_written_ids"] == [1, 3, 5]
    assert r0["pairs_scored"] + r1["pairs_scored"] == r0["pairs_total"]

    result = run("score-teacher", "--cache-dir", tmp_path / "one", *common)
    assert result.exit_code == 0, result.output
    one = json.loads(result.stdout.strip().splitlines()[-1])
    _, two_scores = cache.load_scores(Path(r0["cache_path"]))
    _, one_scores = cache.load_scores(Path(one["cache_path"]))
    key = ["image_id", "caption_id"]
    assert two_scores.height == one_scores.height == one["pairs_total"]
    assert two_scores.sort(key).select(key).equals(one_scores.sort(key).select(key))
    assert two_scores.select(pl.struct(key).is_unique().all()).item()
    both = two_scores.join(one_scores, on=key, suffix="_one")
    assert (both["score"] - both["score_one"]).abs().max() < 1e-4
