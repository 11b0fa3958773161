"""Wiring that explains itself: cache roots as --teacher-scores, ignored flags said aloud."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from conftest import assert_error, mine_and_score, run

from pipeline.core.cache_entry import resolve_entry
from pipeline.core.dataset import Dataset
from student.train_config import StudentTrainConfig, ignored_flags


@pytest.fixture(scope="module")
def entry(small_dataset, tiny_teacher_dir, tmp_path_factory) -> Path:
    """A complete teacher cache entry of the small dataset (k=3, 2 shards)."""
    return mine_and_score(tmp_path_factory.mktemp("wiring"), small_dataset, tiny_teacher_dir, 3, 2)


def test_root_resolves_to_the_datasets_entry(small_dataset, entry):
    """The root holding one entry for the dataset gives that entry; an entry gives itself."""
    fp = Dataset.load(small_dataset).fingerprint
    assert resolve_entry(entry.parent, fp) == entry
    assert resolve_entry(entry, fp) == entry
    key = json.loads((entry / "key.json").read_text())
    assert resolve_entry(entry.parent, fp, key["teacher"]["spec"]) == entry
    with pytest.raises(ValueError, match="no entry for this dataset"):
        resolve_entry(entry.parent, "f" * 64)


def test_ambiguous_root_lists_its_entries(small_dataset, entry, tmp_path):
    """Two entries for one dataset: the error names both and says which flag to change."""
    root = tmp_path / "cache"
    shutil.copytree(entry, root / entry.name)
    shutil.copytree(entry, root / "other")
    fp = Dataset.load(small_dataset).fingerprint
    with pytest.raises(ValueError, match="holds 2 entries") as e:
        resolve_entry(root, fp)
    assert str(root / "other") in str(e.value) and "--teacher-scores ROOT/KEY" in str(e.value)
    assert resolve_entry(tmp_path, fp) == tmp_path  # no entry inside: the cache reader says why


def test_train_student_takes_the_cache_root(small_dataset, entry, tmp_path):
    """train-student --teacher-scores ROOT trains from the dataset's entry under it."""
    result = run(
        "train-student",
        "--data",
        small_dataset,
        "--out",
        tmp_path / "s",
        "--teacher-scores",
        entry.parent,
        "--loss",
        "kl",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["lookup"]["source"] == "teacher"


def test_ignored_flags_are_named():
    """Options the chosen loss or batching never reads are reported, defaults are not."""
    cfg = StudentTrainConfig(data=Path("d"), out=Path("o"), loss="none", batching="random")
    assert ignored_flags(cfg) == []
    lines = ignored_flags(
        StudentTrainConfig(
            data=Path("d"),
            out=Path("o"),
            loss="none",
            batching="random",
            valid_top=2,
            tau_teacher=2.0,
            lam=0.5,
            candidates=Path("c"),
        )
    )
    assert [ln.split()[0] for ln in lines] == [
        "--valid-top",
        "--tau-teacher",
        "--lam",
        "--candidates",
    ]
    kl = StudentTrainConfig(
        data=Path("d"),
        out=Path("o"),
        loss="kl",
        teacher_scores=Path("t"),
        candidates=Path("c"),
        tau_teacher=2.0,
    )
    assert ignored_flags(kl) == []  # --candidates beside a teacher cache is not flagged


def test_ignored_flag_is_a_warning_line(small_dataset, tmp_path):
    """The CLI prints the warning on stderr and still trains."""
    result = run(
        "train-student",
        "--data",
        small_dataset,
        "--out",
        tmp_path / "s",
        "--loss",
        "none",
        "--batching",
        "random",
        "--valid-top",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert "warning: --valid-top 2 is ignored: applies to --loss cprd only" in result.stderr


def test_missing_entry_under_root_is_one_line(small_dataset, entry, tmp_path):
    """A root with no entry for this dataset is one error line naming the fix."""
    root = tmp_path / "empty-cache"
    root.mkdir()
    assert_error(
        run(
            "train-student",
            "--data",
            small_dataset,
            "--out",
            tmp_path / "s",
            "--teacher-scores",
            root,
            "--loss",
            "kl",
        ),
        "not a teacher cache entry",
    )


def test_rerank_itm_plus_itc_adds_the_cosine(small_dataset, tiny_teacher_dir):
    """--rerank-score itm+itc ranks by ITM logit + cosine: equal to re-ranking with that sum."""
    import numpy as np
    import torch

    from pipeline.core.metrics import i2t_ranks, retrieval_metrics_from_ranks, t2i_ranks
    from pipeline.stages.rerank import rerank_metrics
    from pipeline.torchkit.encode import encode_split
    from student.models import load_model
    from teacher.model import load_teacher
    from teacher.scoring import score_pairs

    ds = Dataset.load(small_dataset)
    images, captions = ds.split("train")
    torch.manual_seed(0)
    img, cap = encode_split(load_model("tiny"), ds, images, captions, progress=False)
    row_of = {i: r for r, i in enumerate(images["image_id"].to_list())}
    owner = np.array([row_of[i] for i in captions["image_id"].to_list()])
    paths = [ds.image_path(p) for p in images["path"]]
    texts = captions["caption"].to_list()
    teacher = load_teacher(str(tiny_teacher_dir))
    k = len(cap)  # every caption and every image re-ranked: no top-K cut-off in either direction
    assert k >= len(img) >= 10
    got = rerank_metrics(img, cap, owner, teacher, paths, texts, k, progress=False, score="itm+itc")
    every = pl.DataFrame(
        {
            "image_id": np.repeat(np.arange(len(img)), len(cap)),
            "caption_id": np.tile(np.arange(len(cap)), len(img)),
        }
    )
    itm = score_pairs(teacher, every, paths, texts)["score"].to_numpy().reshape(len(img), len(cap))
    total = torch.from_numpy(itm + img @ cap.T)  # (N, M)
    owner_t = torch.as_tensor(owner)
    want = retrieval_metrics_from_ranks(
        i2t_ranks(total, torch.arange(len(img)), owner_t), t2i_ranks(total.T, owner_t)
    )
    assert got == pytest.approx(want)
