"""cprd's command line: a thin click shell over the pipeline, teacher and student packages.

Each command builds its arguments and calls one package function. Heavy imports (torch, faiss,
open_clip, polars) happen inside the commands so `cprd --help` answers instantly. Errors raised
inside the packages become one `Error: ...` line and exit code 1 (`cprd --debug` shows the
traceback); logs and progress bars go to stderr, so `--json` output on stdout stays clean.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PACKAGES = ("pipeline", "teacher", "student")


class CprdGroup(click.Group):
    """A click group that turns any exception from a command into one clean error line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            # One line and exit 1 for every bad input, option parsing included.
            where = e.ctx.command_path if e.ctx else ctx.command_path
            raise click.ClickException(f"{e.format_message()} (see `{where} --help`)") from e
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            _close_progress_bars()
            raise click.ClickException(_one_line(e)) from e


class _StderrHandler(logging.Handler):
    """Log records as plain lines on stderr through click (so CliRunner captures them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        click.echo(prefix + self.format(record), err=True)


def _setup_logging() -> None:
    for pkg in PACKAGES:
        logger = logging.getLogger(pkg)
        logger.setLevel(logging.INFO)
        logger.handlers = [_StderrHandler()]
        logger.propagate = False


def _close_progress_bars() -> None:
    """End every open tqdm bar with a newline, so the Error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _one_line(e: Exception) -> str:
    if isinstance(e, (ValueError, OSError)):
        msg = str(e)
    else:  # a bug, not bad input: say so rather than dress it up as a usage error
        msg = f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)"
    return " ".join(msg.split("\n"))


def _emit(summary: dict, as_json: bool, human: str) -> None:
    """End a stage command: one JSON line with --json, else a short human summary."""
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(human)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="End by printing one JSON line summarising the run."
)
overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT if it exists (only once the new one is complete).",
)


@click.group(cls=CprdGroup, context_settings=CONTEXT)
@click.version_option(package_name="cprd", prog_name="cprd")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """cprd: distil a cross-encoder into a fast dual encoder, scoring the teacher only once.

    Stages: mine-candidates -> score-teacher -> train-student, around one on-disk contract.
    """
    _setup_logging()


# ---- options generated from a config dataclass -----------------------------------------------

_TYPES = {"Path": click.Path(path_type=Path), "str": str, "int": int, "float": float}


def config_options(cls, exclude: tuple[str, ...] = ()):
    """Decorate a command with one option per field of config dataclass ``cls`` (STYLE 2).

    The help text is the field's own comment in the class source, so it is written once; the
    option name is the field name with dashes; booleans become flags.
    """
    import dataclasses
    import inspect
    import re

    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(cls), re.M))

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude:
                continue
            type_name = str(f.type).replace(" | None", "").strip()
            default = None if f.default is dataclasses.MISSING else f.default
            flag = "--" + f.name.replace("_", "-")
            help_text = comments.get(f.name, "")
            if type_name == "bool":
                fn = click.option(flag, f.name, is_flag=True, default=default, help=help_text)(fn)
            else:
                fn = click.option(
                    flag,
                    f.name,
                    type=_TYPES[type_name],
                    default=default,
                    required=f.default is dataclasses.MISSING,
                    show_default=default is not None,
                    help=help_text,
                )(fn)
        return fn

    return decorate


# ---- datasets ----------------------------------------------------------------------------------


@cli.command("import-data")
@click.option("--karpathy", type=click.Path(path_type=Path), help="Karpathy-split JSON file.")
@click.option(
    "--csv", "csv_file", type=click.Path(path_type=Path), help="CSV of image, caption rows."
)
@click.option("--jsonl", type=click.Path(path_type=Path), help="JSON-lines of image, caption rows.")
@click.option("--parquet", type=click.Path(path_type=Path), help="Parquet of image, caption rows.")
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    help="Root of the image files. Required with --karpathy; tables default to their own folder.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset dir to write.")
@click.option("--image-col", default="image", show_default=True, help="Table column: image path.")
@click.option("--caption-col", default="caption", show_default=True, help="Table column: caption.")
@click.option(
    "--split-col", default=None, help="Table column: split [default: 'split' if present]."
)
@click.option(
    "--default-split",
    default="train",
    show_default=True,
    help="Split for table rows when there is no split column.",
)
@click.option("--skip-bad-images", is_flag=True, help="Drop missing/undecodable images, warn.")
@overwrite_option
@json_option
def import_data(
    karpathy,
    csv_file,
    jsonl,
    parquet,
    images,
    out,
    image_col,
    caption_col,
    split_col,
    default_split,
    skip_bad_images,
    overwrite,
    as_json,
):
    """Import an image-caption collection into cprd's dataset layout.

    Example:

    \b
        cprd import-data --karpathy dataset_flickr30k.json --images flickr30k-images \\
            --out data/flickr30k
        cprd import-data --csv pairs.csv --image-col path --caption-col text --out data/mine
    """
    from pipeline import importers

    sources = {"karpathy": karpathy, "csv": csv_file, "jsonl": jsonl, "parquet": parquet}
    given = {k: v for k, v in sources.items() if v is not None}
    if len(given) != 1:
        raise click.UsageError("give exactly one input: --karpathy, --csv, --jsonl or --parquet")
    common = {"skip_bad_images": skip_bad_images, "overwrite": overwrite}
    if karpathy is not None:
        if images is None:
            raise click.UsageError("--karpathy needs --images ROOT, the folder of the image files")
        meta = importers.import_karpathy(karpathy, images, out, **common)
    else:
        ((fmt, path),) = given.items()
        meta = importers.import_table(
            path,
            fmt,
            out,
            image_col=image_col,
            caption_col=caption_col,
            split_col=split_col,
            default_split=default_split,
            images_root=images,
            **common,
        )
    summary = {"command": "import-data", "out": str(out), **_dataset_summary(meta)}
    _emit(
        summary,
        as_json,
        f"imported {meta['num_images']} images, {meta['num_captions']} "
        f"captions into {out} (fingerprint {meta['fingerprint'][:12]})",
    )


@cli.command("data-info")
@click.argument("dataset", type=click.Path(path_type=Path))
@json_option
def data_info(dataset, as_json):
    """Show a dataset's counts per split, captions per image and fingerprint.

    Example:

    \b
        cprd data-info data/demo
    """
    from pipeline.dataset import Dataset

    info = Dataset.load(dataset).info()
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    click.echo(f"dataset      {info['path']}")
    click.echo(f"fingerprint  {info['fingerprint']}")
    click.echo(f"{'split':<8}{'images':>10}{'captions':>10}")
    for split, c in info["counts"].items():
        click.echo(f"{split:<8}{c['images']:>10}{c['captions']:>10}")
    cpi = info["captions_per_image"]
    click.echo(f"captions per image: min {cpi['min']}, mean {cpi['mean']}, max {cpi['max']}")


@cli.command("demo-data")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset dir to write.")
@click.option("--train-images", default=2000, show_default=True, help="Images in train.")
@click.option("--val-images", default=200, show_default=True, help="Images in val.")
@click.option("--test-images", default=200, show_default=True, help="Images in test.")
@click.option("--captions-per-image", default=5, show_default=True, help="Captions per image.")
@click.option("--image-size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@overwrite_option
@json_option
def demo_data(
    out,
    train_images,
    val_images,
    test_images,
    captions_per_image,
    image_size,
    seed,
    overwrite,
    as_json,
):
    """Generate the embedded compositional benchmark (coloured shapes in spatial relations).

    Images come in contrast groups of 4 whose captions share one bag of words ("a red circle left
    of a blue square" vs "a blue circle left of a red square"), so only a model that binds
    attributes to objects can tell them apart.

    Example:

    \b
        cprd demo-data --out data/demo --train-images 2000 --seed 0
    """
    from pipeline.demo_data import generate_demo_data

    meta = generate_demo_data(
        out,
        train_images=train_images,
        val_images=val_images,
        test_images=test_images,
        captions_per_image=captions_per_image,
        image_size=image_size,
        seed=seed,
        overwrite=overwrite,
    )
    summary = {"command": "demo-data", "out": str(out), **_dataset_summary(meta)}
    _emit(
        summary,
        as_json,
        f"wrote {meta['num_images']} images, {meta['num_captions']} captions "
        f"to {out} (fingerprint {meta['fingerprint'][:12]})",
    )


def _dataset_summary(meta: dict) -> dict:
    keys = ("fingerprint", "num_images", "num_captions", "counts")
    return {k: meta[k] for k in keys}


# ---- stage 1 and evaluation ----------------------------------------------------------------------

student_option = click.option(
    "--student",
    default="tiny",
    show_default=True,
    help="Model spec: tiny, an open_clip name[:pretrained tag or checkpoint], or a student dir.",
)
device_option = click.option(
    "--device", default=None, help="torch device [default: cuda if present]."
)


@cli.command("mine-candidates")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset dir.")
@student_option
@click.option("--split", default="train", show_default=True, help="Split to mine.")
@click.option("--k", default=32, show_default=True, help="Candidates kept per query.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Candidates dir.")
@click.option(
    "--index",
    type=click.Choice(["flat", "ivf", "hnsw"]),
    default="flat",
    show_default=True,
    help="FAISS index: exact flat, or approximate ivf/hnsw (recall measured and printed).",
)
@click.option("--batch-size", default=64, show_default=True, help="Encoding batch size.")
@click.option("--seed", default=0, show_default=True, help="Seed (random init of `tiny`).")
@click.option(
    "--embeddings-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Reuse the embeddings of another candidates dir (same data, split, weights).",
)
@device_option
@overwrite_option
@json_option
def mine_candidates(
    data,
    student,
    split,
    k,
    out,
    index,
    batch_size,
    seed,
    embeddings_from,
    device,
    overwrite,
    as_json,
):
    """Mine each query's top-k candidates in both directions with a dual encoder and FAISS.

    Writes OUT/candidates.parquet (direction, query_id, candidate_id, rank, score, is_positive),
    the embeddings it used, and a manifest. Re-mining into the same OUT with --overwrite (e.g.
    another --k) reuses the embeddings when the model and data are unchanged.

    Example:

    \b
        cprd mine-candidates --data data/demo --student runs/itc --k 32 --out data/cand
    """
    from pipeline.mine import MineConfig, mine_candidates

    _positive(batch_size=batch_size)
    cfg = MineConfig(
        data=data,
        student=student,
        out=out,
        split=split,
        k=k,
        index=index,
        batch_size=batch_size,
        seed=seed,
        device=device,
        embeddings_from=embeddings_from,
        overwrite=overwrite,
    )
    m = mine_candidates(cfg)
    summary = {
        "command": "mine-candidates",
        "out": str(out),
        "split": split,
        "k": k,
        "k_used": m["k_used"],
        "counts": m["counts"],
        "index_recall": m["index_recall"],
        "fingerprint": m["dataset"]["fingerprint"],
    }
    c = m["counts"]
    _emit(
        summary,
        as_json,
        f"mined {c['i2t']} image->text and {c['t2i']} text->image "
        f"candidates ({c['images']} images, {c['captions']} captions) into {out}",
    )


@cli.command("evaluate")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset dir.")
@student_option
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--batch-size", default=64, show_default=True, help="Encoding batch size.")
@click.option("--seed", default=0, show_default=True, help="Seed (random init of `tiny`).")
@click.option(
    "--rerank-teacher", default=None, help="Also report the top-K re-ranked by this teacher."
)
@click.option("--rerank-k", default=128, show_default=True, help="K re-ranked by the teacher.")
@device_option
@json_option
def evaluate_cmd(data, student, split, batch_size, seed, rerank_teacher, rerank_k, device, as_json):
    """Recall@1/5/10 both directions and RSUM (percent) of a dual encoder on one split.

    Flickr30K/COCO protocol: an image query is correct at K if any of its captions is in its
    top K; a caption query if its image is. RSUM is the sum of the six recalls.

    Example:

    \b
        cprd evaluate --data data/demo --student runs/cprd --split test --json
    """
    from pipeline.evaluate import EvalConfig, evaluate

    _positive(batch_size=batch_size, rerank_k=rerank_k)
    cfg = EvalConfig(
        data=data,
        student=student,
        split=split,
        batch_size=batch_size,
        seed=seed,
        device=device,
        rerank_teacher=rerank_teacher,
        rerank_k=rerank_k,
    )
    result = evaluate(cfg)
    rows = [{"name": "dual-encoder", **result["metrics"]}]
    if "rerank_metrics" in result:
        rows.append({"name": f"teacher-rerank@{rerank_k}", **result["rerank_metrics"]})
    summary = {
        "command": "evaluate",
        "split": split,
        "student": student,
        "images": result["images"],
        "captions": result["captions"],
        **result["metrics"],
        "rows": rows,
        "rerank": result.get("rerank_metrics"),
    }
    if not as_json:
        from pipeline.report import table

        click.echo(table(rows))
    _emit(summary, as_json, f"{result['images']} images, {result['captions']} captions ({split})")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=f"'{flag}'")


# ---- stage 2: the teacher cache ------------------------------------------------------------------


@cli.command("score-teacher")
@click.option(
    "--candidates",
    required=True,
    type=click.Path(path_type=Path),
    help="Candidates dir from mine-candidates.",
)
@click.option("--teacher", required=True, help="BLIP ITM checkpoint dir (or hub id).")
@click.option(
    "--shards",
    default=64,
    show_default=True,
    help="Shard count of a new cache (an existing cache keeps its own).",
)
@click.option(
    "--cache-dir",
    default=Path("data/cache"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Cache root; the entry is CACHE_DIR/<key>.",
)
@click.option("--shard-ids", default=None, help="Only these shards, e.g. 0-15,32.")
@click.option(
    "--rank", type=int, default=None, help="Worker rank [default: torchrun/Slurm env, else 0]."
)
@click.option("--world-size", type=int, default=None, help="Workers [default: env, else 1].")
@click.option("--batch-size", default=64, show_default=True, help="Caption batch size.")
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset dir [default: the one recorded in the candidates].",
)
@device_option
@json_option
def score_teacher_cmd(
    candidates,
    teacher,
    shards,
    cache_dir,
    shard_ids,
    rank,
    world_size,
    batch_size,
    data,
    device,
    as_json,
):
    """Score every unique candidate pair with the cross-encoder once, into a sharded cache.

    The ground-truth pairs of the candidates' split are scored too. Pairs already in the cache
    are not scored again; a killed run resumes; N machines can each take a share
    (--rank/--world-size, torchrun or a Slurm array). "complete" means every pair is cached.

    Example:

    \b
        cprd score-teacher --candidates data/cand --teacher runs/teacher --shards 64 \\
            --cache-dir data/cache --json
    """
    from pipeline.score import ScoreConfig, parse_shard_ids, score_teacher

    _positive(shards=shards, batch_size=batch_size)
    cfg = ScoreConfig(
        candidates=candidates,
        teacher=teacher,
        cache_dir=cache_dir,
        shards=shards,
        shard_ids=parse_shard_ids(shard_ids) if shard_ids else None,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        data=data,
        device=device,
    )
    summary = {"command": "score-teacher", **score_teacher(cfg)}
    if "teacher_score" in summary and not as_json:
        click.echo(_distribution_table(summary["teacher_score"], summary["miner_score"]))
    state = (
        "complete: every pair of these candidates is cached"
        if summary["complete"]
        else f"incomplete: {summary['pairs_missing']} pairs not cached yet (other shards pending; "
        "run the same command again once they finish)"
    )
    pos = summary["positives"]
    _emit(
        summary,
        as_json,
        f"scored {summary['pairs_scored']} of {summary['pairs_total']} pairs "
        f"({summary['pairs_candidates']} of the candidates, {pos['added']} more positives of "
        f"the split; {pos['cached']} of {pos['total']} positives cached; "
        f"{summary['shards_written']} shards written, {summary['shards_skipped']} skipped); "
        f"cache {state}: {summary['cache_path']}",
    )


def _distribution_table(teacher: dict, miner: dict) -> str:
    keys = list(teacher)
    lines = [f"{'scores':<10}" + "".join(f"{k:>9}" for k in keys)]
    for name, d in (("teacher", teacher), ("miner", miner)):
        lines.append(f"{name:<10}" + "".join(f"{d[k]:>9.3f}" for k in keys))
    return "\n".join(lines)


@cli.group("cache", context_settings=CONTEXT)
def cache_group():
    """Inspect teacher caches: what is cached, for which dataset and teacher, complete or not."""


@cache_group.command("list")
@click.argument("cache_dir", type=click.Path(path_type=Path))
@json_option
def cache_list(cache_dir, as_json):
    """List the cache entries under a cache root.

    Example:

    \b
        cprd cache list data/cache
    """
    from pipeline.cache import list_caches

    entries = list_caches(cache_dir)
    if as_json:
        click.echo(json.dumps({"caches": entries}, sort_keys=True))
        return
    for e in entries:
        if "error" in e:
            click.echo(f"{e['cache_path']}  unreadable: {e['error']}")
            continue
        state = "complete" if e["complete"] else f"{e['shards_complete']}/{e['num_shards']} shards"
        click.echo(
            f"{e['cache_path']}  {e['pairs']} pairs  {state}  teacher "
            f"{e['teacher'].get('spec')}  dataset {e['dataset_fingerprint'][:12]}"
        )
    if not entries:
        click.echo(f"no caches under {cache_dir}")


@cache_group.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
def cache_info_cmd(path, as_json):
    """Show one cache entry: dataset, teacher, precision, shards complete, pairs.

    Example:

    \b
        cprd cache info data/cache/0123abcd
    """
    from pipeline.cache import cache_info

    info = cache_info(path)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True))
        return
    for k, v in info.items():
        click.echo(f"{k:<20}{v}")


@cache_group.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--repair", is_flag=True, help="Re-score the damaged shards, rewrite the manifest.")
@click.option(
    "--candidates",
    type=click.Path(path_type=Path),
    default=None,
    help="Check that every pair score-teacher scores for this candidates dir is cached; "
    "with --repair, the candidates the cache was scored from.",
)
@click.option(
    "--teacher", default=None, help="With --repair: the teacher [default: the one key.json names]."
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="With --candidates: dataset dir [default: the one recorded in the candidates].",
)
@click.option("--batch-size", default=64, show_default=True, help="With --repair: caption batch.")
@device_option
@json_option
def cache_verify(path, repair, candidates, teacher, data, batch_size, device, as_json):
    """Check every shard of a cache entry (marker, checksum, rows, hashing, duplicates) and the
    manifest, and with --candidates that every pair of theirs is cached; exit 1 naming what is
    damaged or missing. --repair re-scores only the damaged shards.

    Example:

    \b
        cprd cache verify data/cache/0123abcd
        cprd cache verify data/cache/0123abcd --candidates data/cand
        cprd cache verify data/cache/0123abcd --repair --candidates data/cand
    """
    from pipeline.cache_verify import verify

    if not repair and teacher is not None:
        raise click.UsageError("--teacher only goes with --repair")
    if candidates is None and data is not None:
        raise click.UsageError("--data only goes with --candidates")
    _positive(batch_size=batch_size)
    result = {"command": "cache verify"}
    if repair:
        from pipeline.score import repair_cache

        result |= repair_cache(
            path, candidates, teacher, data=data, batch_size=batch_size, device=device
        )
        report = result["after"]
        for line in result["warnings"]:
            click.echo(f"warning: {line}", err=True)
    else:
        result |= verify(path, candidates, data)
        report = result
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        if repair and result["repaired_shards"]:
            click.echo(
                f"re-scored {', '.join(result['repaired_shards'])} ({result['pairs_scored']} pairs)"
            )
        if repair and result["manifest_rewritten"]:
            click.echo("manifest rewritten")
        for line in (*report["key_problems"], *report["manifest"]):
            click.echo(line)
        for name, what in report["damaged"].items():
            click.echo(f"{name}: {what}")
        if "coverage" in report:
            cov = report["coverage"]
            click.echo(
                f"candidates {cov['candidates']}: {cov['pairs'] - cov['missing']} of "
                f"{cov['pairs']} pairs cached ({cov['positives_missing']} positives missing)"
            )
    if not report["healthy"]:
        raise click.ClickException(_damage_summary(path, report))
    if not as_json:
        click.echo(
            f"cache {path} is healthy: {report['num_shards']} shards, {report['pairs']} pairs"
        )


def _damage_summary(path: Path, report: dict) -> str:
    """One line: how many shards are damaged (named), what else, and the command that fixes it."""
    bad = list(report["damaged"])
    shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
    what = [f"{len(bad)} of {report['num_shards']} shards damaged ({shown})"] * bool(bad)
    what += ["key.json damaged"] * bool(report["key_problems"])
    what += ["manifest wrong"] * bool(report["manifest"])
    cov = report.get("coverage", {})
    if cov.get("missing"):
        what.append(f"{cov['missing']} of {cov['pairs']} pairs of --candidates not cached")
    if report["key_problems"]:
        fix = "delete it and run `cprd score-teacher` again"
    elif bad or report["manifest"]:
        fix = f"repair it with `cprd cache verify {path} --repair --candidates DIR`"
    else:
        fix = (
            f"score them with `cprd score-teacher --candidates {cov['candidates']} --cache-dir "
            f"{Path(path).parent}`"
        )
    return f"cache '{path}': {', '.join(what)}; {fix}"


# ---- training ----------------------------------------------------------------------------------


def _teacher_config():
    from teacher.train_config import TeacherTrainConfig

    return TeacherTrainConfig


def _student_config():
    from student.train_config import StudentTrainConfig

    return StudentTrainConfig


@cli.command("train-teacher")
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


@cli.command("train-student")
@config_options(_student_config())
@json_option
def train_student_cmd(as_json, **fields):
    """Train the dual encoder: ITC plus a distillation term read from the teacher cache.

    `--loss cprd` (default) distils the teacher's partial ranking of each query's hard negatives;
    `kl`, `listmle`, `margin-mse` are the baselines; `none` is plain ITC and needs no cache. OUT
    becomes a model spec for `evaluate` and `mine-candidates`. Runs under torchrun (DDP).

    Example:

    \b
        cprd train-student --data data/demo --teacher-scores data/cache/KEY --loss cprd \\
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


# ---- the demo --------------------------------------------------------------------------------


@cli.command("demo")
@click.option(
    "--out",
    default=Path("data/demo-run"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the demo writes everything.",
)
@click.option("--quick", is_flag=True, help="Smaller profile (target: under 3 minutes on 2 cores).")
@click.option("--seed", default=0, show_default=True, help="Data, initialisation, batch order.")
@device_option
@json_option
def demo(out, quick, seed, device, as_json):
    """Run the whole pipeline on the embedded synthetic dataset, on CPU, and print one table.

    demo-data -> train-teacher -> student (ITC) -> mine-candidates -> score-teacher -> student
    (ITC, hard batches: the control) -> student (CPRD) -> evaluate on test. Stages whose output
    exists under OUT are reused, so a re-run only evaluates (and scores 0 teacher pairs).
    Writes OUT/report.json, OUT/report.md and OUT/report.png.

    Example:

    \b
        cprd demo --quick
    """
    from pipeline.demo import DemoConfig, run_demo
    from pipeline.report import summary_lines, table

    report = run_demo(
        DemoConfig(out=out, profile="quick" if quick else "full", seed=seed, device=device)
    )
    seconds = {r["name"]: r["seconds"] for r in report["rows"]}
    if as_json:
        click.echo(json.dumps({"command": "demo", "out": str(out), **report}, sort_keys=True))
        return
    click.echo(table(report["rows"], seconds))
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"report: {out / 'report.md'}, plot: {out / 'report.png'}")


def main() -> None:
    cli(prog_name="cprd")


if __name__ == "__main__":
    main()
