"""Concurrent chaos trials of the teacher cache (``benchmarks/faults.py --concurrent``).

A trial: 2 or 3 real `cprd score-teacher` workers score one fresh cache from the small candidate
set (each taking every shard, or a --rank share), some of them SIGKILLed at random moments; then
the same number of workers score the re-mined, larger candidate set into the same cache, started
at a random moment (often while round 1 still runs) and killed the same way. Meanwhile a monitor
takes the cache's entry lock (shared, as every reader does) every ~50 ms and checks that a
manifest on disk matches the shard files and markers; a worker that exits saying `complete` must
have every pair of its candidates cached at that moment. Then one worker recovers (the same
command) and the trial checks: `cache verify` with both candidate sets healthy, and every pair's
score and prob equal to a clean single-worker run of the larger set (to float32 rounding: a pair
scored in another batch can differ in the last bits; see SCORE_TOLERANCE).

Each worker's kill moment counts from when it has loaded the teacher (its log says so): start-up
is most of a small run and not worth killing. It is uniform over 1.5 times a clean run's scoring
time, stretched by workers / 2 (they share the cores), so some kills land after a worker ended.
tests/test_faults.py runs one small trial.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOADED = "loaded teacher"  # the log line teacher.model.load_teacher writes once it has loaded
# A pair scored in another batch (another padded length) can differ in the last float32 bits
# (measured: up to 4.8e-7 on the tiny teacher); a wrong, stale or damaged score differs by far
# more. Differences up to this are counted apart as rounding, above it as mismatches.
SCORE_TOLERANCE = 1e-5
TICK = 0.01  # seconds between checks of the event loop
MONITOR_EVERY = 0.05  # seconds between manifest checks


@dataclass
class Worker:
    """One score-teacher process of a trial."""

    proc: subprocess.Popen
    out: Path  # its stdout (the --json summary); stderr goes to out.with_suffix(".err")
    cand: Path  # the candidates it scores
    kill_after: float | None  # seconds after it loaded the teacher to SIGKILL it, or None
    loaded_at: float | None = None  # monotonic time its log said the teacher was loaded
    killed: bool = False

    def due(self, now: float) -> bool:
        """Whether it is time to kill it (it is still running)."""
        if self.kill_after is None or self.killed or self.proc.poll() is not None:
            return False
        if self.loaded_at is None and LOADED in self.out.with_suffix(".err").read_text():
            self.loaded_at = now
        return self.loaded_at is not None and now >= self.loaded_at + self.kill_after


@dataclass(frozen=True)
class ChaosInputs:
    """What every trial shares: the commands, the clean reference and the kill window."""

    cmd: list  # score-teacher and its flags, without --candidates, --cache-dir and --json
    small: Path  # round 1 candidates
    large: Path  # round 2 candidates, the re-mine with a larger k
    pairs: dict  # candidates dir -> pipeline.pairs.PairSet.pairs
    clean: object  # polars DataFrame: image_id, caption_id, score, prob of the clean run, sorted
    startup_s: float  # a clean run's start-up: from its start to its teacher loaded (0: unknown)
    scoring_s: float  # a clean run's time from its teacher loaded to its end
    workers: tuple[int, ...] = (2, 3)  # workers per round, drawn per trial
    kill_probability: float = 0.6  # of each worker being SIGKILLed
    in_process: bool = False  # clean run and recovery through click in this process (tests)


def invoke(args: list, out: Path) -> int:
    """Run `cprd ARGS --json` through click in this process, stdout to ``out``; its exit code."""
    from click.testing import CliRunner

    from cli import cli

    result = CliRunner().invoke(cli, [*map(str, args), "--json"])
    out.write_text(result.stdout)
    out.with_suffix(".err").write_text(result.stderr)
    return result.exit_code


def spawn(args: list, out: Path) -> subprocess.Popen:
    """Start `cprd ARGS --json` of this checkout; stdout to ``out``, stderr beside it (a file,
    not a pipe that nobody drains while the trial runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as so, open(out.with_suffix(".err"), "wb") as se:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *map(str, args), "--json"],
            cwd=ROOT,
            env=env,
            stdout=so,
            stderr=se,
        )


def summary_of(out: Path) -> dict:
    """The --json summary a finished command printed last."""
    return json.loads(out.read_text().strip().splitlines()[-1])


def entry_of(cache_dir: Path) -> Path | None:
    """The cache entry under ``cache_dir`` once a worker has created it."""
    keys = list(cache_dir.glob("*/key.json"))
    return keys[0].parent if keys else None


def stale_manifest(entry: Path) -> bool:
    """Whether the entry holds a manifest that disagrees with its shard files or markers, seen
    under the entry lock as a reader sees it."""
    from pipeline.core import atomic, cache

    with cache.entry_lock(entry, shared=True):
        mfile = entry / cache.MANIFEST_JSON
        if not mfile.is_file():
            return False
        manifest = json.loads(mfile.read_text())
        for shard, name in enumerate(cache.shard_name(s) for s in range(manifest["num_shards"])):
            listed, f = manifest["shards"].get(name), entry / f"{name}.parquet"
            marker = cache.read_marker(entry, shard)
            if listed is None or marker is None or not f.is_file():
                return True
            if listed["sha256"] != marker["sha256"] or atomic.file_sha256(f) != listed["sha256"]:
                return True
    return False


def clean_run(
    work: Path, cmd: list, small: Path, large: Path, in_process: bool = False, **options
) -> ChaosInputs:
    """Score the larger candidate set with one worker: the reference every trial must equal.

    A subprocess, timed from its start to its teacher loaded and on to its end; ``in_process``
    runs the same command through click in this process (no start-up to time), and so will each
    trial's recovery: tests use it to save two interpreter start-ups. ``options``: ChaosInputs'
    workers and kill_probability.
    """
    from pipeline.core import cache
    from pipeline.core.pairs import PAIR_KEY, load_pair_set

    pairs = {c: load_pair_set(c)[3].pairs for c in (small, large)}
    if pairs[small].join(pairs[large], on=PAIR_KEY, how="anti").height:
        raise RuntimeError("the small candidates are not a subset of the large ones: mine again")
    args = [*cmd, "--candidates", large, "--cache-dir", work / "chaos-clean"]
    out, t0, loaded = work / "clean.out", time.monotonic(), None
    if in_process:
        if invoke(args, out):
            raise RuntimeError(f"clean run failed: {out.with_suffix('.err').read_text()[-2000:]}")
        loaded = t0
    else:
        proc = spawn(args, out)
        while proc.poll() is None:
            if loaded is None and LOADED in out.with_suffix(".err").read_text():
                loaded = time.monotonic()
            time.sleep(0.005)
        if proc.returncode or loaded is None:
            raise RuntimeError(f"clean run failed: {out.with_suffix('.err').read_text()[-2000:]}")
    end = time.monotonic()
    clean = cache.load_scores(Path(summary_of(out)["cache_path"]))[1].sort(PAIR_KEY)
    return ChaosInputs(
        cmd, small, large, pairs, clean, loaded - t0, end - loaded, in_process=in_process, **options
    )


def _start_round(
    work: Path, inp: ChaosInputs, cand: Path, cache_dir: Path, n: int, split: bool, rng, tag: str
) -> list[Worker]:
    workers = []
    for rank in range(n):
        share = ["--rank", rank, "--world-size", n] if split else []
        out = work / f"{tag}-w{rank}.out"
        proc = spawn([*inp.cmd, "--candidates", cand, "--cache-dir", cache_dir, *share], out)
        kill = rng.random() < inp.kill_probability
        after = rng.uniform(0, 1.5 * inp.scoring_s * max(1, n / 2)) if kill else None
        workers.append(Worker(proc, out, cand, after))
    return workers


def trial(work: Path, inp: ChaosInputs, rng: random.Random) -> dict:
    """One chaos trial in ``work`` (a fresh directory); the counts it observed."""
    from pipeline.core import cache, cache_verify
    from pipeline.core.pairs import PAIR_KEY

    t0 = time.monotonic()
    cache_dir = work / "cache"
    n, split = rng.choice(inp.workers), rng.random() < 0.5
    res = {"workers": 2 * n, "kills": 0, "stale_manifests": 0, "manifest_checks": 0}
    res |= {"completed": 0, "false_complete": 0, "worker_errors": 0, "overlapped": 0}
    workers = _start_round(work, inp, inp.small, cache_dir, n, split, rng, "r1")
    # Round 2 starts while round 1 starts up, scores, or after it ended.
    round2_at = t0 + rng.uniform(0.5 * inp.startup_s, inp.startup_s + 2 * inp.scoring_s * n / 2)
    next_check, done = 0.0, set()
    while len(done) < len(workers) or round2_at is not None:
        now = time.monotonic()
        if round2_at is not None and now >= round2_at:
            res["overlapped"] += any(w.proc.poll() is None for w in workers)
            workers += _start_round(work, inp, inp.large, cache_dir, n, split, rng, "r2")
            round2_at = None
        for i, w in enumerate(workers):
            if i in done:
                continue
            if w.due(now):
                w.proc.send_signal(signal.SIGKILL)
                w.killed = True
                res["kills"] += 1
            if w.proc.poll() is None:
                continue
            done.add(i)
            if w.killed and w.proc.returncode == -signal.SIGKILL:
                continue
            if w.proc.returncode:  # a worker that was not killed must not fail
                res["worker_errors"] += 1
                err = w.out.with_suffix(".err").read_text()[-1500:]
                print(f"worker {w.out.name} failed: {err}", file=sys.stderr)
                continue
            s = summary_of(w.out)
            res["completed"] += s["complete"]
            if s["complete"]:  # pairs are never removed here: missing now means missing then
                missing = cache.missing_pairs(Path(s["cache_path"]), inp.pairs[w.cand]).height
                res["false_complete"] += missing > 0
        entry = entry_of(cache_dir)
        if entry is not None and now >= next_check:
            res["manifest_checks"] += 1
            res["stale_manifests"] += stale_manifest(entry)
            next_check = now + MONITOR_EVERY
        time.sleep(TICK)
    entry = entry_of(cache_dir)
    if entry is not None:
        res["manifest_checks"] += 1
        res["stale_manifests"] += stale_manifest(entry)

    # Recovery: what a user does after a crash, the same command once more.
    out, args = (
        work / "recover.out",
        [*inp.cmd, "--candidates", inp.large, "--cache-dir", cache_dir],
    )
    code = invoke(args, out) if inp.in_process else spawn(args, out).wait()
    res["recovery_failed"] = int(code != 0 or not summary_of(out)["complete"])
    res |= {"verify_failed": 0, "pairs_lost": 0, "pairs_extra": 0, "mismatched_scores": 0}
    if res["recovery_failed"]:
        print(f"recovery failed: {out.with_suffix('.err').read_text()[-1500:]}", file=sys.stderr)
        res["pairs_lost"] = inp.clean.height
        res["wall_s"] = round(time.monotonic() - t0, 1)
        return res
    entry = Path(summary_of(out)["cache_path"])
    report = cache_verify.verify(entry, inp.large)
    small = cache_verify.coverage(entry, inp.small)
    res["verify_failed"] = int(not report["healthy"] or small["missing"] > 0)
    got = cache.load_scores(entry)[1].sort(PAIR_KEY)
    res["pairs_lost"] = inp.clean.join(got, on=PAIR_KEY, how="anti").height
    res["pairs_extra"] = got.join(inp.clean, on=PAIR_KEY, how="anti").height
    both = inp.clean.join(got, on=PAIR_KEY, how="inner")
    gap = np.maximum(
        np.abs(both["score"].to_numpy() - both["score_right"].to_numpy()),
        np.abs(both["prob"].to_numpy() - both["prob_right"].to_numpy()),
    )
    res["mismatched_scores"] = int((gap > SCORE_TOLERANCE).sum())
    res["rounding_differences"] = int(((gap > 0) & (gap <= SCORE_TOLERANCE)).sum())
    res["max_difference"] = float(gap.max()) if gap.size else 0.0
    res["wall_s"] = round(time.monotonic() - t0, 1)
    return res


def run_trials(work: Path, inp: ChaosInputs, trials: int, rng: random.Random) -> dict:
    """``trials`` chaos trials; the summed counts and the trial count."""
    total: dict = {"trials": trials}
    for t in range(trials):
        res = trial(work / f"trial{t}", inp, rng)
        print(f"chaos trial {t}: {json.dumps(res, sort_keys=True)}", file=sys.stderr)
        for k, v in res.items():  # counts add up; the largest difference is the max
            total[k] = max(total.get(k, 0), v) if k == "max_difference" else total.get(k, 0) + v
    total["pairs"] = inp.clean.height
    total["clean_startup_s"] = round(inp.startup_s, 2)
    total["clean_scoring_s"] = round(inp.scoring_s, 2)
    return total
