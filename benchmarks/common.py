"""Helpers shared by the benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line: CPU count, platform, torch version and the accelerator if any."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores, {platform.machine()} {platform.system()}, "
        f"torch {torch.__version__}, {gpu}"
    )


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` wall-clock runs of ``fn`` (seconds): noise only adds time."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def command() -> str:
    return "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.argv[0], Path.cwd()), *sys.argv[1:]]
    )


def write_result(name: str, title: str, body: str, data: dict) -> Path:
    """Write benchmarks/results/NAME.md with the command, the machine and the JSON data."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(
        f"# {title}\n\nCommand: `{command()}`\n\nMachine: {machine()}\n\n{body}\n\n"
        f"```json\n{json.dumps(data, indent=2, sort_keys=True)}\n```\n"
    )
    return path


METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def summarise(name: str, runs: list[dict]) -> dict:
    """One row: ``name``, the run count ``n``, and the mean and standard deviation (``_sd``, 0 for
    one run) of every retrieval metric over ``runs`` (each a metrics dict from evaluate)."""
    row: dict = {"name": name, "n": len(runs)}
    for m in METRICS:
        values = [float(r[m]) for r in runs]
        row[f"{m}_mean"] = round(statistics.fmean(values), 2)
        row[f"{m}_sd"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    return row


def paired(runs: dict[str, list[dict]], control: str, metric: str = "rsum") -> dict[str, dict]:
    """Per row, the seed-by-seed difference of ``metric`` against ``control`` (seed s of a row
    minus seed s of the control): {"mean", "sd", "n"}; rows with fewer seeds pair their first."""
    base = [float(r[metric]) for r in runs.get(control, [])]
    out = {}
    for name, rs in runs.items():
        diffs = [float(r[metric]) - b for r, b in zip(rs, base, strict=False)]
        if diffs and name != control:
            out[name] = {
                "mean": round(statistics.fmean(diffs), 2),
                "sd": round(statistics.stdev(diffs), 2) if len(diffs) > 1 else 0.0,
                "n": len(diffs),
            }
    return out


def val_curve(student_dir: Path) -> list[float]:
    """Val RSUM after each validation of a train-student run (its metrics.jsonl)."""
    lines = (Path(student_dir) / "metrics.jsonl").read_text().splitlines()
    return [
        round(rec["val"]["rsum"], 1) for rec in map(json.loads, lines) if rec.get("event") == "val"
    ]


def strongest_control(
    val: dict[str, list[float | None]], candidates: tuple[str, ...]
) -> str | None:
    """The teacher-free row with the best mean val RSUM: the control every other row is paired
    with is tuned as hard as the method, and chosen on val only (never on test)."""
    means = {
        n: statistics.fmean([v for v in val[n] if v is not None])
        for n in candidates
        if any(v is not None for v in val.get(n, []))
    }
    return max(means, key=means.get) if means else None


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: peak since reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def in_child(target, *args) -> dict:
    """``target(*args, queue)`` in a fresh (spawned) process, so its peak RSS is its own; its
    result, or an error if it died."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, out))
    p.start()
    while True:
        try:
            result = out.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():  # killed (out of memory?) or raised: its traceback is above
                raise RuntimeError(f"{target.__name__} died (exit code {p.exitcode})") from None
    p.join()
    return result
