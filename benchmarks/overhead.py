"""Overhead ratios: how much of a stage's time is the model, and how much everything around it.

Both measured in one process, the two sides interleaved, so machine noise hits both alike:
- `score_ratio`: `score_teacher` (pipeline/stages/score.py) end to end, writing a fresh cache
  from real mined candidates over real image files, against the bare teacher forward on exactly
  the same pairs: pixels preprocessed and captions tokenized beforehand, each image's pairs
  together (its vision encoder runs once), the same images per step, batch size and precision.
  The teacher is loaded once and handed to the stage (its load is reported as startup).
- `train_ratio`: `train_student` as shipped (default loss and negative delivery: CPRD with the
  negative bank) against the bare student step on the same batches: pixels and tokens stacked
  beforehand, forward, the same loss over in-batch negatives only (lists built beforehand),
  backward, clip, AdamW. Per step, over whole epochs; what train_student spends outside its
  epochs (loading data and lookup, building the model, validation, checkpoints) is reported
  apart as `startup_seconds`.

ratio = bare seconds / pipeline seconds: 1.0 is no overhead; the goal is >= 0.8.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --quick --json
    OMP_NUM_THREADS=1 python benchmarks/overhead.py --teacher base --images 24 --k 2 --repeats 1 \
        --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from benchmarks.teacher_throughput import build as build_teacher  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, the device's queue drained at both ends."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


# ---- data ----------------------------------------------------------------------------------------


def make_data(tmp: Path, args) -> Path:
    """The dataset dir: ``--data`` as given, else a fresh demo dataset (real JPEG files)."""
    if args.data is not None:
        return args.data
    from pipeline.stages.demo_data import generate_demo_data

    generate_demo_data(
        tmp / "data", train_images=args.images, val_images=16, test_images=16, progress=False
    )
    return tmp / "data"


def mine(data: Path, tmp: Path, args) -> Path:
    """Candidates of the train split mined by the (random) tiny student: real candidate rows."""
    from pipeline.stages.mine import MineConfig, mine_candidates

    out = tmp / "candidates"
    mine_candidates(MineConfig(data=data, student="tiny", out=out, k=args.k), progress=False)
    return out


# ---- (a) score-teacher against the bare teacher forward ------------------------------------------


def bare_score_inputs(teacher, cache_path: Path, ds, images_per_step: int, batch_size: int):
    """Per step: (pixels (S, 3, H, W) on the device, [(rows (P,), input_ids, attention_mask)]):
    the cached pairs grouped by image, ``images_per_step`` images a step, ``batch_size`` pairs a
    text batch, everything the forward needs already built."""
    from PIL import Image

    from pipeline.core import cache
    from teacher.model import _tokenize

    meta, pairs = cache.load_scores(cache_path)
    groups = pairs.group_by("image_id").agg("caption_id").sort("image_id")
    texts = ds.captions["caption"]  # indexed by caption id, as score-teacher does
    paths = {i: ds.image_path(p) for i, p in ds.images.select("image_id", "path").iter_rows()}
    steps = []
    for start in range(0, groups.height, images_per_step):
        step = groups.slice(start, images_per_step)
        decoded = []
        for image_id in step["image_id"]:
            with Image.open(paths[image_id]) as img:
                decoded.append(img.convert("RGB"))
        pixels = teacher.preprocess(decoded).to(teacher.device)
        flat = [(row, c) for row, ids in enumerate(step["caption_id"]) for c in ids]
        batches = []
        for p0 in range(0, len(flat), batch_size):
            chunk = flat[p0 : p0 + batch_size]
            rows = torch.tensor([r for r, _ in chunk], device=teacher.device)  # (P,)
            tok = _tokenize(teacher, [texts[c] for _, c in chunk])
            batches.append((rows, tok["input_ids"], tok["attention_mask"]))
        steps.append((pixels, batches))
    # vision passes: score-teacher encodes an image once in each shard holding a pair of it
    ids = pairs["image_id"].to_numpy(), pairs["caption_id"].to_numpy()
    encodes = {
        by: len(np.unique(cache.shard_of(*ids, meta["num_shards"], by=by) * (1 << 32) + ids[0]))
        for by in cache.SHARD_BY
    }
    return steps, pairs.height, groups.height, {"layout": cache.shard_by(meta), **encodes}


@torch.no_grad()
def bare_score(teacher, steps) -> None:
    """The teacher's own work on the pairs: one vision pass per image, the ITM text encoder and
    head per pair batch, the log-odds brought to the host (what any caller must do)."""
    from pipeline.torchkit.encode import autocast
    from teacher.model import itm_log_odds, itm_logits

    model = teacher.model
    for pixels, batches in steps:
        with autocast(teacher.device):
            embeds = model.vision_model(pixel_values=pixels).last_hidden_state  # (S, V, D)
        for rows, ids, mask in batches:
            with autocast(teacher.device):
                out = itm_logits(model, embeds[rows], ids, mask)  # (P, 2)
            itm_log_odds(out).cpu()


def score_side(data: Path, candidates: Path, tmp: Path, args) -> tuple[dict, Path]:
    """The score ratio and its details, and the cache entry the last pipeline run wrote."""
    from pipeline.core.dataset import Dataset
    from pipeline.stages.score import ScoreConfig, score_teacher
    from pipeline.torchkit.encode import precision_scope
    from teacher.model import load_teacher

    ds = Dataset.load(data)
    with precision_scope(args.precision):
        t0 = time.perf_counter()
        spec = build_teacher(args.teacher, tmp / "teacher", ds.captions["caption"].to_list())
        teacher = load_teacher(spec, device=args.device)
        load_s = time.perf_counter() - t0
        device = teacher.device

        def pipeline(n: int) -> dict:
            cfg = ScoreConfig(
                candidates=candidates,
                teacher=spec,
                cache_dir=tmp / f"cache-{n}",  # fresh: every pair is scored
                shards=args.shards,
                batch_size=args.teacher_batch,
                images_per_step=args.images_per_step,
                num_workers=args.score_workers,
            )
            return score_teacher(cfg, progress=False, loaded_teacher=teacher)

        t_pipe, t_bare, summary, steps = [], [], None, None
        for r in range(args.repeats):  # interleaved: drift in machine load hits both sides
            seconds, summary = _timed(lambda r=r: pipeline(r), device)
            t_pipe.append(seconds)
            if steps is None:  # the same pairs the pipeline scored, read back from its cache
                steps, pairs, images, encodes = bare_score_inputs(
                    teacher,
                    Path(summary["cache_path"]),
                    ds,
                    args.images_per_step,
                    args.teacher_batch,
                )
                bare_score(teacher, steps[:1])  # warm-up: first-call allocations
            t_bare.append(_timed(lambda s=steps: bare_score(teacher, s), device)[0])
            print(
                f"score repeat {r + 1}: pipeline {t_pipe[-1]:.2f} s, bare {t_bare[-1]:.2f} s",
                file=sys.stderr,
            )
    pipe, bare = min(t_pipe), min(t_bare)
    return {
        "score_ratio": bare / pipe,
        "pairs": pairs,
        "images": images,
        # the pipeline's vision passes in this cache's layout, and in either layout
        "image_encodes": {"bare": images, **encodes},
        "pipeline_seconds": pipe,
        "bare_seconds": bare,
        "pipeline_pairs_per_s": pairs / pipe,
        "bare_pairs_per_s": pairs / bare,
        "teacher_load_seconds": load_s,
        "teacher": args.teacher,
        "shards": args.shards,
        "batch_size": args.teacher_batch,
        "images_per_step": args.images_per_step,
        "num_workers": summary["num_workers"],
        "device": str(device),
        "precision": teacher.identity["precision"],
    }, Path(summary["cache_path"])


# ---- (b) a train-student step against the bare student step --------------------------------------


def _student_cfg(data: Path, cache_path: Path, out: Path, args):
    from student.train_config import StudentTrainConfig

    return StudentTrainConfig(
        data=data,
        out=out,
        student=args.student,
        teacher_scores=cache_path,
        epochs=args.epochs,
        batch_size=args.batch_size,
        warmup_steps=10,
        num_workers=args.train_workers,
        device=args.device,
        precision=args.precision,
        feature_cache=out.parent / "features",
        overwrite=True,
    )


def bare_train_setup(cfg):
    """(model, optimizer, settings, per-epoch step inputs) for the bare loop: the trainer's own
    model, optimizer and batches (in-batch only), every tensor and list built beforehand."""
    from pipeline.torchkit.encode import pick_device
    from student.batch_loss import DistillSettings
    from student.inputs import model_inputs
    from student.models import load_model
    from student.sampler import Batch, batch_lists
    from student.train import _load_data, make_optimizer, make_planner

    device = pick_device(cfg.device)
    ds, lookup, order = _load_data(cfg)
    planner = make_planner(cfg, ds, lookup, order)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.student, device=device)
    model = loaded.model.train()
    optimizer = make_optimizer(model, cfg)
    pixels, caption_inputs, _ = model_inputs(model, loaded, ds, cfg, device, progress=False)
    top, min_prob = cfg.valid_rule()
    settings = DistillSettings(
        cfg.loss, cfg.lam, cfg.tau, cfg.tau_teacher, top, min_prob, cfg.itc_negatives
    )

    def epoch_inputs(epoch: int) -> list:
        steps = []
        for b in planner.epoch(epoch):
            b = Batch(b.images, b.captions, b.seeds)  # in-batch only: no extras
            px = torch.stack([pixels[i] for i in b.images.tolist()]).to(device)  # (B, 3, H, W)
            tok = caption_inputs(b.captions).to(device)  # (B, L)
            lists = batch_lists(lookup, b)
            steps.append((px, tok, lists, lookup.pos_score[b.captions]))
        return steps

    def refresh_seconds() -> float:
        """One refresh of the negative bank (the trainer's at every epoch start), timed."""
        from student.bank import make_bank, refresh_bank
        from student.inputs import ImageBatches

        live = {m: cfg.negatives != "bank" for m in ("image", "caption")}
        bank = make_bank(model, loaded, ds, cfg, live, device)
        if bank is None:
            return 0.0
        images = ImageBatches(pixels, cfg.num_workers, pin_memory=False)
        run = lambda: refresh_bank(bank, model, images, caption_inputs, planner, live, device, 0)  # noqa: E731
        return _timed(run, device)[0]

    return model, optimizer, settings, epoch_inputs, device, refresh_seconds


def bare_train(model, optimizer, settings, steps, cfg, device) -> None:
    """The student's own work per step: forward, loss, backward, clip, AdamW, clamp."""
    from pipeline.torchkit.encode import autocast
    from student.batch_loss import step_loss
    from student.train import optimize

    for px, tok, lists, pos in steps:
        with autocast(device):
            img, txt, scale = model(px, tok)[:3]
        sim = img.float() @ txt.float().t()  # (B, B)
        terms = step_loss(sim, scale.float(), len(px), lists, pos, settings)
        optimize(model, optimizer, terms["total"], cfg.grad_clip)


def train_side(data: Path, cache_path: Path, tmp: Path, args) -> dict:
    """The train ratio and its details."""
    from pipeline.torchkit.encode import precision_scope
    from student.train import train_student

    cfg = _student_cfg(data, cache_path, tmp / "student", args)
    model, optimizer, settings, epoch_inputs, device, refresh_seconds = bare_train_setup(cfg)
    with precision_scope(cfg.precision):
        inputs = [epoch_inputs(e) for e in range(cfg.epochs)]
        bare_train(model, optimizer, settings, inputs[0][:1], cfg, device)  # warm-up
    steps = sum(len(s) for s in inputs)
    t_pipe, t_bare, startup, t_refresh, summary = [], [], [], [], None
    for r in range(args.train_repeats):  # interleaved: drift in machine load hits both sides
        wall, summary = _timed(lambda: train_student(cfg, progress=False), device)
        t_pipe.append(summary["train_seconds"] / summary["steps"])
        startup.append(wall - summary["train_seconds"])
        with precision_scope(cfg.precision):
            seconds = sum(
                _timed(lambda s=s: bare_train(model, optimizer, settings, s, cfg, device), device)[
                    0
                ]
                for s in inputs
            )
        t_bare.append(seconds / steps)
        with precision_scope(cfg.precision):
            t_refresh.append(refresh_seconds())
        print(
            f"train repeat {r + 1}: pipeline {t_pipe[-1]:.4f} s/step, bare {t_bare[-1]:.4f} "
            f"s/step, outside the epochs {startup[-1]:.2f} s",
            file=sys.stderr,
        )
    if summary["steps"] != steps:
        raise SystemExit(f"pipeline ran {summary['steps']} steps, the bare loop {steps}")
    pipe, bare = min(t_pipe), min(t_bare)
    return {
        "train_ratio": bare / pipe,
        "steps": steps,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "student": cfg.student,
        "loss": cfg.loss,
        "negatives": cfg.negatives,
        "num_workers": cfg.num_workers,
        "pipeline_seconds_per_step": pipe,
        "bare_seconds_per_step": bare,
        "startup_seconds": min(startup),
        # part of the pipeline's epochs: the bank re-encodes every training row at epoch start
        "bank_refresh_seconds_per_step": min(t_refresh) * cfg.epochs / steps,
        "device": str(device),
        "precision": summary["precision"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="a cprd dataset dir (default: demo)")
    ap.add_argument("--images", type=int, default=400, help="demo data: training images")
    ap.add_argument("--k", type=int, default=8, help="candidates mined per query")
    ap.add_argument("--teacher", choices=["tiny", "base"], default="base")
    ap.add_argument("--shards", type=int, default=64, help="score-teacher --shards")
    ap.add_argument("--teacher-batch", type=int, default=64, help="score-teacher --batch-size")
    ap.add_argument("--images-per-step", type=int, default=16)
    ap.add_argument("--score-workers", type=int, default=None, help="score-teacher --num-workers")
    ap.add_argument("--student", default="tiny")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="train-student --batch-size")
    ap.add_argument("--train-workers", type=int, default=2, help="train-student --num-workers")
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side")
    ap.add_argument("--train-repeats", type=int, default=2, help="interleaved train runs")
    ap.add_argument("--skip", choices=["score", "train"], default=None)
    ap.add_argument("--quick", action="store_true", help="tiny teacher, 48 images, 1 epoch")
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args()
    if args.quick:
        args.teacher, args.images, args.epochs, args.batch_size = "tiny", 96, 1, 32
        args.shards = 8  # as the demo's quick profile: 12 images a shard, not 1.5
    torch.manual_seed(0)
    result: dict = {"quick": args.quick, "load_1min": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_data(tmp, args)
        candidates = mine(data, tmp, args)
        score, cache_path = score_side(data, candidates, tmp, args)
        result["score_ratio"], result["score"] = score.pop("score_ratio"), score
        if args.skip != "train":
            train = train_side(data, cache_path, tmp, args)
            result["train_ratio"], result["train"] = train.pop("train_ratio"), train
    result["load_1min_end"] = os.getloadavg()[0]
    result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    body = _table(result)
    if not args.quick:
        write_result("overhead", "Overhead: pipeline against the bare model", body, result)
    print(json.dumps(result, sort_keys=True) if args.json else body)


def _table(r: dict) -> str:
    s, t = r["score"], r.get("train")
    rows = [
        "| stage | pipeline | bare model | ratio (bare / pipeline) |",
        "| --- | --- | --- | --- |",
        f"| score-teacher ({s['teacher']} teacher, {s['pairs']} pairs) | "
        f"{s['pipeline_pairs_per_s']:.1f} pairs/s | {s['bare_pairs_per_s']:.1f} pairs/s | "
        f"**{r['score_ratio']:.2f}** |",
    ]
    if t is not None:
        rows.append(
            f"| train-student ({t['student']}, batch {t['batch_size']}, {t['steps']} steps) | "
            f"{t['pipeline_seconds_per_step']:.4f} s/step | "
            f"{t['bare_seconds_per_step']:.4f} s/step | **{r['train_ratio']:.2f}** |"
        )
    return "\n".join(rows) + (
        f"\n\nLoad average (1 min) at the start {r['load_1min']:.2f}, at the end "
        f"{r['load_1min_end']:.2f}; OMP_NUM_THREADS={r['omp_num_threads']}."
    )


if __name__ == "__main__":
    main()
