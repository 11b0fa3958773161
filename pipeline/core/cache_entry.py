"""``--teacher-scores PATH``: a cache entry, or the cache root ``score-teacher`` wrote it under.

``score-teacher --cache-dir ROOT`` puts its entry at ``ROOT/<key>``; readers accept either. Under
a root, the entry is the one made for the dataset being trained (its fingerprint), and, when a
teacher is named, for that teacher (its spec or weights sha256). No match or several matches are
errors that list the entries, so the user can pass one.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.cache import KEY_JSON, list_caches


def _describe(entry: dict) -> str:
    teacher = entry["teacher"]
    state = "complete" if entry["complete"] else "incomplete"
    return (
        f"{entry['cache_path']} (dataset {entry['dataset_fingerprint'][:12]}, teacher "
        f"{teacher.get('spec')}, {entry['precision']}, {state})"
    )


def resolve_entry(path: str | Path, fingerprint: str, teacher: str | None = None) -> Path:
    """The cache entry ``path`` names: itself when it holds key.json, else the one entry under
    the root ``path`` for dataset ``fingerprint`` (and ``teacher``: spec or weights sha256)."""
    path = Path(path)
    is_root = path.is_dir() and any((p / KEY_JSON).is_file() for p in path.iterdir())
    if not is_root:
        return path  # an entry, or something else that the cache reader names
    entries = list_caches(path)
    mine = [e for e in entries if e["dataset_fingerprint"] == fingerprint]
    if teacher is not None:
        mine = [
            e
            for e in mine
            if teacher in (e["teacher"].get("spec"), e["teacher"].get("weights_sha256"))
        ]
    if len(mine) == 1:
        return Path(mine[0]["cache_path"])
    listed = "; ".join(_describe(e) for e in (mine or entries))
    if not mine:
        raise ValueError(
            f"--teacher-scores '{path}' holds no entry for this dataset (fingerprint "
            f"{fingerprint[:12]}): {listed}; score its candidates with `cprd score-teacher`"
        )
    raise ValueError(
        f"--teacher-scores '{path}' holds {len(mine)} entries for this dataset: {listed}; pass "
        "the one to use as --teacher-scores ROOT/KEY"
    )
