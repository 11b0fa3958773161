"""The serving commands of cprd's command line: encode, search, export.

They live apart from cli.py (which registers them on the ``cprd`` group) to keep that file a
list of pipeline stages. Same rules: a thin click shell, heavy imports inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli_common import (
    CONTEXT,
    _emit,
    ann_settings_options,
    device_option,
    json_option,
    precision_option,
)

# Every form of model spec student/models.py accepts (cli.py uses it too).
STUDENT_HELP = (
    "Model spec: `tiny` (a small randomly initialised open_clip CLIP, for tests and the demo); "
    "`effnet-minilm[:OPTION=VALUE,...]` (pretrained EfficientNet-Lite0 + MiniLM towers, options "
    "unfreeze-image, unfreeze-text, embed-dim, seed, text-layers, text-width); an open_clip name "
    "such as `ViT-B-32` (random init), `ViT-B-32:TAG` (an open_clip pretrained tag, e.g. "
    "laion2b_s34b_b79k) or `ViT-B-32:/path/ckpt.pt`; `hf-hub:ORG/REPO` or `local-dir:DIR` "
    "(open_clip's own forms, e.g. a `cprd export` dir); or a `cprd train-student` output dir."
)


def _student_option(required: bool):
    return click.option("--student", required=required, help=STUDENT_HELP)


@click.command("encode", context_settings=CONTEXT)
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Dataset dir.")
@click.option("--split", default="test", show_default=True, help="Split to encode and index.")
@_student_option(required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Gallery dir to write.")
@click.option(
    "--index",
    type=click.Choice(["flat", "ivf", "hnsw"]),
    default="flat",
    show_default=True,
    help="FAISS index over the images: exact flat, or approximate ivf/hnsw (see the README on "
    "when they pay).",
)
@ann_settings_options
@click.option("--batch-size", default=64, show_default=True, help="Encoding batch size.")
@click.option("--seed", default=0, show_default=True, help="Seed (random init of `tiny`).")
@device_option
@precision_option
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT if it exists (only once the new one is complete).",
)
@json_option
def encode_cmd(
    data,
    split,
    student,
    out,
    index,
    nlist,
    nprobe,
    hnsw_m,
    ef_construction,
    ef_search,
    batch_size,
    seed,
    device,
    precision,
    overwrite,
    as_json,
):
    """Encode a split's images and captions and save a FAISS index of the images, for serving.

    OUT holds embeddings/{image,image_ids,caption,caption_ids}.npy, images.parquet (image_id,
    path), index.faiss and gallery.json (dataset, split, model and its weights hash, checksums).
    `cprd search OUT "some text"` then returns the closest images.

    Example:

    \b
        cprd encode --data data/demo --split test --student runs/cprd --out data/gallery
    """
    from pipeline.stages.gallery import EncodeConfig, encode_gallery

    if batch_size < 1:
        raise click.BadParameter(f"must be >= 1, got {batch_size}", param_hint="'--batch-size'")
    cfg = EncodeConfig(
        data=data,
        student=student,
        out=out,
        split=split,
        index=index,
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        batch_size=batch_size,
        seed=seed,
        device=device,
        precision=precision,
        overwrite=overwrite,
    )
    m = encode_gallery(cfg)
    summary = {"command": "encode", "out": str(out), "split": split, "index": index, **m["counts"]}
    _emit(
        summary,
        as_json,
        f"encoded {m['counts']['images']} images and {m['counts']['captions']} captions of "
        f"split '{split}' into {out} ({index} index)",
    )


@click.command("search", context_settings=CONTEXT)
@click.argument("gallery", type=click.Path(path_type=Path))
@click.argument("query", nargs=-1, required=True)
@click.option("-k", "k", default=5, show_default=True, help="Images returned per query.")
@click.option(
    "--student",
    default=None,
    help="Model spec to encode the query [default: the one the gallery recorded]; its weights "
    "must equal the recorded ones.",
)
@device_option
@json_option
def search_cmd(gallery, query, k, student, device, as_json):
    """Print the top-k images of a gallery (from `cprd encode`) for each text QUERY.

    Each line: rank, cosine score, image id, image path.

    Example:

    \b
        cprd search data/gallery "a red circle left of a blue square" -k 5
    """
    from pipeline.stages.gallery import search_gallery

    results = search_gallery(gallery, list(query), k, student=student, device=device)
    if as_json:
        out = [{"query": q, "results": r} for q, r in zip(query, results, strict=True)]
        click.echo(json.dumps({"command": "search", "queries": out}, sort_keys=True))
        return
    for q, rows in zip(query, results, strict=True):
        click.echo(f"query: {q}")
        for r in rows:
            click.echo(f"{r['rank'] + 1:>4}  {r['score']:.4f}  {r['image_id']:>8}  {r['path']}")


@click.command("export", context_settings=CONTEXT)
@click.argument("student")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace OUT if it exists (only once the new one is complete).",
)
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset dir: evaluate on its --eval-split now and put the numbers in the model card.",
)
@click.option("--eval-split", default="test", show_default=True, help="Split for --eval-data.")
@click.option("--seed", default=0, show_default=True, help="Seed (random init of `tiny`).")
@json_option
def export_cmd(student, out, overwrite, eval_data, eval_split, seed, as_json):
    """Export a trained student as a directory open_clip loads, with a model card (README.md).

    OUT holds open_clip_config.json and open_clip_model.safetensors (open_clip's own hub layout;
    load with `open_clip.create_model_and_transforms('local-dir:OUT')` and
    `open_clip.get_tokenizer('local-dir:OUT')`), tokenizer files when the model needs them, and
    README.md: base model, dataset fingerprint, teacher, loss and settings, the best val metrics
    from the student's metrics.jsonl and, with --eval-data, metrics measured now.

    Example:

    \b
        cprd export runs/cprd --out exports/cprd
    """
    from pipeline.stages.export import export_student

    summary = export_student(
        student, out, overwrite=overwrite, eval_data=eval_data, eval_split=eval_split, seed=seed
    )
    _emit(
        {"command": "export", **summary},
        as_json,
        f"exported {student} to {out}; load it with "
        f"open_clip.create_model_and_transforms('local-dir:{out}')",
    )


COMMANDS = (encode_cmd, search_cmd, export_cmd)
