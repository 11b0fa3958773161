"""--precision: what each choice runs as, that it reaches the teacher cache key, the candidates
and the trained student's records, and that half-precision results stay close to fp32's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_error, run

from pipeline.core import cache
from pipeline.core.candidates import load_embeddings, read_manifest
from pipeline.torchkit.encode import (
    autocast,
    cast_model,
    check_precision,
    precision_scope,
    resolve_precision,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_defaults_scopes_and_errors():
    """Unset: amp_bf16 on CUDA, fp32 on CPU; a scope sets it, nested scopes restore it."""
    assert (resolve_precision(CPU), resolve_precision(CUDA)) == ("fp32", "amp_bf16")
    with precision_scope("bf16"):
        assert resolve_precision(CPU) == resolve_precision(CUDA) == "bf16"
        with precision_scope("amp"):
            assert resolve_precision(CPU) == "amp"
        assert resolve_precision(CPU) == "bf16"
    assert resolve_precision(CPU) == "fp32"
    with pytest.raises(ValueError, match="--precision 'half' is unknown; choose one of fp32"):
        check_precision("half")


@pytest.mark.parametrize(
    ("precision", "weights", "compute"),
    [
        ("fp32", torch.float32, torch.float32),
        ("amp_bf16", torch.float32, torch.bfloat16),
        ("bf16", torch.bfloat16, torch.bfloat16),
    ],
)
def test_what_each_precision_runs_as(precision, weights, compute):
    """amp keeps fp32 weights and computes in half; pure casts the weights too."""
    layer = torch.nn.Linear(4, 3)
    with precision_scope(precision):
        cast_model(layer, CPU)
        with autocast(CPU):
            out = layer(torch.randn(2, 4))
    assert layer.weight.dtype == weights and out.dtype == compute


def _score(cands, teacher, root, *extra) -> dict:
    result = run(
        "score-teacher",
        "--candidates",
        cands,
        "--teacher",
        teacher,
        "--cache-dir",
        root,
        "--json",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_precision_reaches_cache_key_and_candidates(small_dataset, tiny_teacher_dir, tmp_path):
    """score-teacher --precision amp_bf16 is another cache entry (the key records it) whose scores
    stay close to fp32's; mine-candidates records the precision of its embeddings and does not
    reuse embeddings made with another."""
    fp32, bf16 = tmp_path / "c32", tmp_path / "cbf16"
    for out, extra in ((fp32, ()), (bf16, ("--precision", "bf16"))):
        args = ("mine-candidates", "--student", "tiny", "--data", small_dataset, "--out", out)
        assert run(*args, "--k", 3, *extra).exit_code == 0
    assert read_manifest(fp32)["model"]["precision"] == "fp32"
    assert read_manifest(bf16)["model"]["precision"] == "bf16"
    a, b = load_embeddings(fp32), load_embeddings(bf16)
    cos = (a.image * b.image).sum(1)  # the same unit vectors, up to bf16 rounding
    assert cos.min() > 0.98 and not np.array_equal(a.image, b.image)
    again = run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        small_dataset,
        "--out",
        tmp_path / "c3",
        "--k",
        3,
        "--embeddings-from",
        bf16,
    )
    assert_error(again, "--embeddings-from", "made with another dataset, split or model")

    root = tmp_path / "cache"
    plain = _score(fp32, tiny_teacher_dir, root)
    amp = _score(fp32, tiny_teacher_dir, root, "--precision", "amp_bf16")
    assert plain["key"] != amp["key"] and amp["pairs_scored"] == plain["pairs_scored"] > 0
    assert cache.read_key(amp["cache_path"])["precision"] == "amp_bf16"
    s32 = cache.load_scores(plain["cache_path"])[1].sort("image_id", "caption_id")
    s16 = cache.load_scores(amp["cache_path"])[1].sort("image_id", "caption_id")
    gap = np.abs(s32["score"].to_numpy() - s16["score"].to_numpy())
    assert gap.max() < 0.1 and gap.max() > 0  # bf16 rounding, not another function


def test_train_student_records_precision(small_dataset, tmp_path):
    """train-student --precision amp_bf16 trains on CPU and records it; a bad value is refused."""
    args = [
        "train-student",
        "--data",
        small_dataset,
        "--loss",
        "none",
        "--batching",
        "random",
        "--epochs",
        1,
        "--batch-size",
        8,
        "--num-workers",
        0,
        "--device",
        "cpu",
        "--json",
    ]
    result = run(*args, "--out", tmp_path / "s", "--precision", "amp_bf16")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["precision"] == "amp_bf16"
    assert json.loads((tmp_path / "s" / "config.json").read_text())["precision"] == "amp_bf16"
    bad = run(*args, "--out", tmp_path / "t", "--precision", "half")
    assert_error(bad, "--precision 'half' is unknown")
