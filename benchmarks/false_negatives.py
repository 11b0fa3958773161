"""How many mined hard negatives are true matches: measured on the demo, estimated on Flickr8k.

A mined negative is a candidate the miner ranked high that the labels call a non-match. On the
demo (generator version 3) the full caption-image relation says which of them truly match, so
the rate is measured exactly. Real captions have no such relation; two estimators, both checked
against the demo's truth:

- **teacher**: the negative's teacher match probability (from the teacher cache) is >= 0.5;
- **caption overlap**: the query caption (text->image), or the candidate caption (image->text),
  is at least as close in TF-IDF cosine to one of the *other* image's own captions as two
  captions of one image typically are (the median same-image cosine of the split: a
  data-calibrated threshold, no free parameter). Its rate on labelled positives (leave one
  caption out) and on random pairs is reported beside it, to read it against.

Flickr8k: runs (or reuses, same layout as benchmarks/real_flickr.py under ``--flickr-out``) the
import, the pretrained dual encoder (the miner) and mining with the full profile's k; with
``--teacher`` also the effnet-minilm teacher and its cache.

    python benchmarks/false_negatives.py --demo-run data/demo-run --flickr --teacher --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result  # noqa: E402


def overlap_scores(
    texts: list[str], caption_image: np.ndarray, pairs: pl.DataFrame, chunk: int = 512
) -> np.ndarray:
    """(P,) for (image row, caption row) ``pairs``: the caption's highest TF-IDF cosine with the
    image's own captions, leaving the caption itself out. ``caption_image`` (M,) owns each row."""
    import torch

    from teacher.batches import tfidf_rows

    x = tfidf_rows([[t] for t in texts])  # (M, V) sparse
    per_image = pl.DataFrame({"image": caption_image, "row": np.arange(len(texts))})
    caps = per_image.group_by("image").agg("row").sort("image")
    width = int(caps["row"].list.len().max())
    caps_of = np.full((int(caption_image.max()) + 1, width), -1, dtype=np.int64)
    for image, rows in caps.iter_rows():
        caps_of[image, : len(rows)] = rows
    pairs = pairs.with_row_index("p").sort("caption")
    out = np.full(pairs.height, -np.inf, dtype=np.float32)
    for s in range(0, pairs.height, chunk * 8):
        part = pairs.slice(s, chunk * 8)
        qs = np.unique(part["caption"].to_numpy())
        rows_of = {q: r for r, q in enumerate(qs)}
        q = torch.index_select(x, 0, torch.as_tensor(qs)).to_dense()  # (B, V)
        sims = torch.sparse.mm(x, q.T).T.numpy()  # (B, M)
        others = caps_of[part["image"].to_numpy()]  # (P, 5)
        local = np.array([rows_of[c] for c in part["caption"].to_numpy()])
        vals = np.take_along_axis(sims[local], np.maximum(others, 0), axis=1)
        vals[(others < 0) | (others == part["caption"].to_numpy()[:, None])] = -np.inf
        out[part["p"].to_numpy()] = vals.max(axis=1)
    return out


def _calibrate(texts: list[str], caption_image: np.ndarray, rng: np.random.Generator) -> dict:
    """The median same-image caption cosine, and the rule's rate on positives and random pairs."""
    import torch

    from teacher.batches import tfidf_rows

    x = tfidf_rows([[t] for t in texts])  # (M, V) sparse
    same = []
    for image in np.unique(caption_image)[:2000]:
        rows = np.flatnonzero(caption_image == image)
        v = x.index_select(0, torch.as_tensor(rows)).to_dense()  # (R, V)
        s = (v @ v.T).numpy()
        same.extend(s[np.triu_indices(len(rows), 1)].tolist())
    threshold = float(np.median(same))
    n = min(5000, len(texts))
    cap = rng.choice(len(texts), n, replace=False)
    pos = pl.DataFrame({"image": caption_image[cap], "caption": cap})
    rnd_img = rng.choice(np.unique(caption_image), n)
    rnd = pl.DataFrame({"image": rnd_img, "caption": cap}).filter(
        pl.col("image") != pl.Series(caption_image[cap])
    )
    return {
        "threshold": round(threshold, 4),
        "rate_on_positives": _rate(overlap_scores(texts, caption_image, pos) >= threshold),
        "rate_on_random_pairs": _rate(overlap_scores(texts, caption_image, rnd) >= threshold),
    }


def _rate(flags: np.ndarray) -> float:
    return round(float(np.mean(flags)), 4) if len(flags) else float("nan")


def _negatives(data: Path, candidates: Path) -> tuple[pl.DataFrame, list[str], np.ndarray]:
    """Mined non-positive pairs as split rows (direction, image, caption, image_id, caption_id),
    the split's caption texts and each caption row's image row."""
    from pipeline.core.candidates import load_candidates
    from pipeline.core.dataset import Dataset

    manifest, cand = load_candidates(candidates)
    ds = Dataset.load(data)
    images, captions = ds.split(manifest["split"])
    img_row = dict(zip(images["image_id"], range(images.height), strict=True))
    cap_row = dict(zip(captions["caption_id"], range(captions.height), strict=True))
    i2t = pl.col("direction") == "i2t"
    neg = cand.filter(~pl.col("is_positive")).select(
        "direction",
        pl.when(i2t).then("query_id").otherwise("candidate_id").alias("image_id"),
        pl.when(i2t).then("candidate_id").otherwise("query_id").alias("caption_id"),
    )
    neg = neg.with_columns(
        pl.col("image_id").replace_strict(img_row).alias("image"),
        pl.col("caption_id").replace_strict(cap_row).alias("caption"),
    )
    owner = np.array([img_row[i] for i in captions["image_id"]], dtype=np.int64)
    return neg, captions["caption"].to_list(), owner


def estimate(data: Path, candidates: Path, cache: Path | None, seed: int = 0) -> dict:
    """The rate of true matches among mined negatives by each estimator (and the truth and each
    estimator's precision and recall against it when the dataset has a relation)."""
    from pipeline.core.cache import load_scores
    from pipeline.core.dataset import Dataset

    ds = Dataset.load(data)
    neg, texts, owner = _negatives(data, candidates)
    calib = _calibrate(texts, owner, np.random.default_rng(seed))
    neg = neg.with_columns(
        pl.Series("overlap", overlap_scores(texts, owner, neg.select("image", "caption")))
    )
    flags = {"overlap": (pl.col("overlap") >= calib["threshold"])}
    if cache is not None:
        scores = load_scores(cache)[1].select("image_id", "caption_id", "prob")
        neg = neg.join(scores, on=["image_id", "caption_id"], how="left")
        flags["teacher"] = pl.col("prob") >= 0.5
    out: dict = {"negatives": neg.height, "overlap_calibration": calib}
    if ds.relation is not None:
        truth = ds.relation.select("image_id", "caption_id", pl.lit(True).alias("match"))
        neg = neg.join(truth, on=["image_id", "caption_id"], how="left").with_columns(
            pl.col("match").fill_null(False)
        )
        out["truth"] = {d: _rate(neg.filter(pl.col("direction") == d)["match"].to_numpy())
                        for d in ("i2t", "t2i")}  # fmt: skip
        out["truth"]["all"] = _rate(neg["match"].to_numpy())
    for name, flag in flags.items():
        f = neg.select(flag.alias("f"), "direction", *(["match"] if "match" in neg.columns else []))
        row = {d: _rate(f.filter(pl.col("direction") == d)["f"].to_numpy()) for d in ("i2t", "t2i")}
        row["all"] = _rate(f["f"].to_numpy())
        if "match" in f.columns:
            hit = (f["f"] & f["match"]).sum()
            row["precision"] = round(hit / max(1, f["f"].sum()), 4)
            row["recall"] = round(hit / max(1, f["match"].sum()), 4)
        out[name] = row
    return out


def _flickr(out: Path, fixture: Path, teacher: bool, device) -> dict:
    """The Flickr8k fixture through import, dual encoder and mining (real_flickr's full profile
    and layout), plus the effnet-minilm teacher and its cache with ``teacher``."""
    from benchmarks.real_flickr import DUAL, PROFILES, _done, _import, _student
    from pipeline.stages.mine import MineConfig, mine_candidates

    p = PROFILES["full"]
    out.mkdir(parents=True, exist_ok=True)
    os.environ["CPRD_FEATURE_CACHE"] = str((out / "features").resolve())
    data, dual, cand = out / "data", out / "students" / DUAL, out / "candidates"
    if not (data / "dataset.json").is_file():
        _import(fixture / "dataset_flickr8k.json", data, p)
    if not _done(dual):
        _student(data, dual, DUAL, p.dual_epochs, 0, device, loss="none", batching="random")
    if not (cand / "candidates.json").is_file():
        mine_candidates(
            MineConfig(
                data=data, student=str(dual), out=cand, k=p.k, device=device, overwrite=True
            )  # fmt: skip
        )
    cache = None
    if teacher:
        from pipeline.stages.score import ScoreConfig, score_teacher
        from teacher.train import train_teacher
        from teacher.train_config import TeacherTrainConfig

        tdir = out / "teacher"
        if not (tdir / "train_config.json").is_file():
            train_teacher(
                TeacherTrainConfig(data=str(data), out=str(tdir), base="effnet-minilm",
                                   epochs=p.teacher_epochs, device=device, overwrite=True)
            )  # fmt: skip
        score = score_teacher(
            ScoreConfig(
                candidates=cand,
                teacher=str(tdir),
                cache_dir=out / "cache",
                shards=16,
                device=device,
            )  # fmt: skip
        )
        cache = Path(score["cache_path"])
    return {"k": p.k, **estimate(data, cand, cache)}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.real_flickr import FIXTURE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo-run", type=Path, help="a `cprd demo` output dir (data, candidates)")
    ap.add_argument("--flickr", action="store_true", help="estimate on the Flickr8k fixture")
    ap.add_argument("--flickr-out", type=Path, default=Path("data/real-flickr"))
    ap.add_argument("--fixture", type=Path, default=FIXTURE)
    ap.add_argument("--teacher", action="store_true", help="Flickr: also the teacher estimate")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result: dict = {}
    if args.demo_run:
        report = json.loads((args.demo_run / "report.json").read_text())
        result["demo"] = estimate(
            args.demo_run / "data",
            args.demo_run / "candidates",
            Path(report["teacher_cache"]["cache_path"]),
        )
    if args.flickr:
        result["flickr"] = _flickr(args.flickr_out, args.fixture, args.teacher, args.device)
    body = _markdown(result)
    print(body)
    path = write_result("false_negatives", "False negatives among mined negatives", body, result)
    print(f"written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return result


def _markdown(result: dict) -> str:
    lines = [
        "Fraction of mined non-positive candidates (train split, both directions) that are true "
        "matches. `truth`: the dataset's full relation (demo only). `teacher`: teacher match "
        "probability >= 0.5. `overlap`: TF-IDF cosine to one of the other image's own captions "
        ">= the median same-image caption cosine. Precision / recall: of the estimator against "
        "the truth.",
        "",
        "| data | estimator | all | i2t | t2i | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for data, r in result.items():
        for name in ("truth", "teacher", "overlap"):
            if name in r:
                e = r[name]
                lines.append(
                    f"| {data} | {name} | {e['all']:.3f} | {e['i2t']:.3f} | {e['t2i']:.3f} | "
                    f"{e.get('precision', '')} | {e.get('recall', '')} |"
                )
        c = r["overlap_calibration"]
        lines.append(
            f"| {data} | (overlap rule on labelled positives / random pairs) | "
            f"{c['rate_on_positives']:.3f} / {c['rate_on_random_pairs']:.3f} | | | | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
