"""Shared fixtures: small real image files and datasets the tests write themselves."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# A hub call hangs ~24 s before failing here; nothing in the tests may download anything.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Frozen towers' features (pipeline/features.py) go to a fresh folder, never the user's cache.
os.environ["CPRD_FEATURE_CACHE"] = tempfile.mkdtemp(prefix="cprd-test-features-")

import pytest  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402
from PIL import Image  # noqa: E402

from cli import cli  # noqa: E402


def write_image(
    path: Path, colour: tuple[int, int, int], fmt: str = "JPEG", size: int = 32
) -> Path:
    """Write a real, decodable image file of one colour with a white square in the corner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), colour)
    img.paste((255, 255, 255), (0, 0, size // 4, size // 4))
    img.save(path, format=fmt)
    return path


@pytest.fixture
def karpathy(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Karpathy-split JSON and its image root: 6 images (JPEG and PNG), restval included."""
    root = tmp_path / "imgs"
    entries = []
    splits = ["train", "restval", "train", "val", "test", "test"]
    for i, split in enumerate(splits):
        sub = "sub" if i % 2 else ""
        name = f"im{i}.{'png' if i % 3 == 0 else 'jpg'}"
        write_image(
            root / sub / name,
            (40 * i, 100, 200 - 30 * i),
            fmt="PNG" if name.endswith("png") else "JPEG",
        )
        entry = {
            "filename": name,
            "split": split,
            "imgid": i,
            "sentences": [
                {"raw": f"picture {i} caption {j} café ☕ ", "tokens": []} for j in range(2 + i % 2)
            ],
        }
        if sub:
            entry["filepath"] = sub
        entries.append(entry)
    path = tmp_path / "dataset_tiny.json"
    path.write_text(json.dumps({"images": entries, "dataset": "tiny"}, ensure_ascii=False))
    return path, root


# The project's shared fixtures (../shared beside the checkout); CI has them.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLICKR8K = SHARED / "data" / "flickr8k-3k"


def require_fixture(path: Path) -> None:
    """Skip the test when ``path`` is absent (a clone without ../shared), but fail it where
    CPRD_REQUIRE_FIXTURES=1 (.ci/run sets it): there a missing fixture is a broken CI, and a
    skip would hide that the check never ran."""
    if path.exists():
        return
    if os.environ.get("CPRD_REQUIRE_FIXTURES") == "1":
        pytest.fail(
            f"fixture '{path}' is missing and CPRD_REQUIRE_FIXTURES=1 requires it; put the "
            "project's shared folder beside the checkout, or unset CPRD_REQUIRE_FIXTURES"
        )
    pytest.skip(f"fixture '{path}' is absent on this machine")


def run(*args: str) -> Result:
    """Invoke the real CLI in-process and return click's result."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def mine_and_score(
    base: Path, data: Path, teacher: Path, k: int, shards: int, split: str = "train"
) -> Path:
    """Mine ``k`` candidates of ``split`` into base/cand and score them into base/cache; the
    cache entry."""
    result = run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        data,
        "--out",
        base / "cand",
        "--k",
        k,
        "--split",
        split,
    )
    assert result.exit_code == 0, result.output
    result = run(
        "score-teacher",
        "--candidates",
        base / "cand",
        "--teacher",
        teacher,
        "--cache-dir",
        base / "cache",
        "--shards",
        shards,
        "--json",
    )
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout.strip().splitlines()[-1])["cache_path"])


def assert_error(result: Result, *fragments: str) -> str:
    """Assert exit 1 with exactly one `Error:` line holding every fragment, and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def demo_dataset_master(tmp_path_factory) -> Path:
    """One small demo dataset built once per session; use `demo_dataset` for a private copy."""
    from pipeline.stages.demo_data import generate_demo_data

    out = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo_data(
        out,
        train_images=32,
        val_images=16,
        test_images=16,
        image_size=32,
        captions_per_image=3,
        seed=0,
        progress=False,
    )
    return out


@pytest.fixture
def demo_dataset(demo_dataset_master: Path, tmp_path: Path) -> Path:
    """A private copy of the session's small demo dataset."""
    dst = tmp_path / "demo"
    shutil.copytree(demo_dataset_master, dst)
    return dst


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A 3-split dataset of 24 real PNG files, 2-3 captions each, imported the real way (read-only)."""
    from pipeline.stages.importers import build_dataset

    base = tmp_path_factory.mktemp("small")
    colours = ["red", "green", "blue", "yellow"]
    paths, splits, captions = [], [], []
    for i in range(24):
        rgb = ((i * 53) % 256, (i * 97) % 256, (i * 151) % 256)
        paths.append(write_image(base / "img" / f"{i:02d}.png", rgb, fmt="PNG"))
        splits.append(["train", "train", "val", "test"][i % 4])
        captions.append(
            [f"a {colours[i % 4]} picture number {i} view {j}" for j in range(2 + i % 2)]
        )
    build_dataset(base / "ds", paths, splits, captions, {"kind": "test"}, progress=False)
    return base / "ds"


@pytest.fixture(scope="session")
def tiny_teacher_dir(small_dataset, tmp_path_factory) -> Path:
    """A tiny, randomly initialised BLIP ITM model saved with save_pretrained (read-only)."""
    import torch

    from pipeline.core.dataset import Dataset
    from teacher.tiny import build_tiny_teacher

    torch.manual_seed(0)
    captions = Dataset.load(small_dataset).captions["caption"].to_list()
    model, processor = build_tiny_teacher(
        captions,
        image_size=32,
        patch_size=8,
        hidden_size=32,
        vision_layers=1,
        text_layers=1,
        heads=2,
    )
    out = tmp_path_factory.mktemp("teacher") / "blip"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
