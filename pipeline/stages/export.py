"""``cprd export``: a student as a directory open_clip loads by itself, plus a model card.

Layout (open_clip's hub layout, what ``open_clip.push_to_hf_hub`` uploads)::

    open_clip_config.json         {"model_cfg": open_clip model config, "preprocess_cfg": {...}}
    open_clip_model.safetensors   the state dict
    config.json, tokenizer*.json, special_tokens_map.json, vocab.txt
                                  only for towers with a Hugging Face tokenizer (effnet-minilm)
    README.md                     model card: base model, data, teacher, loss and settings, metrics
    export.json                   what was exported (spec, weights sha256, files); written last

``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer(
"local-dir:DIR")`` load it (open_clip >= 2.31 reads ``local-dir:``). A model with a Hugging Face
text tower (``effnet-minilm``) keeps that tower's BERT config in DIR and names DIR by absolute
path in ``text_cfg.hf_model_name``, which is where open_clip's text tower reads its config from.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.core import atomic
from student.models import load_model
from student.pretrained import CFG_KEY
from student.storage import STUDENT_JSON

EXPORT_JSON = "export.json"
CONFIG_FILE = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_FILE = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
# A Hugging Face text tower's architecture and tokenizer (pipeline/torchkit/towers.py TEXT_FILES).
HF_TEXT_FILES = (
    "config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


def open_clip_config(model_cfg: dict[str, Any], out: Path) -> tuple[dict[str, Any], Path | None]:
    """(the model config open_clip builds the same modules from, the folder of the HF text files
    to copy into ``out`` or None).

    cprd's own keys are dropped; a Hugging Face tokenizer or text tower is pointed at ``out``.
    """
    cfg = copy.deepcopy(model_cfg)
    pretrained = cfg.pop(CFG_KEY, None)
    text = cfg["text_cfg"]
    source = None
    if text.get("hf_tokenizer_name"):
        source = Path(text["hf_tokenizer_name"])
        text["hf_tokenizer_name"] = str(out.resolve())
        if "hf_model_name" in text:
            text["hf_model_name"] = str(out.resolve())
            text["hf_model_pretrained"] = False
    if pretrained is not None:
        # cprd builds these as open_clip's CustomTextCLIP; say so, or open_clip picks CLIP for
        # a text tower of its own (text-layers=N) and the state dict would not fit.
        cfg["custom_text"] = True
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    return cfg, source


def export_student(
    spec: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    eval_data: Path | None = None,
    eval_split: str = "test",
    seed: int = 0,
) -> dict:
    """Write the export dir of model ``spec`` (usually a train-student dir); return a summary.

    ``eval_data``: a dataset whose ``eval_split`` is evaluated now, for the card's test row.
    """
    from safetensors.torch import save_file

    out = Path(out)
    atomic.check_out(out, overwrite, EXPORT_JSON)
    torch.manual_seed(seed)  # `tiny`'s random init
    loaded = load_model(spec)
    model_cfg, text_source = open_clip_config(loaded.model_cfg, out)
    preprocess_cfg = dict(loaded.model.visual.preprocess_cfg)
    card = model_card(spec, loaded, model_cfg, preprocess_cfg)
    metrics = None
    if eval_data is not None:
        from pipeline.stages.evaluate import EvalConfig, evaluate

        result = evaluate(EvalConfig(data=eval_data, student=spec, split=eval_split, seed=seed))
        metrics = {"split": eval_split, "dataset": str(eval_data), **result["metrics"]}
        card += _metrics_section(f"{eval_split} split of `{eval_data}` (`cprd evaluate`)", metrics)
    with atomic.atomic_dir(out, overwrite=overwrite, expect=EXPORT_JSON) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if text_source is not None:
            for name in HF_TEXT_FILES:
                if (text_source / name).is_file():
                    shutil.copyfile(text_source / name, tmp / name)
        (tmp / "README.md").write_text(card)
        files = {p.name: atomic.file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        summary = {
            "out": str(out),
            "spec": spec,
            "identity": loaded.identity,
            "open_clip_config": model_cfg,
            "files": files,
            "eval": metrics,
        }
        atomic.write_json(tmp / EXPORT_JSON, summary)
    return summary


def _student_files(spec: str) -> tuple[dict, list[dict]]:
    """(student.json's train config or {}, metrics.jsonl records or []) of a student dir."""
    d = Path(spec)
    if not (d / STUDENT_JSON).is_file():
        return {}, []
    train_cfg = json.loads((d / STUDENT_JSON).read_text()).get("train_cfg") or {}
    lines = (
        (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").is_file() else []
    )
    return train_cfg, [json.loads(line) for line in lines if line.strip()]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_card(spec: str, loaded, model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any]) -> str:
    """The README.md of an export: what the model is, what it was trained on and how, how well."""
    train_cfg, records = _student_files(spec)
    params = sum(p.numel() for p in loaded.model.parameters())
    base = train_cfg.get("student") or loaded.identity.get("base_spec") or spec
    lines = [
        f"# cprd student: {Path(spec).name or spec}",
        "",
        "A dual encoder (open_clip) exported by `cprd export`. Load it with open_clip alone:",
        "",
        "```python",
        "import open_clip",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:THIS_DIR")',
        'tokenizer = open_clip.get_tokenizer("local-dir:THIS_DIR")',
        "```",
        "",
        "## Model",
        "",
        f"- base model: `{base}`",
        f"- weights sha256: `{loaded.identity.get('weights_sha256')}`",
        f"- parameters: {params / 1e6:.2f} M, embedding width {model_cfg['embed_dim']}",
        f"- image size {preprocess_cfg.get('size')}, mean {preprocess_cfg.get('mean')}, "
        f"std {preprocess_cfg.get('std')}",
        f"- context length {model_cfg['text_cfg'].get('context_length')}",
    ]
    if model_cfg["text_cfg"].get("hf_model_name"):
        lines.append(
            "- the text tower's config is read from `text_cfg.hf_model_name` in "
            "`open_clip_config.json`, an absolute path to this directory at export time: after "
            "moving the directory, set it to the new path (or export again)"
        )
    if train_cfg:
        data = Path(str(train_cfg.get("data")))
        ds = _read_json(data / "dataset.json")
        lines += ["", "## Training data", ""]
        lines.append(f"- dataset: `{data}`, fingerprint `{ds.get('fingerprint', 'unknown')}`")
        if ds.get("counts"):
            counts = ", ".join(f"{k} {v['images']} images" for k, v in ds["counts"].items())
            lines.append(f"- splits: {counts}")
        lines += ["", "## Teacher", ""]
        scores = train_cfg.get("teacher_scores")
        key = _read_json(Path(str(scores)) / "key.json") if scores else {}
        if key:
            teacher = key.get("teacher", {})
            lines.append(f"- teacher: `{teacher.get('spec')}`")
            lines.append(f"- teacher weights sha256: `{key.get('teacher_weights_sha256')}`")
            lines.append(f"- scoring precision: {key.get('precision')}")
            lines.append(f"- teacher cache: `{scores}` (key `{key.get('key')}`)")
        elif scores:
            lines.append(f"- teacher cache: `{scores}` (not readable at export time)")
        else:
            lines.append("- none: trained with the contrastive loss alone")
        lines += [
            "",
            "## Loss and settings",
            "",
            f"- loss: ITC + {train_cfg.get('lam')} x `{train_cfg.get('loss')}`",
            "",
            "| setting | value |",
            "| --- | --- |",
        ]
        lines += [f"| {k} | {v} |" for k, v in sorted(train_cfg.items())]
    vals = [r for r in records if r.get("event") == "val"]
    if vals:
        best = max(vals, key=lambda r: r["val"]["rsum"])
        lines.append("")
        lines.append(
            _metrics_section(f"val split, best epoch {best['epoch']} (metrics.jsonl)", best["val"])
        )
    return "\n".join(lines) + "\n"


def _metrics_section(title: str, m: dict) -> str:
    from pipeline.core.metrics import METRIC_KEYS

    keys = [k for k in METRIC_KEYS if k in m]
    head = "| " + " | ".join(keys) + " |"
    rule = "|" + " --- |" * len(keys)
    row = "| " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |"
    return f"\n## Retrieval: {title}\n\n{head}\n{rule}\n{row}\n"
