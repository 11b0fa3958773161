"""A non-editable install carries what the source tree has: the demo's shipped teacher (package
data, found through importlib.resources) and every cli module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "pipeline",
    "teacher",
    "student",
    *(p.name for p in ROOT.glob("cli*.py")),
)

PROBE = """
import json, cli
from pipeline.stages import demo
from pipeline.stages.demo_data import GENERATOR_VERSION
shipped = demo._shipped_teacher()
print(json.dumps({"cli": cli.__file__, "dir": str(demo.SHIPPED_TEACHER),
                  "found": None if shipped is None else str(shipped),
                  "files": sorted(p.name for p in demo.SHIPPED_TEACHER.iterdir()),
                  "commands": sorted(cli.cli.commands)}))
"""


def test_wheel_install_finds_the_demo_teacher(tmp_path):
    """Built as a wheel and installed into a plain folder (no source tree on the path), cprd
    resolves the shipped demo teacher inside the install, current for the demo generator, and
    its command line imports with every command."""
    import json

    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("cprd-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", site, wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert Path(got["cli"]).is_relative_to(site)
    assert Path(got["dir"]).is_relative_to(site)
    assert got["found"] == got["dir"]  # present and made for this generator version
    shipped = sorted(p.name for p in (ROOT / "pipeline/stages/demo-teacher").iterdir())
    assert got["files"] == shipped
    assert {"demo", "mine-candidates", "score-teacher", "train-student", "cache"} <= set(
        got["commands"]
    )
