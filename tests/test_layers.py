"""The layer rule of DESIGN 8, kept by import-linter (the contracts live in pyproject.toml), plus
the two things import-linter cannot see: the cli*.py modules (top-level modules, not a package)
and module size."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "teacher", "student")
MAX_LINES = 450  # the bound; STYLE 15 aims at 400


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` run on the tree at ``root`` (its pyproject.toml, its packages first)."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(exe), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_contracts_are_kept():
    """Every import-linter contract in pyproject.toml holds for the code as it is."""
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize(
    ("path", "line", "expected"),
    [
        ("pipeline/core/schemas.py", "import pipeline.stages.score", "is not allowed to import"),
        ("pipeline/torchkit/encode.py", "import teacher.model", "is not allowed to import"),
        ("student/bank.py", "import teacher.model", "teacher and student never import each other"),
        ("teacher/losses.py", "import teacher.train", "No cycles are allowed in teacher"),
        ("pipeline/core/dataset.py", "import click", "pipeline is not allowed to import click"),
        ("pipeline/pairs.py", "", "are not listed as layers"),
    ],
)
def test_a_back_edge_breaks_a_contract(tmp_path, path, line, expected):
    """An import against the rule (even a deferred one), a file-level cycle, click in a package, or
    a module outside pipeline's three floors makes `lint-imports` fail, naming what broke."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / path
    text = target.read_text() if target.exists() else ""
    target.write_text(text + f"\n\ndef _back_edge():\n    {line or 'pass'}  # noqa\n")
    run = lint_imports(tmp_path)
    assert run.returncode == 1
    assert expected in run.stdout, run.stdout


def _cli_modules() -> list[str]:
    return sorted(p.stem for p in ROOT.glob("cli*.py"))


def test_cli_modules_sit_on_top():
    """Every cli*.py module is forbidden to the packages, and the cli modules import each other
    without a cycle (import-linter only sees packages, so this reads their imports itself)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (no_click,) = [c for c in config["contracts"] if c["id"] == "no-click"]
    mods = _cli_modules()
    assert set(mods) <= set(no_click["forbidden_modules"]), "add the new cli module to no-click"
    edges = {}
    for mod in mods:
        tree = ast.parse((ROOT / f"{mod}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        edges[mod] = {n.split(".")[0] for n in names} & set(mods) - {mod}
    done: set[str] = set()

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert mod not in path, f"import cycle among the cli modules: {' -> '.join(path + (mod,))}"
        if mod not in done:
            for nxt in edges[mod]:
                visit(nxt, path + (mod,))
            done.add(mod)

    for mod in mods:
        visit(mod, ())


def test_no_module_is_long():
    """No module of pipeline/, teacher/, student/ or the cli is over 450 lines (STYLE 15)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    files += [ROOT / f"{m}.py" for m in _cli_modules()]
    long = {
        str(p.relative_to(ROOT)): n
        for p in files
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
