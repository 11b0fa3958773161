"""train-student and train-teacher through the CLI: options map onto the configs, errors are lines."""

from __future__ import annotations

import json

from conftest import assert_error, run

from student.models import load_model


def test_train_student_cli_runs_and_output_is_a_spec(small_dataset, tmp_path):
    """`cprd train-student --loss none` trains, prints one JSON line, and OUT is a model spec."""
    out = tmp_path / "itc"
    result = run(
        "train-student",
        "--data",
        small_dataset,
        "--out",
        out,
        "--loss",
        "none",
        "--batching",
        "random",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["command"] == "train-student" and summary["epochs"] == 1
    assert load_model(str(out)).model_cfg["embed_dim"] > 0
    mined = run(
        "mine-candidates",
        "--data",
        small_dataset,
        "--student",
        out,
        "--out",
        tmp_path / "cand",
        "--k",
        "2",
    )
    assert mined.exit_code == 0, mined.output


def test_train_cli_errors(small_dataset, tmp_path):
    """Bad training options give exit 1 and one Error line naming the flag."""
    out = tmp_path / "s"
    assert_error(
        run("train-student", "--data", small_dataset, "--out", out, "--loss", "bogus"),
        "--loss",
        "bogus",
    )
    assert_error(
        run("train-student", "--data", small_dataset, "--out", out, "--loss", "cprd"),
        "--teacher-scores",
    )
    assert_error(
        run("train-student", "--data", small_dataset, "--out", out, "--epochs", "x"), "--epochs"
    )
    assert_error(
        run("train-teacher", "--data", small_dataset, "--out", tmp_path / "t", "--epochs", "0"),
        "epochs",
        ">= 1",
    )
