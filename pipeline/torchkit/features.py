"""A content-addressed disk cache of a frozen tower's features: compute once, reuse every epoch.

A frozen tower computes a fixed function, so its output for an image or a caption never changes.
``FeatureStore`` keeps those outputs on disk under a key made of the tower's identity (weights,
preprocessing, what is taken from it) and the input's content (an image's decoded pixels or file
bytes, a caption's text), so epochs, re-runs, other splits and other datasets that hold the same
inputs reuse them; a different tower or preprocessing gets a different folder.

Layout: ``ROOT/<tower key>/tower.json`` (the identity, readable) and ``part-*.npz`` files, each
written atomically after a batch of new items, so a killed run keeps what it finished and a run
in another process appends its own parts without touching anyone's. An item is an array whose
first dimension may vary (token features of captions of different lengths); the rest of its
shape and its dtype are fixed per store.

The root is ``--feature-cache`` where a command has it, else ``$CPRD_FEATURE_CACHE``, else
``~/.cache/cprd/features``. Deleting it only costs recomputation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core import atomic

log = logging.getLogger(__name__)

ENV_VAR = "CPRD_FEATURE_CACHE"
TOWER_JSON = "tower.json"


def default_root() -> Path:
    """``$CPRD_FEATURE_CACHE`` when set, else ``~/.cache/cprd/features``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cprd" / "features"


def image_key(image: Image.Image) -> str:
    """Key of a decoded image: sha256 of its mode, size and pixel bytes (not of the file)."""
    h = hashlib.sha256(f"{image.mode}\t{image.size}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def file_keys(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Key of each file: sha256 of its bytes (cheaper than decoding it)."""
    return [atomic.file_sha256(p) for p in paths]


def text_keys(texts: Sequence[str]) -> list[str]:
    """Key of each caption: sha256 of its UTF-8 text, verbatim."""
    return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]


class FeatureStore:
    """On-disk features of one tower, looked up by input key; see the module docstring.

    ``hits`` and ``misses`` count the items ``get`` found on disk and the ones it computed.
    """

    def __init__(self, identity: dict, root: str | os.PathLike | None = None):
        self.identity = identity
        self.dir = Path(root).expanduser() if root else default_root()
        self.dir = self.dir / atomic.json_sha256(identity)
        self.hits = 0
        self.misses = 0
        self._index: dict[str, tuple[Path, int]] = {}  # key -> (part file, row in it)
        self._parts: dict[Path, dict[str, np.ndarray]] = {}  # loaded part files
        self._scan()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def _scan(self) -> None:
        if not self.dir.is_dir():
            return
        for part in sorted(self.dir.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as z:
                    keys = z["keys"].tolist()
            except (OSError, ValueError, KeyError) as e:  # a foreign or damaged file: recompute
                log.warning("feature cache: ignoring unreadable %s (%s)", part, e)
                continue
            for row, key in enumerate(keys):
                self._index.setdefault(key, (part, row))

    def _load(self, part: Path) -> dict[str, np.ndarray]:
        if part not in self._parts:
            with np.load(part, allow_pickle=False) as z:
                self._parts[part] = {name: z[name] for name in ("offsets", "data")}
        return self._parts[part]

    def _item(self, key: str) -> np.ndarray:
        part, row = self._index[key]
        arrays = self._load(part)
        lo, hi = arrays["offsets"][row], arrays["offsets"][row + 1]
        return arrays["data"][lo:hi]

    def _write(self, keys: list[str], items: list[np.ndarray]) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True, exist_ok=True)
        tower = self.dir / TOWER_JSON
        if not tower.exists():
            atomic.write_json(tower, self.identity)
        lengths = np.array([len(x) for x in items], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        part = self.dir / f"part-{uuid.uuid4().hex}.npz"
        data = np.concatenate(items) if items else np.zeros((0,))
        with atomic.atomic_path(part) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.array(keys), offsets=offsets, data=data)
        self._parts[part] = {"offsets": offsets, "data": data}
        for row, key in enumerate(keys):
            self._index[key] = (part, row)

    def get(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], list[np.ndarray]],
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray]:
        """The features of each key, in order; missing ones come from ``compute``.

        ``compute(rows)`` gets indices into ``keys`` (at most ``batch_size``) and returns one array
        per index; each batch is on disk before the next starts. ``progress(n)`` is called with the
        number of items each computed batch added. Repeated keys are computed once.
        """
        todo: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self._index and key not in todo:
                todo[key] = i
        self.hits += len(keys) - sum(1 for k in keys if k in todo)
        rows = list(todo.values())
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            items = [np.ascontiguousarray(x) for x in compute(chunk)]
            if len(items) != len(chunk):
                raise ValueError(f"feature compute returned {len(items)} items for {len(chunk)}")
            self._write([keys[i] for i in chunk], items)
            self.misses += len(chunk)
            if progress is not None:
                progress(len(chunk))
        return [self._item(k) for k in keys]

    def stats(self) -> dict:
        """``{"dir", "hits", "misses"}`` for logs and reports."""
        return {"dir": str(self.dir), "hits": self.hits, "misses": self.misses}
