"""The options of ``cprd train-student``: one frozen dataclass, one CLI flag per field, checked.

Written as ``config.json`` next to the output and inside every ``last.pt`` checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_VALID_TOP = 4  # CPRD anchors per query when neither validity flag is given
# Options that may change between a run and its --resume (they change neither steps nor maths;
# a larger --epochs stretches the cosine schedule from where it is).
RESUMABLE = frozenset(
    {"epochs", "device", "num_workers", "val_every", "log_every", "resume", "overwrite"}
    | {"stop_after", "feature_cache", "report_to"}
)


@dataclass(frozen=True)
class StudentTrainConfig:
    data: Path  # dataset dir; trains on its train split, validates on val
    out: Path  # output dir; becomes a student model spec (the best epoch by val RSUM)
    student: str = "tiny"  # model to start from: tiny, open_clip NAME[:tag|:ckpt], a student dir
    teacher_scores: Path | None = None  # teacher cache (`cprd score-teacher`): root or entry
    candidates: Path | None = None  # candidates dir: neighbour lists for hard batching w/o teacher
    loss: str = "cprd"  # distillation term: cprd | kl | listmle | margin-mse | none (ITC only)
    epochs: int = 10  # every training image seeds one batch per epoch
    batch_size: int = 128  # pairs per step, over all ranks together
    lr: float = 5e-4  # peak AdamW learning rate
    weight_decay: float = 0.1  # AdamW decay of weight matrices (not gains, biases, logit_scale)
    warmup_steps: int = 100  # linear warmup, then cosine decay to 0 at the last step
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    lam: float = 1.0  # λ in total = ITC + λ * distillation
    tau: float | None = None  # distillation temperature; None: 1/logit_scale, detached
    tau_teacher: float = 1.0  # kl: temperature of the teacher softmax over raw ITM logits
    hard_k: int = 16  # cached hard negatives kept per query, in teacher order
    valid_top: int | None = None  # CPRD: the first J negatives are anchors (neither flag: 4)
    valid_min_prob: float | None = None  # CPRD: negatives with teacher match prob >= this
    negatives: str = "bank"  # how each query's top hard_k cached negatives reach its loss: bank
    # (read from the negative bank, student/bank.py), explicit (encoded in the step), inbatch
    # (only those the batch happens to hold)
    bank_refresh: int = 0  # bank: also re-encode every bank row every N steps (0: each epoch only)
    itc_negatives: str = "batch"  # batch: ITC over the pairs only; pool: its denominators also
    # hold every delivered negative; own: each query's own delivered negatives
    batching: str = "hard"  # hard: seeds plus their cached neighbours; random: random pairs
    batching_order: str | None = None  # hard batching's neighbour order: miner (--candidates'
    # scores, no teacher) or teacher (--teacher-scores); None: teacher when given, else miner
    neighbours_per_seed: int = 3  # hard batching: about this many neighbour pairs per seed
    seed: int = 0  # model init (tiny) and batch order
    device: str | None = None  # None: CUDA when present, else CPU
    precision: str | None = None  # fp32 | amp_bf16 | amp | bf16 | fp16; None: amp_bf16 on CUDA
    num_workers: int = 2  # image-decoding worker processes per rank
    feature_cache: Path | None = None  # frozen towers' feature cache; None: $CPRD_FEATURE_CACHE
    # or ~/.cache/cprd/features (pipeline/torchkit/features.py)
    val_every: int = 1  # validate every N epochs (and always after the last)
    log_every: int = 10  # steps between "train" lines in metrics.jsonl
    report_to: str = "none"  # none | tensorboard: metrics.jsonl's numbers also to OUT/tensorboard
    resume: bool = False  # continue from out/last.pt
    overwrite: bool = False  # replace an existing out dir
    stop_after: int | None = None  # end this run after this many epochs (time-boxed jobs)

    def order(self) -> str | None:
        """The neighbour order hard batching uses (None for random batching)."""
        if self.batching != "hard":
            return None
        if self.batching_order is not None:
            return self.batching_order
        return "teacher" if self.teacher_scores is not None else "miner"

    def valid_rule(self) -> tuple[int | None, float | None]:
        """(top, min_prob) for num_valid_from_rule: exactly one set."""
        if self.valid_top is None and self.valid_min_prob is None:
            return DEFAULT_VALID_TOP, None
        return self.valid_top, self.valid_min_prob


def config_dict(cfg: StudentTrainConfig) -> dict:
    """The config as JSON-able values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_config(cfg: StudentTrainConfig) -> None:
    """Raise ValueError naming the flag for any invalid option or combination of options."""
    # Imported here: this module stays light so `cprd --help` can read the config instantly.
    from pipeline.torchkit.encode import check_precision
    from student.losses import LOSS_NAMES

    _need(
        cfg.loss in LOSS_NAMES,
        f"--loss '{cfg.loss}' is unknown; choose one of {', '.join(LOSS_NAMES)}",
    )
    for flag, value, ok, rule in (
        ("--lam", cfg.lam, cfg.lam >= 0, ">= 0"),
        ("--epochs", cfg.epochs, cfg.epochs >= 1, ">= 1"),
        ("--batch-size", cfg.batch_size, cfg.batch_size >= 2, ">= 2 (in-batch negatives)"),
        ("--lr", cfg.lr, cfg.lr > 0, "> 0"),
        ("--weight-decay", cfg.weight_decay, cfg.weight_decay >= 0, ">= 0"),
        ("--warmup-steps", cfg.warmup_steps, cfg.warmup_steps >= 0, ">= 0"),
        ("--grad-clip", cfg.grad_clip, cfg.grad_clip >= 0, ">= 0 (0 turns clipping off)"),
        ("--tau", cfg.tau, cfg.tau is None or cfg.tau > 0, "> 0"),
        ("--tau-teacher", cfg.tau_teacher, cfg.tau_teacher > 0, "> 0"),
        ("--hard-k", cfg.hard_k, cfg.hard_k >= 1, ">= 1"),
        ("--valid-top", cfg.valid_top, cfg.valid_top is None or cfg.valid_top >= 1, ">= 1"),
        ("--neighbours-per-seed", cfg.neighbours_per_seed, cfg.neighbours_per_seed >= 1, ">= 1"),
        ("--num-workers", cfg.num_workers, cfg.num_workers >= 0, ">= 0"),
        ("--val-every", cfg.val_every, cfg.val_every >= 1, ">= 1"),
        ("--log-every", cfg.log_every, cfg.log_every >= 1, ">= 1"),
        ("--stop-after", cfg.stop_after, cfg.stop_after is None or cfg.stop_after >= 1, ">= 1"),
        ("--seed", cfg.seed, cfg.seed >= 0, ">= 0"),
    ):
        _need(ok, f"{flag} must be {rule}, got {value}")
    from pipeline.core.tracking import check_report_to

    check_report_to(cfg.report_to)
    p = cfg.valid_min_prob
    _need(p is None or 0 <= p <= 1, f"--valid-min-prob must lie in [0, 1], got {p}")
    _need(
        cfg.valid_top is None or p is None,
        "--valid-top and --valid-min-prob are two validity rules; give at most one",
    )
    _need(
        cfg.negatives in ("bank", "explicit", "inbatch"),
        f"--negatives must be bank, explicit or inbatch, got '{cfg.negatives}'",
    )
    _need(cfg.bank_refresh >= 0, f"--bank-refresh must be >= 0, got {cfg.bank_refresh}")
    _need(
        cfg.itc_negatives in ("pool", "own", "batch"),
        f"--itc-negatives must be pool, own or batch, got '{cfg.itc_negatives}'",
    )
    _need(
        cfg.batching in ("hard", "random"),
        f"--batching must be hard or random, got '{cfg.batching}'",
    )
    _need(
        cfg.batching_order in (None, "miner", "teacher"),
        f"--batching-order must be miner or teacher, got '{cfg.batching_order}'",
    )
    _need(
        cfg.loss == "none" or cfg.teacher_scores is not None,
        f"--loss {cfg.loss} needs --teacher-scores PATH (a cache from `cprd score-teacher`); "
        "use --loss none for the ITC baseline",
    )
    _need(
        cfg.batching == "random" or cfg.teacher_scores is not None or cfg.candidates is not None,
        "--batching hard needs neighbour lists: pass --teacher-scores (a teacher cache) or "
        "--candidates (a `cprd mine-candidates` dir), or use --batching random",
    )
    _need(p is None or cfg.teacher_scores is not None, "--valid-min-prob needs --teacher-scores")
    _need(
        cfg.order() != "miner" or cfg.candidates is not None,
        "--batching-order miner needs --candidates DIR (the `cprd mine-candidates` output the "
        "cache was scored from); or use --batching-order teacher",
    )
    _need(
        cfg.order() != "teacher" or cfg.teacher_scores is not None,
        "--batching-order teacher needs --teacher-scores PATH; use --batching-order miner with "
        "--candidates for a teacher-free run",
    )
    check_precision(cfg.precision)
    _need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    for line in ignored_flags(cfg):  # said, not silently dropped
        log.warning(line)
    out = Path(cfg.out)
    _need(
        not cfg.resume or (out / "last.pt").is_file(),
        f"--resume: '{out / 'last.pt'}' does not exist (the run stopped before its first "
        "checkpoint); start again with --overwrite"
        if out.is_dir()
        else f"--resume: '{out / 'last.pt'}' does not exist; start without --resume",
    )
    _need(
        not out.exists() or cfg.resume or cfg.overwrite,
        f"--out '{out}' already exists; pass --resume to continue it, --overwrite to replace it, "
        "or choose another --out",
    )
    ours = any((out / f).exists() for f in ("config.json", "last.pt", "student.json"))
    _need(
        not (cfg.overwrite and out.is_dir() and any(out.iterdir()) and not ours),
        f"--overwrite: '{out}' is not a train-student output (no config.json, last.pt or "
        "student.json); not replacing it",
    )


def ignored_flags(cfg: StudentTrainConfig) -> list[str]:
    """One line per option set to a non-default value that this combination never reads."""
    default = {f.name: f.default for f in dataclasses.fields(StudentTrainConfig)}
    lookup = cfg.teacher_scores is not None or (
        cfg.candidates is not None and cfg.batching == "hard"
    )
    rules = (
        ("valid_top", cfg.loss != "cprd", f"applies to --loss cprd only, not {cfg.loss}"),
        ("valid_min_prob", cfg.loss != "cprd", f"applies to --loss cprd only, not {cfg.loss}"),
        ("tau_teacher", cfg.loss != "kl", f"applies to --loss kl only, not {cfg.loss}"),
        ("tau", cfg.loss in ("none", "margin-mse"), f"--loss {cfg.loss} has no temperature"),
        ("lam", cfg.loss == "none", "--loss none has no distillation term to weigh"),
        ("neighbours_per_seed", cfg.batching == "random", "applies to --batching hard only"),
        (
            "hard_k",
            not lookup,
            "no neighbour lists are read (no --teacher-scores, no hard batching from --candidates)",
        ),
        (
            "candidates",
            cfg.teacher_scores is None and cfg.batching == "random",
            "--batching random reads no neighbour lists",
        ),
    )
    return [
        f"--{name.replace('_', '-')} {getattr(cfg, name)} is ignored: {why}"
        for name, ignored, why in rules
        if ignored and getattr(cfg, name) != default[name]
    ]


def check_resumable(cfg: StudentTrainConfig, saved: dict) -> None:
    """ValueError unless ``saved`` (a checkpoint's config) differs only in RESUMABLE options."""
    now = config_dict(cfg)
    differ = sorted(k for k in now if k not in RESUMABLE and now[k] != saved.get(k))
    if differ:
        k = differ[0]
        raise ValueError(
            f"--resume: options {differ} differ from the run in '{cfg.out}' ({k}: "
            f"{saved.get(k)!r} then, {now[k]!r} now); resume with the same options"
        )
