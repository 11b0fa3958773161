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

import cli_cache
import cli_data
import cli_stages
import cli_train
from cli_common import CONTEXT, device_option, json_option
from cli_serve import COMMANDS as SERVE_COMMANDS

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


@click.group(cls=CprdGroup, context_settings=CONTEXT)
@click.version_option(package_name="cprd", prog_name="cprd")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """cprd: distil a cross-encoder into a fast dual encoder, scoring the teacher only once.

    Stages: mine-candidates -> score-teacher -> train-student, around one on-disk contract.
    """
    _setup_logging()


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
    from pipeline.stages.demo import DemoConfig, run_demo
    from pipeline.stages.report import summary_lines, table

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


# The other commands live in one module per group (docs/architecture.md).
COMMANDS = (
    *cli_data.COMMANDS,
    *cli_stages.COMMANDS,
    cli_cache.cache_group,
    *cli_train.COMMANDS,
    *SERVE_COMMANDS,
)
for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="cprd")


if __name__ == "__main__":
    main()
