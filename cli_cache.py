"""The ``cprd cache`` commands: list, info, verify (and --repair) of teacher caches."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli_common import CONTEXT, _positive, device_option, json_option


@click.group("cache", context_settings=CONTEXT)
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
    from pipeline.core.cache import list_caches

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
    from pipeline.core.cache import cache_info

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
    from pipeline.core.cache_verify import verify

    if not repair and teacher is not None:
        raise click.UsageError("--teacher only goes with --repair")
    if candidates is None and data is not None:
        raise click.UsageError("--data only goes with --candidates")
    _positive(batch_size=batch_size)
    result = {"command": "cache verify"}
    if repair:
        from pipeline.stages.score import repair_cache

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
