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

``index.npz`` maps every key to its (part, row), so opening a store reads that one file and a
directory listing, and a part's data is read only when one of its rows is asked for. The index
is a cache of what the immutable parts hold: written atomically after the parts it names, so a
part a killed run or another process wrote later is simply not in it yet; opening reads the keys
of such parts (and forgets parts that were deleted), then rewrites it once. A writer rewrites it
when the items it has not indexed reach 1/``REINDEX_EVERY`` of the indexed ones (geometric, so
rewriting costs O(items) over a run however many small batches ``get`` is called with).

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
INDEX_FILE = "index.npz"
REINDEX_EVERY = 8  # rewrite the index once unindexed items reach 1/8 of the indexed ones


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
        self._names: list[str] = []  # part file names; a part's id is its place here
        self._keys = np.zeros(0, dtype="S1")  # (E,) sorted utf-8 keys of the index file
        self._where = np.zeros((0, 2), dtype=np.int64)  # (E, 2) (part id, row) of each key
        self._extra: dict[str, tuple[int, int]] = {}  # key -> (part id, row), not yet indexed
        self._parts: dict[int, dict[str, np.ndarray]] = {}  # loaded part files
        self._open()

    def __len__(self) -> int:
        return len(self._keys) + len(self._extra)

    def __contains__(self, key: str) -> bool:
        return self._find([key])[0] is not None

    def _open(self) -> None:
        """Read the index, then reconcile it with the part files listed on disk."""
        if not self.dir.is_dir():
            return
        on_disk = {p.name for p in self.dir.glob("part-*.npz")}
        indexed = self._read_index()
        if not indexed and on_disk:
            log.info(
                "feature cache: no %s in %s; indexing its %d parts once",
                INDEX_FILE,
                self.dir,
                len(on_disk),
            )
        gone = set(self._names) - on_disk
        if gone:
            log.warning(
                "feature cache: %d indexed parts are gone from %s; their items will be recomputed",
                len(gone),
                self.dir,
            )
            self._forget(gone)
        new = sorted(on_disk - set(self._names))
        if new and indexed:
            log.info("feature cache: indexing %d parts written after %s", len(new), INDEX_FILE)
        for name in new:
            self._scan(name)
        if gone or new:
            try:
                self._write_index()
            except OSError as e:  # a read-only cache still serves what it holds
                log.warning(
                    "feature cache: cannot write %s in %s (%s); later opens read the unindexed "
                    "parts again",
                    INDEX_FILE,
                    self.dir,
                    e,
                )

    def _read_index(self) -> bool:
        """Load ``index.npz`` into the lookup arrays; False when it is absent or unreadable."""
        path = self.dir / INDEX_FILE
        if not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as z:
                names, keys = z["parts"].tolist(), z["keys"]
                where = np.stack([z["part"], z["row"]], axis=1).astype(np.int64)  # (E, 2)
        except (OSError, ValueError, KeyError) as e:  # damaged: rebuild it from the parts
            log.warning("feature cache: ignoring unreadable %s (%s); re-indexing", path, e)
            return False
        self._names, self._keys, self._where = names, keys, where
        return True

    def _forget(self, gone: set[str]) -> None:
        """Drop the index rows of parts no longer on disk and renumber the rest."""
        keep = [j for j, name in enumerate(self._names) if name not in gone]
        new_id = np.full(len(self._names), -1, dtype=np.int64)
        new_id[keep] = np.arange(len(keep))
        rows = new_id[self._where[:, 0]] >= 0  # (E,)
        self._keys, self._where = self._keys[rows], self._where[rows]
        self._where[:, 0] = new_id[self._where[:, 0]]
        self._names = [self._names[j] for j in keep]

    def _scan(self, name: str) -> None:
        """Add the keys of one part that is not in the index (the first holder of a key wins).

        An unreadable part is indexed without keys, so it is reported once, not at every open.
        """
        part = self.dir / name
        self._names.append(name)
        pid = len(self._names) - 1
        try:
            with np.load(part, allow_pickle=False) as z:
                keys = z["keys"].tolist()
        except (OSError, ValueError, KeyError) as e:  # a foreign or damaged file: recompute
            log.warning("feature cache: ignoring unreadable %s (%s)", part, e)
            return
        for row, (key, found) in enumerate(zip(keys, self._find(keys), strict=True)):
            if found is None:
                self._extra.setdefault(key, (pid, row))

    def _write_index(self) -> None:
        """Fold the unindexed keys into the sorted arrays and write ``index.npz`` atomically."""
        extra = np.array([k.encode() for k in self._extra], dtype=bytes)  # (X,)
        where = np.array(list(self._extra.values()), dtype=np.int64).reshape(-1, 2)  # (X, 2)
        keys = np.concatenate([self._keys, extra])  # (E + X,)
        order = np.argsort(keys, kind="stable")
        self._keys, self._where = keys[order], np.concatenate([self._where, where])[order]
        self._extra = {}
        with atomic.atomic_path(self.dir / INDEX_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    keys=self._keys,
                    part=self._where[:, 0].astype(np.int32),
                    row=self._where[:, 1].astype(np.int32),
                    parts=np.array(self._names, dtype=str),
                )

    def _find(self, keys: Sequence[str]) -> list[tuple[int, int] | None]:
        """(part id, row) of each key, or None where the store does not hold it."""
        found: list[tuple[int, int] | None] = [self._extra.get(k) for k in keys]
        if len(self._keys) and len(keys):
            q = np.array([k.encode() for k in keys], dtype=bytes)  # (Q,)
            at = np.searchsorted(self._keys, q).clip(max=len(self._keys) - 1)  # (Q,)
            hit = self._keys[at] == q  # (Q,)
            for j in np.flatnonzero(hit).tolist():
                part, row = self._where[at[j]].tolist()
                found[j] = (part, row)
        return found

    def _load(self, part: int) -> dict[str, np.ndarray]:
        if part not in self._parts:
            with np.load(self.dir / self._names[part], allow_pickle=False) as z:
                self._parts[part] = {name: z[name] for name in ("offsets", "data")}
        return self._parts[part]

    def _item(self, where: tuple[int, int]) -> np.ndarray:
        part, row = where
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
        pid = len(self._names)
        self._names.append(part.name)
        self._parts[pid] = {"offsets": offsets, "data": data}
        for row, key in enumerate(keys):
            self._extra[key] = (pid, row)

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
        found = self._find(keys)
        todo: dict[str, int] = {}
        for i, (key, where) in enumerate(zip(keys, found, strict=True)):
            if where is None and key not in todo:
                todo[key] = i
        self.hits += sum(1 for where in found if where is not None)
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
        if rows and len(self._extra) * REINDEX_EVERY >= len(self._keys):
            self._write_index()  # after the parts it names: a kill before it loses no part
        if rows:
            found = self._find(keys)
        return [self._item(where) for where in found]

    def stats(self) -> dict:
        """``{"dir", "hits", "misses"}`` for logs and reports."""
        return {"dir": str(self.dir), "hits": self.hits, "misses": self.misses}
