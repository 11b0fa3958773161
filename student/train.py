"""``cprd train-student``: train an open_clip dual encoder with ITC plus a distillation term read
from the teacher cache (DESIGN 5), validating on the val split every epoch.

Output dir ``out`` (only rank 0 writes)::

    config.json    StudentTrainConfig (student/train_config.py), written at the start
    metrics.jsonl  one JSON object per line: {"event": "train", ...} every log_every steps and
                   {"event": "val", ...} after each validation
    model.pt, student.json   the best epoch by val RSUM (save_student): ``out`` is a model spec
    last.pt        one self-describing dict {model, optimizer, step, epoch, config, rng, metrics,
                   best, ...}, rewritten atomically after every epoch; ``resume`` continues from
                   it with the same step count and the same batches

Training images go through the model's *eval* transform (resize + centre crop, no random crop):
the demo's captions describe positions ("left of"), and a random crop could cut a shape off.
A frozen tower (``effnet-minilm``'s default) is not run at all while training: its features
for every image and caption are read once from the feature cache (computed on a miss,
pipeline/features.py) and the steps run the projections on them.
Run under ``torchrun --nproc_per_node N`` for DistributedDataParallel (student/distributed.py).
Shape letters: B pairs, Pi / Pc images / captions a step encodes, D embedding width.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.core import tracking
from pipeline.core.dataset import Dataset
from pipeline.core.metrics import ranks_from_embeddings, retrieval_metrics_from_ranks
from pipeline.torchkit.encode import (
    autocast,
    encode_images,
    encode_texts,
    pick_device,
    resolve_precision,
    with_precision,
)
from student.bank import make_bank, refresh_bank, staleness, with_bank_extras
from student.batch_loss import Delivery, DistillSettings, pool_positive, step_loss
from student.checkpoint import METRICS, save_last, start
from student.distributed import (
    barrier,
    close_distributed,
    gather_rows,
    init_distributed,
    my_slice,
)
from student.inputs import ImageBatches, ImageFiles, model_inputs
from student.models import load_model, save_student
from student.sampler import BatchPlanner, batch_lists
from student.teacher_lookup import TeacherLookup, load_lookup
from student.train_config import StudentTrainConfig, check_config, config_dict

__all__ = ["StudentTrainConfig", "lr_at", "train_student", "validate"]

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp: the temperature never drops below 0.01


def lr_at(step: int, cfg: StudentTrainConfig, total_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: StudentTrainConfig) -> torch.optim.AdamW:
    """AdamW; like open_clip, gains, biases, logit_scale (every 1-D parameter) get no decay."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]
    # foreach: one kernel per step for all tensors, twice as fast as the per-tensor loop on CPU.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, foreach=True)


@torch.no_grad()
def optimize(model, optimizer, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward, clip, step; the temperature is clamped as in open_clip."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def validate(
    model, loaded, ds: Dataset, device: torch.device, batch_size: int, cache: Path | None = None
) -> dict:
    """R@1/5/10 both directions and RSUM on the val split (the model is left in train mode)."""
    images, captions = ds.split("val")
    paths = [ds.image_path(p) for p in images["path"]]
    model.eval()
    kw = {"batch_size": batch_size, "device": device, "progress": False, "cache": cache}
    img = encode_images(model, loaded.preprocess, paths, keys=images["sha256"].to_list(), **kw)
    cap = encode_texts(model, loaded.tokenizer, captions["caption"].to_list(), **kw)  # (M, D)
    model.train()
    row_of = {i: r for r, i in enumerate(images["image_id"].to_list())}
    owner = np.array([row_of[i] for i in captions["image_id"].to_list()], dtype=np.int64)
    return retrieval_metrics_from_ranks(*ranks_from_embeddings(img, cap, owner))


def _load_data(
    cfg: StudentTrainConfig,
) -> tuple[Dataset, TeacherLookup | None, TeacherLookup | None]:
    """The dataset (val checked up front), the lists the losses receive (the teacher cache, else
    the miner's candidates; None when there are neither) and the lists hard batching orders its
    neighbours by (``cfg.order()``: the miner's or the teacher's; None for random batches)."""
    ds = Dataset.load(cfg.data)
    ds.split("val")  # fail now, not after the first epoch, when there is nothing to validate on
    lookups: dict[str, TeacherLookup] = {}

    def get(source: str) -> TeacherLookup:
        if source not in lookups:
            kw = {
                "teacher_scores" if source == "teacher" else "candidates": getattr(
                    cfg, "teacher_scores" if source == "teacher" else "candidates"
                )
            }
            lookups[source] = load_lookup(ds, cfg.hard_k, **kw)
            log.info("%s hard-negative lists: %s", source, json.dumps(lookups[source].summary()))
        return lookups[source]

    lists = None
    if cfg.teacher_scores is not None:
        lists = get("teacher")
    elif cfg.candidates is not None:
        lists = get("miner")
    order = get(cfg.order()) if cfg.order() is not None else None
    return ds, lists, order


def make_planner(
    cfg: StudentTrainConfig, ds: Dataset, lookup: TeacherLookup | None, order: TeacherLookup | None
) -> BatchPlanner:
    """The run's batches: ``lookup`` supplies each query's negatives, ``order`` the hard-batching
    neighbour order. Nothing is delivered beyond the batch when no term would read it (no lists,
    or ITC alone over the pairs: --loss none with --itc-negatives batch)."""
    reads = cfg.loss != "none" or cfg.itc_negatives != "batch"
    return BatchPlanner(
        ds.split("train")[0]["image_id"].to_numpy(),
        ds.captions["image_id"].to_numpy(),
        cfg.batch_size,
        batching=cfg.batching,
        lookup=lookup,
        neighbours=order,
        seed=cfg.seed,
        neighbours_per_seed=cfg.neighbours_per_seed,
        negatives=cfg.negatives if lookup is not None and reads else "inbatch",
    )


@with_precision
def train_student(cfg: StudentTrainConfig, progress: bool = True) -> dict:
    """Train, validate every val_every epochs, keep the best model in ``cfg.out``; return a
    summary: out, steps, epochs, best_epoch, best_val, final_val, hard negatives per query, time."""
    env = init_distributed(pick_device(cfg.device))
    try:
        check_config(cfg)
        barrier(env)  # every rank has checked --out before rank 0 creates it
        ds, lookup, order = _load_data(cfg)
        owner = ds.captions["image_id"].to_numpy()
        planner = make_planner(cfg, ds, lookup, order)
        negatives = planner.negatives
        if planner.batch_size < max(2, env.world):
            raise ValueError(
                f"--batch-size: a batch holds {planner.batch_size} pairs (the train split has "
                f"{len(planner.images)} images with captions); need at least {max(2, env.world)}"
            )
        torch.manual_seed(cfg.seed)  # tiny's random init, identical on every rank
        loaded = load_model(cfg.student, device=env.device)
        model = loaded.model.train()
        optimizer = make_optimizer(model, cfg)
        state = start(cfg, env, model, optimizer)  # fresh, or out/last.pt when resuming
        if env.main:  # _record also sends every metrics.jsonl line there
            tracking.enable(cfg.out, cfg.report_to, Path(cfg.out) / "tensorboard", state["step"])
        ddp = model
        if env.world > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            ddp = DistributedDataParallel(model, device_ids=ids)
        total_steps = cfg.epochs * planner.steps_per_epoch
        top, min_prob = cfg.valid_rule()
        settings = DistillSettings(
            cfg.loss, cfg.lam, cfg.tau, cfg.tau_teacher, top, min_prob, cfg.itc_negatives
        )
        pixels, caption_inputs, frozen = model_inputs(
            model, loaded, ds, cfg, env.device, progress and env.main
        )
        # A modality's extras are encoded in the step when asked (explicit) or when its tower is
        # frozen (only the heads run: cheap and exact); otherwise they come from the bank.
        live = {m: negatives != "bank" or frozen[m] for m in ("image", "caption")}
        bank = make_bank(model, loaded, ds, cfg, live, env.device)
        workers = cfg.num_workers if isinstance(pixels, ImageFiles) else 0
        pin = env.device.type == "cuda"
        # decoding workers started once per run: one set feeds the steps, one the bank refresh
        step_images = ImageBatches(pixels, workers, pin)
        bank_images = ImageBatches(pixels, workers, pin) if bank is not None else None
        stop = min(cfg.epochs, cfg.stop_after or cfg.epochs)
        t_start = time.time()

        for epoch in range(state["epoch"], stop):
            batches = planner.epoch(epoch)  # the same on every rank and after a resume
            # what each step encodes: its pairs, plus its extras where they are encoded live
            encoded = [
                (
                    b.image_pool if live["image"] else b.images,
                    b.caption_pool if live["caption"] else b.captions,
                )
                for b in batches
            ]
            loader = step_images.batches([my_slice(im, env) for im, _ in encoded])
            sums, delivery, stale = {}, Delivery(), []
            bar = tqdm(
                total=len(batches),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                disable=not (progress and env.main),
            )
            for batch, px, (img_ids, cap_ids) in zip(batches, loader, encoded, strict=True):
                # lr: set by hand every step from the step count, so a resume continues it exactly
                lr = lr_at(state["step"], cfg, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # the bank: every row re-encoded at each epoch start (so a resume is exact) and
                # every --bank-refresh steps
                every = cfg.bank_refresh
                if bank is not None and (
                    batch is batches[0] or (every and state["step"] % every == 0)
                ):
                    refresh_bank(
                        bank,
                        model,
                        bank_images,
                        caption_inputs,
                        planner,
                        live,
                        env.device,
                        state["step"],
                    )

                # forward: this rank's share of the step's images and captions, then the gather
                # puts the whole batch on every rank (in-batch negatives may sit on any rank)
                tokens = caption_inputs(my_slice(cap_ids, env))
                with autocast(env.device):
                    img, txt, scale = ddp(px.to(env.device), tokens.to(env.device))[:3]
                img = gather_rows(img.float(), len(img_ids), env)  # (B or Pi, D)
                txt = gather_rows(txt.float(), len(cap_ids), env)  # (B or Pc, D)
                if bank is not None:  # extras not encoded live: read them (no gradient)
                    img, txt = with_bank_extras(bank, batch, img, txt, live, state["step"], stale)
                sim = img @ txt.t()  # (Pi, Pc)

                # loss: ITC over the pairs (and the extras: --itc-negatives pool) + λ *
                # distillation over each query's cached negatives in the pools
                lists = batch_lists(lookup, batch) if lookup is not None else None
                pos = lookup.pos_score[batch.captions] if lookup is not None else None
                positive = None
                if cfg.itc_negatives != "batch" and len(sim) + sim.shape[1] > 2 * len(batch.images):
                    positive = pool_positive(batch.image_pool, batch.caption_pool, owner)
                    positive = positive.to(sim.device)
                terms = step_loss(
                    sim, scale.float(), len(batch.images), lists, pos, settings, positive
                )

                optimize(model, optimizer, terms["total"], cfg.grad_clip)
                state["step"] += 1

                # log: every loss term, and what the losses really received
                values = {k: float(v.detach()) for k, v in terms.items()}
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                if lists is not None:
                    delivery.add(lists, pos)
                bar.update()
                bar.set_postfix(loss=f"{values['total']:.3f}")
                if env.main and state["step"] % cfg.log_every == 0:
                    _record(
                        cfg.out,
                        state,
                        {
                            "event": "train",
                            "epoch": epoch + 1,
                            "step": state["step"],
                            "lr": lr,
                            **values,
                            "logit_scale": float(scale.detach()),
                            "negatives_per_query": delivery.summary(),
                        },
                    )
            bar.close()
            state["epoch"] = epoch + 1
            state["delivery"] = Delivery(state["delivery"]).merged(delivery).state
            state["staleness"] = staleness(state["staleness"], stale)
            state["train_seconds"] += time.time() - t_start
            t_start = time.time()
            got = delivery.summary()
            if got is not None:
                log.info(
                    "epoch %d: cached hard negatives per query used/available (of up to %d): "
                    "i2t %.2f/%.2f, t2i %.2f/%.2f; queries without a scored positive: %d%s",
                    epoch + 1,
                    cfg.hard_k,
                    got["i2t"]["used"],
                    got["i2t"]["available"],
                    got["t2i"]["used"],
                    got["t2i"]["available"],
                    got["i2t"]["no_positive"],
                    f"; bank staleness {staleness(None, stale)}" if stale else "",
                )

            # eval and checkpoint (rank 0): the best epoch by val RSUM becomes the model in out
            if env.main:
                if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                    val = validate(model, loaded, ds, env.device, cfg.batch_size, cfg.feature_cache)
                    state["final_val"] = val
                    _record(
                        cfg.out,
                        state,
                        {
                            "event": "val",
                            "epoch": epoch + 1,
                            "step": state["step"],
                            "val": val,
                            "train": {k: v / len(batches) for k, v in sums.items()},
                            "negatives_per_query": got,
                            "bank_staleness": staleness(None, stale),
                        },
                    )
                    if val["rsum"] > state["best"]["rsum"]:
                        save_student(
                            model,
                            loaded.model_cfg,
                            cfg.out,
                            base_spec=cfg.student,
                            train_cfg=config_dict(cfg),
                        )
                        state["best"] = {"epoch": epoch + 1, "rsum": val["rsum"], "metrics": val}
                save_last(cfg, model, optimizer, state)
            barrier(env)

        return {
            "out": str(cfg.out),
            "steps": state["step"],
            "epochs": state["epoch"],
            "world_size": env.world,
            "best_epoch": state["best"]["epoch"],
            "best_val": state["best"]["metrics"],
            "final_val": state["final_val"],
            "negatives": negatives,
            "batching_order": cfg.order(),
            "negatives_per_query": Delivery(state["delivery"]).summary(),
            "bank_staleness": state["staleness"] if bank is not None else None,
            "lookup": lookup.summary() if lookup is not None else None,
            "train_seconds": round(state["train_seconds"], 2),
            "precision": resolve_precision(env.device),
        }
    finally:
        tracking.close(cfg.out)
        close_distributed(env)


def _record(out: Path, state: dict, record: dict) -> None:
    """Append one metrics.jsonl line (kept in the checkpoint too, for a clean resume)."""
    state["metrics"].append(record)
    with open(Path(out) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    tracking.report(out, record)  # --report-to tensorboard
