"""What the cli*.py modules share: the option decorators every command uses, the end-of-command
summary, the >= 1 check, and the options generated from a config dataclass."""

from __future__ import annotations

import json
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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

device_option = click.option(
    "--device", default=None, help="torch device [default: cuda if present]."
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["fp32", "amp_bf16", "amp", "bf16", "fp16"]),
    default=None,
    help="fp32; amp_bf16 / amp: fp32 weights under bf16 / fp16 autocast; bf16 / fp16: the "
    "weights cast [default: amp_bf16 on CUDA, fp32 elsewhere]. Recorded in the outputs.",
)

# Approximate-index settings, shared by mine-candidates (all) and encode (all but the target).
ann_options = [
    click.option(
        "--nlist",
        type=int,
        default=None,
        help="IVF: inverted lists [default: about sqrt(gallery size)].",
    ),
    click.option(
        "--nprobe",
        type=int,
        default=None,
        help="IVF: lists searched per query [default: 32; --target-recall starts its tuning "
        "here, else at 1].",
    ),
    click.option("--hnsw-m", type=int, default=None, help="HNSW: links per node [default: 32]."),
    click.option(
        "--ef-construction",
        type=int,
        default=None,
        help="HNSW: candidate list size while building [default: 80].",
    ),
    click.option(
        "--ef-search",
        type=int,
        default=None,
        help="HNSW: candidate list size per query [default: 128; --target-recall starts its "
        "tuning here, else at k].",
    ),
]


def ann_settings_options(fn):
    """Decorate a command with the ann_options, in order."""
    for option in reversed(ann_options):
        fn = option(fn)
    return fn


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise click.BadParameter(f"must be >= 1, got {value}", param_hint=f"'{flag}'")


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
