"""The feature store's index: open reads one file, parts are read when their rows are asked for."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.torchkit import features
from pipeline.torchkit.features import INDEX_FILE, FeatureStore

IDENT = {"tower": "index-test"}


def item(r: int) -> np.ndarray:
    """A distinct item per row, of varying length, as a tower's features."""
    return np.full((1 + r % 3, 4), r, dtype=np.float16) + np.arange(4, dtype=np.float16)


def compute(calls: list | None = None, offset: int = 0):
    def run(rows: list[int]) -> list[np.ndarray]:
        if calls is not None:
            calls.extend(rows)
        return [item(offset + r) for r in rows]

    return run


def filled(root, n: int = 40) -> list[str]:
    """A store of ``n`` items, one part each; returns the keys."""
    keys = [f"key-{i:03d}" for i in range(n)]
    FeatureStore(IDENT, root).get(keys, compute(), batch_size=1)
    return keys


@pytest.fixture
def opened(monkeypatch):
    """The files np.load opens, in order."""
    names: list[str] = []
    load = np.load

    def counting(path, *args, **kwargs):
        names.append(getattr(path, "name", str(path)))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(features.np, "load", counting)
    return names


def test_open_reads_the_index_only_and_parts_on_demand(tmp_path, opened):
    """A store of 40 parts opens from index.npz alone; reading two rows opens their two parts."""
    keys = filled(tmp_path)
    opened.clear()
    store = FeatureStore(IDENT, tmp_path)
    assert opened == [INDEX_FILE] and len(store) == 40 and keys[7] in store
    got = store.get([keys[7], keys[30], keys[7]], compute([]))
    assert len(opened) == 3 and opened[1].startswith("part-") and opened[1] != opened[2]
    for g, r in zip(got, [7, 30, 7], strict=True):
        np.testing.assert_array_equal(g, item(r))
    assert (store.hits, store.misses) == (3, 0)


def test_all_rows_round_trip(tmp_path):
    """Every row read back from a reopened store equals what was written, in any order."""
    keys = filled(tmp_path, 25)
    store = FeatureStore(IDENT, tmp_path)
    order = list(reversed(range(25))) + [3, 3]
    calls: list = []
    got = store.get([keys[r] for r in order], compute(calls))
    assert calls == []
    for g, r in zip(got, order, strict=True):
        np.testing.assert_array_equal(g, item(r))


def test_store_without_index_is_indexed_once(tmp_path, opened, caplog):
    """An old store (parts, no index) is read part by part once, with a log line, then indexed."""
    keys = filled(tmp_path, 12)
    store_dir = FeatureStore(IDENT, tmp_path).dir
    (store_dir / INDEX_FILE).unlink()
    opened.clear()
    with caplog.at_level(logging.INFO, logger=features.__name__):
        store = FeatureStore(IDENT, tmp_path)
    assert len(opened) == 12 and "indexing its 12 parts once" in caplog.text
    assert (store_dir / INDEX_FILE).exists() and len(store) == 12
    opened.clear()
    again = FeatureStore(IDENT, tmp_path)
    assert opened == [INDEX_FILE] and again.get(keys[:2], compute([])) is not None


def test_kill_between_parts_and_index_loses_nothing(tmp_path, monkeypatch, caplog):
    """Parts written after the index (a run killed before its index write) are found at open."""
    keys = filled(tmp_path, 10)

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "_write_index", killed)
    more = [f"more-{i}" for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        FeatureStore(IDENT, tmp_path).get(more, compute(offset=100), batch_size=2)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger=features.__name__):
        store = FeatureStore(IDENT, tmp_path)
    assert "indexing 3 parts written after" in caplog.text
    calls: list = []
    got = store.get(keys + more, compute(calls))
    assert calls == [] and len(store) == 15
    for g, r in zip(got, list(range(10)) + [100 + i for i in range(5)], strict=True):
        np.testing.assert_array_equal(g, item(r))


def test_failed_index_write_leaves_the_old_index(tmp_path, monkeypatch):
    """An index write that dies midway leaves the previous index, byte for byte, and no temp."""
    filled(tmp_path, 3)
    store = FeatureStore(IDENT, tmp_path)
    before = (store.dir / INDEX_FILE).read_bytes()

    def dies(f, **arrays):
        f.write(b"half")
        raise OSError("disk full")

    store._extra["x"] = (0, 0)
    monkeypatch.setattr(features.np, "savez", dies)
    with pytest.raises(OSError, match="disk full"):
        store._write_index()
    assert (store.dir / INDEX_FILE).read_bytes() == before
    assert sorted(p.name for p in store.dir.iterdir() if p.name.startswith(".")) == []


def test_deleted_part_is_recomputed_not_fatal(tmp_path, caplog):
    """A part deleted behind the store's back: its items are computed again, the rest are hits."""
    keys = filled(tmp_path, 6)
    store = FeatureStore(IDENT, tmp_path)
    doomed = store._names[store._find([keys[4]])[0][0]]
    (store.dir / doomed).unlink()
    with caplog.at_level(logging.WARNING, logger=features.__name__):
        again = FeatureStore(IDENT, tmp_path)
    assert "1 indexed parts are gone" in caplog.text and len(again) == 5
    calls: list = []
    got = again.get(keys, compute(calls))
    assert calls == [4]
    for r, g in enumerate(got):
        np.testing.assert_array_equal(g, item(r))
    assert len(FeatureStore(IDENT, tmp_path)) == 6


def test_index_rewrites_are_geometric(tmp_path, monkeypatch):
    """200 one-item get calls rewrite the index O(log n) times, and it stays complete."""
    writes = []
    write = FeatureStore._write_index

    def counted(self):
        writes.append(len(self))
        write(self)

    monkeypatch.setattr(FeatureStore, "_write_index", counted)
    store = FeatureStore(IDENT, tmp_path)
    for i in range(200):
        store.get([f"k{i}"], compute(offset=i))
    assert len(writes) <= 40, len(writes)  # 1.125x growth between writes: 32, not 200
    monkeypatch.undo()
    reopened = FeatureStore(IDENT, tmp_path)
    assert len(reopened) == 200
    np.testing.assert_array_equal(reopened.get(["k150"], compute([]))[0], item(150))


def test_unwritable_index_still_opens(tmp_path, monkeypatch, caplog):
    """A cache whose index cannot be written (read-only) still serves its items, with a warning."""
    keys = filled(tmp_path, 4)
    (FeatureStore(IDENT, tmp_path).dir / INDEX_FILE).unlink()

    def refused(path):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(features.atomic, "atomic_path", refused)
    with caplog.at_level(logging.WARNING, logger=features.__name__):
        store = FeatureStore(IDENT, tmp_path)
    assert "cannot write index.npz" in caplog.text
    calls: list = []
    np.testing.assert_array_equal(store.get(keys[2:3], compute(calls))[0], item(2))
    assert calls == []
