"""The training commands of cprd's command line: train-teacher, train-student (their options are
generated from the config dataclasses)."""

from __future__ import annotations

import click

from cli_common import CONTEXT, _emit, config_options, json_option


def _teacher_config():
    from teacher.train_config import TeacherTrainConfig

    return TeacherTrainConfig


def _student_config():
    from student.train_config import StudentTrainConfig

    return StudentTrainConfig


@click.command("train-teacher", context_settings=CONTEXT)
@config_options(_teacher_config())
@json_option
def train_teacher_cmd(as_json, **fields):
    """Train or fine-tune a BLIP image-text-matching cross-encoder (ITM with hard negatives + ITC).

    `--base tiny` starts from a tiny BLIP with a vocabulary built from the training captions (no
    download); a hub id or a `save_pretrained` dir fine-tunes that model. The output is saved with
    `save_pretrained`, so `score-teacher --teacher OUT` loads it like any BLIP checkpoint.

    Example:

    \b
        cprd train-teacher --data data/demo --out runs/teacher --epochs 12
    """
    from teacher.train import train_teacher
    from teacher.train_config import TeacherTrainConfig

    summary = train_teacher(TeacherTrainConfig(**fields))
    _emit({"command": "train-teacher", **summary}, as_json, f"teacher saved to {fields['out']}")


@click.command("train-student", context_settings=CONTEXT)
@config_options(_student_config())
@json_option
def train_student_cmd(as_json, **fields):
    """Train the dual encoder: ITC plus a distillation term read from the teacher cache.

    `--loss cprd` (default) distils the teacher's partial ranking of each query's hard negatives;
    `kl`, `listmle`, `margin-mse` are the baselines; `none` is plain ITC and needs no cache. OUT
    becomes a model spec for `evaluate` and `mine-candidates`. Runs under torchrun (DDP).

    Example:

    \b
        cprd train-student --data data/demo --teacher-scores data/cache --loss cprd \\
            --epochs 10 --out runs/cprd
    """
    from student.train import train_student
    from student.train_config import StudentTrainConfig

    summary = train_student(StudentTrainConfig(**fields))
    best = summary.get("best_val") or {}
    _emit(
        {"command": "train-student", **summary},
        as_json,
        f"student saved to {fields['out']} (best epoch {summary.get('best_epoch')}, "
        f"val RSUM {best.get('rsum', float('nan')):.2f})",
    )


COMMANDS = (train_teacher_cmd, train_student_cmd)
