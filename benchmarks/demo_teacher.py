"""The demo teacher on the demo's test split: binding inside contrast groups, and its ceiling.

Reads a finished ``cprd demo`` run (``--run``): the teacher's score of every test pair
(``teacher-full/scores.npy``, written by the demo) and the report's rows. Reports

- within-group R@1: an image against the captions of its contrast group (4 images, 20 captions),
  a caption against the group's 4 images; on the labels (only a caption's own image counts) and
  on the full relation (any image the caption is true of counts: an under-specified caption fits
  2 of its group). Chance on the labels is about 25% (t2i) and 5 / 20 per positive (i2t); a
  bag-of-words model cannot beat it on the full captions;
- the rows ``teacher-full`` (the teacher ranks every test pair) and ``teacher-rerank`` (the ITC
  student's top-k re-ranked) with RSUM on both label sets.

    python benchmarks/demo_teacher.py --run data/demo-run --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402


def _hit(scores: np.ndarray, positive: np.ndarray) -> bool:
    """The best positive strictly above every negative (ties count against the query)."""
    negatives = scores[~positive]
    return bool(scores[positive].max() > (negatives.max() if negatives.size else -np.inf))


def group_recall(scores: np.ndarray, owner: np.ndarray, match: np.ndarray, group: int) -> dict:
    """Within-group R@1 (percent) on the labels and on the full relation.

    ``scores`` (N, M) every image against every caption, ``owner`` (M,) each caption's image row,
    ``match`` (N, M) bool the full relation; image rows ``g*group .. g*group+group-1`` form a
    contrast group.
    """
    out = {}
    n = scores.shape[0]
    for name, truth in (("labels", None), ("full", match)):
        i2t, t2i = [], []
        for start in range(0, n, group):
            imgs = np.arange(start, min(start + group, n))
            caps = np.flatnonzero(np.isin(owner, imgs))
            for i in imgs:
                pos = owner[caps] == i if truth is None else truth[i, caps]
                i2t.append(_hit(scores[i, caps], pos))
            for c in caps:
                pos = imgs == owner[c] if truth is None else truth[imgs, c]
                t2i.append(_hit(scores[imgs, c], pos))
        out[f"{name}_i2t_R@1"] = round(100.0 * float(np.mean(i2t)), 2)
        out[f"{name}_t2i_R@1"] = round(100.0 * float(np.mean(t2i)), 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("data/demo-run"), help="a `cprd demo` dir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from pipeline.core.dataset import Dataset
    from pipeline.stages.demo_data import GROUP_SIZE

    ds = Dataset.load(args.run / "data")
    images, captions = ds.split("test")
    scores = np.load(args.run / "teacher-full" / "scores.npy")  # (N, M)
    row_of = {i: r for r, i in enumerate(images["image_id"].to_list())}
    owner = np.array([row_of[i] for i in captions["image_id"]], dtype=np.int64)
    match = np.zeros(scores.shape, dtype=bool)
    match[ds.relation_rows(images, captions)] = True
    report = json.loads((args.run / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    result = {
        "group_recall": group_recall(scores, owner, match, GROUP_SIZE),
        "rows": {
            name: {"rsum": rows[name]["rsum"], "rsum_full": rows[name].get("rsum_full")}
            for name in rows
        },
        "mined_false_negatives": report.get("mined_false_negatives"),
        "profile": report["profile"],
    }
    body = _markdown(result)
    print(body)
    path = write_result("demo_teacher", "The demo teacher on the demo's test split", body, result)
    print(f"written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


def _markdown(result: dict) -> str:
    g = result["group_recall"]
    lines = [
        f"`cprd demo` ({result['profile']} profile), test split. Within-group ITM R@1 of the "
        "teacher (an image among its group's captions; a caption among its group's 4 images):",
        "",
        "| label set | image->text R@1 | text->image R@1 |",
        "|---|---|---|",
        f"| labels (own image only) | {g['labels_i2t_R@1']} | {g['labels_t2i_R@1']} |",
        f"| full relation (any true match) | {g['full_i2t_R@1']} | {g['full_t2i_R@1']} |",
        "",
        "| row | RSUM (labels) | RSUM (full relation) |",
        "|---|---|---|",
    ]
    for name, r in result["rows"].items():
        full = r["rsum_full"]
        lines.append(f"| {name} | {r['rsum']:.1f} | {'' if full is None else f'{full:.1f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
