"""The dataset commands of cprd's command line: import-data, data-info, demo-data."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli_common import CONTEXT, _emit, json_option, overwrite_option


@click.command("import-data", context_settings=CONTEXT)
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
@click.option(
    "--val-fraction",
    default=0.0,
    show_default=True,
    help="Tables without a split column: this fraction of the images (seeded) becomes val.",
)
@click.option(
    "--test-fraction",
    default=0.0,
    show_default=True,
    help="Tables without a split column: this fraction of the images (seeded) becomes test.",
)
@click.option("--split-seed", default=0, show_default=True, help="Seed of --val/test-fraction.")
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
    val_fraction,
    test_fraction,
    split_seed,
    skip_bad_images,
    overwrite,
    as_json,
):
    """Import an image-caption collection into cprd's dataset layout.

    Example:

    \b
        cprd import-data --karpathy dataset_flickr30k.json --images flickr30k-images \\
            --out data/flickr30k
        cprd import-data --csv pairs.csv --image-col path --caption-col text --out data/mine \\
            --val-fraction 0.05 --test-fraction 0.05
    """
    from pipeline.stages import importers

    sources = {"karpathy": karpathy, "csv": csv_file, "jsonl": jsonl, "parquet": parquet}
    given = {k: v for k, v in sources.items() if v is not None}
    if len(given) != 1:
        raise click.UsageError("give exactly one input: --karpathy, --csv, --jsonl or --parquet")
    common = {"skip_bad_images": skip_bad_images, "overwrite": overwrite}
    if karpathy is not None and (val_fraction or test_fraction):
        raise click.UsageError("--val-fraction/--test-fraction are for tables; Karpathy has splits")
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
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            **common,
        )
    summary = {"command": "import-data", "out": str(out), **_dataset_summary(meta)}
    _emit(
        summary,
        as_json,
        f"imported {meta['num_images']} images, {meta['num_captions']} "
        f"captions into {out} (fingerprint {meta['fingerprint'][:12]})",
    )


@click.command("data-info", context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(path_type=Path))
@json_option
def data_info(dataset, as_json):
    """Show a dataset's counts per split, captions per image and fingerprint.

    Example:

    \b
        cprd data-info data/demo
    """
    from pipeline.core.dataset import Dataset

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
    if info.get("relation"):
        fits = info["relation"]["images_per_caption"]
        click.echo(
            f"full relation: {info['relation']['pairs']} true pairs; images per caption: mean "
            f"{fits['mean']}, max {fits['max']}, {fits['fraction_above_one']:.0%} fit more than one"
        )


@click.command("demo-data", context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Dataset dir to write.")
@click.option("--train-images", default=2000, show_default=True, help="Images in train.")
@click.option("--val-images", default=200, show_default=True, help="Images in val.")
@click.option("--test-images", default=200, show_default=True, help="Images in test.")
@click.option("--captions-per-image", default=5, show_default=True, help="Captions per image.")
@click.option("--image-size", default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option(
    "--generator-version",
    type=click.IntRange(2, 3),
    default=3,
    show_default=True,
    help="3: some captions fit several images, and the full caption-image relation is written "
    "beside the dataset; 2: the older data, every caption true of one image (reproducible).",
)
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
    generator_version,
    overwrite,
    as_json,
):
    """Generate the embedded compositional benchmark (coloured shapes in spatial relations).

    Images come in contrast groups of 4 whose captions share one bag of words ("a red circle left
    of a blue square" vs "a blue circle left of a red square"), so only a model that binds
    attributes to objects can tell them apart. Version 3 adds captions that fit more images than
    their own ("a circle to the left of a square") and repeated scenes, and writes every true
    caption-image pair to OUT/relation.parquet (`evaluate` then also reports `rsum_full`).

    Example:

    \b
        cprd demo-data --out data/demo --train-images 2000 --seed 0
    """
    from pipeline.stages.demo_data import generate_demo_data

    meta = generate_demo_data(
        out,
        train_images=train_images,
        val_images=val_images,
        test_images=test_images,
        captions_per_image=captions_per_image,
        image_size=image_size,
        seed=seed,
        overwrite=overwrite,
        version=generator_version,
    )
    summary = {"command": "demo-data", "out": str(out), **_dataset_summary(meta)}
    rel = meta.get("relation")
    summary["relation"] = rel
    fits = (
        f"; relation: {rel['pairs']} true pairs, {rel['images_per_caption']['mean']} images per "
        f"caption on average"
        if rel
        else ""
    )
    _emit(
        summary,
        as_json,
        f"wrote {meta['num_images']} images, {meta['num_captions']} captions "
        f"to {out} (fingerprint {meta['fingerprint'][:12]}){fits}",
    )


def _dataset_summary(meta: dict) -> dict:
    keys = ("fingerprint", "num_images", "num_captions", "counts")
    return {k: meta[k] for k in keys}


COMMANDS = (import_data, data_info, demo_data)
