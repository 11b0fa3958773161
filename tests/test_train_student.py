"""train-student: the teacher lookup, the batch sampler, the trainer end to end, resume, DDP, errors.

The teacher cache here is synthetic (written with pipeline.cache's own functions): this pins the
trainer, not a teacher.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may download

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.core import cache  # noqa: E402
from pipeline.core.candidates import Embeddings, write_candidates  # noqa: E402
from pipeline.core.dataset import Dataset  # noqa: E402
from student.inputs import FeatureRows, ImageBatches  # noqa: E402
from student.losses import LOSS_NAMES  # noqa: E402
from student.models import build_from_cfg, load_model, save_student  # noqa: E402
from student.sampler import BatchPlanner, batch_lists  # noqa: E402
from student.teacher_lookup import load_lookup  # noqa: E402
from student.train import StudentTrainConfig, train_student  # noqa: E402


def write_cache(ds_dir: Path, root: Path, fingerprint: str | None = None) -> Path:
    """A complete 2-shard synthetic teacher cache over mined-looking pairs of every split.

    Each image gets 5 random captions plus its own, each caption 3 random images plus its own;
    positives score about 4 higher; scores are rounded so that ties occur. The positive pair of
    caption 0 is left out on purpose.
    """
    ds = Dataset.load(ds_dir)
    rng = np.random.default_rng(0)
    owner = ds.captions["image_id"].to_numpy()
    n_img, n_cap = ds.images.height, ds.captions.height
    pairs = {(int(owner[c]), c) for c in range(n_cap) if c != 0}
    for i in range(n_img):
        pairs |= {(i, int(c)) for c in rng.choice(n_cap, 5, replace=False)}
    for c in range(n_cap):
        pairs |= {(int(i), c) for i in rng.choice(n_img, 3, replace=False)}
    pairs.discard((int(owner[0]), 0))
    img, cap = (np.array(x, dtype=np.int64) for x in zip(*sorted(pairs), strict=True))
    # Half-unit steps: many ties, which must break by candidate id.
    score = (np.round(2 * rng.normal(size=len(img))) / 2 + 4.0 * (owner[cap] == img)).astype(
        np.float32
    )
    frame = pl.DataFrame(
        {"image_id": img, "caption_id": cap, "score": score, "prob": 1 / (1 + np.exp(-score))}
    ).with_columns(pl.col("prob").cast(pl.Float32))
    identity = {"weights_sha256": "synthetic", "preprocessing": {}, "precision": "fp32"}
    key, fields = cache.cache_key(fingerprint or ds.fingerprint, identity)
    path = cache.open_cache(root, fields, key, 2, {"spec": "synthetic"})
    shard = cache.shard_of(img, cap, 2)
    for s in range(2):
        cache.write_shard(path, s, frame.filter(pl.Series(shard == s)))
    assert cache.finalize(path) is not None
    return path


@pytest.fixture(scope="session")
def teacher_cache(small_dataset: Path, tmp_path_factory) -> Path:
    """A synthetic teacher cache for the small dataset (read-only; copy it to damage it)."""
    return write_cache(small_dataset, tmp_path_factory.mktemp("cache"))


# A student smaller than `tiny` (1 layer, width 32), saved as a student dir: the trainer's path
# is the same for any spec, and this keeps each step to milliseconds on 2 cores.
MICRO_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def micro_student(tmp_path_factory) -> str:
    """A randomly initialised micro open_clip student directory (read-only)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("micro") / "student"
    save_student(build_from_cfg(MICRO_CFG), MICRO_CFG, out, base_spec="micro (tests)")
    return str(out)


@pytest.fixture
def config(small_dataset, micro_student):
    """Build a fast training config: 12 train images, batch 8, 3 steps per epoch."""

    def make(out: Path, **kw) -> StudentTrainConfig:
        base = dict(
            data=small_dataset,
            out=out,
            student=micro_student,
            epochs=1,
            batch_size=8,
            lr=1e-3,
            warmup_steps=1,
            hard_k=4,
            neighbours_per_seed=1,
            num_workers=0,
            log_every=1,
            device="cpu",
            seed=0,
        )
        return StudentTrainConfig(**{**base, **kw})

    return make


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the lookup ---------------------------------------------------------------------------------


def test_lookup_matches_naive_construction(small_dataset, teacher_cache):
    """Per query: train-only non-positive candidates, by teacher score desc, capped at hard_k."""
    ds = Dataset.load(small_dataset)
    _, frame = cache.load_scores(teacher_cache, ds.fingerprint)
    owner = ds.captions["image_id"].to_numpy()
    train = set(ds.split("train")[0]["image_id"].to_list())
    rows = [r for r in frame.iter_rows() if r[0] in train and owner[r[1]] in train]
    for hard_k in (2, 100):
        lk = load_lookup(ds, hard_k, teacher_scores=teacher_cache)
        for i in range(ds.images.height):
            want = sorted(((-s, c, s, p) for im, c, s, p in rows if im == i and owner[c] != i))
            cand, score, prob = lk.i2t.of(i)
            assert cand.tolist() == [w[1] for w in want[:hard_k]]
            np.testing.assert_array_equal(score, np.float32([w[2] for w in want[:hard_k]]))
            np.testing.assert_array_equal(prob, np.float32([w[3] for w in want[:hard_k]]))
        for c in range(ds.captions.height):
            want = sorted(((-s, im, s) for im, cc, s, _ in rows if cc == c and owner[c] != im))
            cand, score, _ = lk.t2i.of(c)
            assert cand.tolist() == [w[1] for w in want[:hard_k]]
            np.testing.assert_array_equal(score, np.float32([w[2] for w in want[:hard_k]]))
            pos = [s for im, cc, s, _ in rows if cc == c and owner[c] == im]
            assert (pos[0] == lk.pos_score[c]) if pos else np.isnan(lk.pos_score[c])
    assert np.isnan(lk.pos_score[0])  # the positive left out of the cache
    assert lk.i2t.counts().max() > 0 and lk.t2i.counts().max() > 0


def test_cache_streams_one_shard_at_a_time(small_dataset, teacher_cache):
    """iter_scores: one checked table per shard, only the asked columns, the lock let go after."""
    ds = Dataset.load(small_dataset)
    manifest, frame = cache.load_scores(teacher_cache, ds.fingerprint)
    seen: dict = {}
    stream = cache.iter_scores(teacher_cache, ds.fingerprint, ["caption_id", "score"], seen)
    tables = list(stream)
    assert seen == manifest and len(tables) == len(manifest["shards"])
    assert all(t.column_names == ["caption_id", "score"] for t in tables)
    got = pl.concat([pl.from_arrow(t) for t in tables]).sort("caption_id", "score")
    assert got.equals(frame.select("caption_id", "score").sort("caption_id", "score"))
    fd = os.open(teacher_cache / cache.ENTRY_LOCK, os.O_RDONLY)
    try:  # exclusive, without waiting: no reader holds the entry any more
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def write_candidates_dir(ds: Dataset, out: Path, score: np.ndarray, fingerprint: str) -> Path:
    """A candidates dir listing every train pair both ways, with score[image, caption]."""
    train = ds.split("train")[0]["image_id"].to_numpy()
    caps = ds.split("train")[1]["caption_id"].to_numpy()
    owner = ds.captions["image_id"].to_numpy()
    q_i, c_i = np.repeat(train, len(caps)), np.tile(caps, len(train))
    q_t, c_t = np.repeat(caps, len(train)), np.tile(train, len(caps))
    table = pa.table(
        {
            "direction": ["i2t"] * len(q_i) + ["t2i"] * len(q_t),
            "query_id": np.concatenate([q_i, q_t]),
            "candidate_id": np.concatenate([c_i, c_t]),
            "rank": np.zeros(len(q_i) + len(q_t), dtype=np.int32),
            "score": np.concatenate([score[q_i, c_i], score[c_t, q_t]]).astype(np.float32),
            "is_positive": np.concatenate([owner[c_i] == q_i, owner[q_t] == c_t]),
        }
    )
    emb = Embeddings(
        np.zeros((1, 2), np.float32), train[:1], np.zeros((1, 2), np.float32), caps[:1]
    )
    write_candidates(out, table, emb, {"dataset": {"fingerprint": fingerprint}, "split": "train"})
    return out


def test_lookup_from_candidates_without_teacher(small_dataset, tmp_path):
    """A candidates dir gives miner-ordered lists (no probabilities); another dataset's is refused."""
    ds = Dataset.load(small_dataset)
    owner = ds.captions["image_id"].to_numpy()
    score = np.random.default_rng(1).normal(size=(ds.images.height, ds.captions.height))
    cand = write_candidates_dir(ds, tmp_path / "cand", score, ds.fingerprint)
    lk = load_lookup(ds, 3, candidates=cand)
    assert lk.source == "miner" and np.isnan(lk.i2t.prob).all()
    for i in ds.split("train")[0]["image_id"].to_list():
        caps = ds.split("train")[1]["caption_id"].to_numpy()
        want = sorted(caps[owner[caps] != i], key=lambda c: -np.float32(score[i, c]))[:3]
        assert lk.i2t.of(i)[0].tolist() == want
    other = write_candidates_dir(ds, tmp_path / "other", score, "f" * 64)
    with pytest.raises(ValueError, match="--candidates .* was mined from another dataset"):
        load_lookup(ds, 3, candidates=other)


# ---- the sampler --------------------------------------------------------------------------------


def planner(ds: Dataset, lookup, **kw) -> BatchPlanner:
    train = ds.split("train")[0]["image_id"].to_numpy()
    args = {"batching": "hard", "lookup": lookup, "neighbours_per_seed": 1, "seed": 3, **kw}
    return BatchPlanner(train, ds.captions["image_id"].to_numpy(), 4, **args)


def test_sampler_deterministic_and_every_image_seeds_once(small_dataset, teacher_cache):
    """Same (seed, epoch) -> same batches; each train image seeds exactly one batch per epoch."""
    ds = Dataset.load(small_dataset)
    lookup = load_lookup(ds, 4, teacher_scores=teacher_cache)
    train = sorted(ds.split("train")[0]["image_id"].to_list())
    owner = ds.captions["image_id"].to_numpy()
    for kind in ("hard", "random"):
        p = planner(ds, lookup, batching=kind)
        a, b, other = p.epoch(0), planner(ds, lookup, batching=kind).epoch(0), p.epoch(1)
        key = [(x.images.tolist(), x.captions.tolist()) for x in a]
        assert key == [(x.images.tolist(), x.captions.tolist()) for x in b]
        assert key != [(x.images.tolist(), x.captions.tolist()) for x in other]
        assert len(a) == p.steps_per_epoch
        for epoch in (a, other):
            assert sorted(np.concatenate([x.seeds for x in epoch]).tolist()) == train
            for x in epoch:
                assert len(x.images) == 4 and len(set(x.images.tolist())) == 4
                assert set(x.seeds.tolist()) <= set(x.images.tolist())
                assert (owner[x.captions] == x.images).all()
                assert set(x.images.tolist()) <= set(train)


def naive_present(lookup, batch) -> list[int]:
    """Cached hard negatives of each query (images, then captions) found in the batch's pools."""
    caps, imgs = set(batch.caption_pool.tolist()), set(batch.image_pool.tolist())
    i2t = [sum(c in caps for c in lookup.i2t.of(i)[0]) for i in batch.images]
    t2i = [sum(i in imgs for i in lookup.t2i.of(c)[0]) for c in batch.captions]
    return i2t + t2i


@pytest.mark.parametrize("negatives", ["inbatch", "explicit"])
def test_batch_lists_count_present_negatives(small_dataset, teacher_cache, negatives):
    """Each query's list holds exactly its cached negatives present in the step, best first."""
    ds = Dataset.load(small_dataset)
    lookup = load_lookup(ds, 4, teacher_scores=teacher_cache)
    means = {}
    for kind in ("hard", "random"):
        counts = []
        for batch in planner(ds, lookup, batching=kind, negatives=negatives).epoch(0):
            i2t, t2i = batch_lists(lookup, batch)
            present = np.concatenate([i2t.present, t2i.present])
            assert present.tolist() == naive_present(lookup, batch)
            for ql, queries, pool, lists in (
                (i2t, batch.images, batch.caption_pool, lookup.i2t),
                (t2i, batch.captions, batch.image_pool, lookup.t2i),
            ):
                for r, q in enumerate(queries):
                    m = ql.mask[r]
                    cand, score, _ = lists.of(q)
                    keep = np.isin(cand, pool)
                    assert pool[ql.index[r, m]].tolist() == cand[keep].tolist()
                    np.testing.assert_array_equal(ql.score[r, m], score[keep])
            if negatives == "explicit":  # every cached negative is encoded
                assert (present == np.concatenate([i2t.cached, t2i.cached])).all()
            counts.append(present)
        means[kind] = float(np.concatenate(counts).mean())
    assert means["hard"] > 0


# ---- the trainer --------------------------------------------------------------------------------

RUNS = [(name, {}) for name in LOSS_NAMES if name != "none"] + [
    ("none", {"batching": "random"}),  # plain ITC: no cache at all
    ("none", {"batching": "hard"}),  # the student-itc-hard control
    ("none", {"itc_negatives": "pool"}),  # ITC over the pairs and the delivered negatives
    ("cprd", {"negatives": "explicit", "valid_min_prob": 0.3}),
    ("cprd", {"negatives": "inbatch"}),  # only the negatives the batch holds
    ("cprd", {"batching": "random"}),  # random batches, negatives from the bank
]


@pytest.mark.parametrize(("loss", "extra"), RUNS, ids=[f"{a}-{b}" for a, b in RUNS])
def test_one_epoch_end_to_end(config, teacher_cache, tmp_path, loss, extra):
    """One tiny epoch per loss: out loads as a model, metrics.jsonl has val lines, config.json."""
    teacher = None if (loss, extra.get("batching")) == ("none", "random") else teacher_cache
    cfg = config(tmp_path / "out", loss=loss, teacher_scores=teacher, **extra)
    summary = train_student(cfg, progress=False)
    out = tmp_path / "out"
    assert summary["epochs"] == 1 and summary["steps"] > 0 and summary["best_epoch"] == 1
    assert set(summary["best_val"]) >= {"i2t_R@1", "t2i_R@10", "rsum"}
    loaded = load_model(str(out))
    assert loaded.model_cfg == MICRO_CFG
    assert json.loads((out / "config.json").read_text())["loss"] == loss
    records = read_jsonl(out / "metrics.jsonl")
    val = [r for r in records if r["event"] == "val"]
    assert len(val) == 1 and "rsum" in val[0]["val"]
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == summary["steps"]
    assert all(np.isfinite(r["total"]) for r in train)
    assert all(("distill" in r) == (loss != "none") for r in train)
    if loss != "none":  # the teacher term was really computed, not the all-empty zero
        assert any(r["distill"] > 0 for r in train)
    got = summary["negatives_per_query"]
    if teacher is None:
        assert got is None and summary["negatives"] == "inbatch"
        return
    # ITC alone over the pairs reads no delivered negative: none are delivered
    itc_only = loss == "none" and extra.get("itc_negatives", "batch") == "batch"
    assert summary["negatives"] == ("inbatch" if itc_only else extra.get("negatives", "bank"))
    for d in ("i2t", "t2i"):  # what the losses received, per direction
        assert 0 < got[d]["used"] <= got[d]["available"] <= cfg.hard_k
        if summary["negatives"] == "inbatch":
            assert got[d]["used"] < 0.9 * got[d]["available"]  # why inbatch is not the default
        else:  # DESIGN 5: every query receives its cached negatives
            assert got[d]["used"] == got[d]["available"] and got[d]["min_share"] == 1.0
    # the positive the cache leaves out (caption 0) is counted each time caption 0 is a pair
    assert got["i2t"]["no_positive"] == got["t2i"]["no_positive"] >= 1
    if summary["negatives"] == "bank":  # the micro student's towers train: the bank serves
        assert 0 <= summary["bank_staleness"]["mean"] <= summary["bank_staleness"]["max"]
        assert summary["bank_staleness"]["max"] < summary["steps"]
    assert [r["negatives_per_query"] for r in val] == [got]


def test_resume_matches_uninterrupted_run(config, teacher_cache, tmp_path):
    """2 epochs straight == 1 epoch, stop, --resume for 1 more: same steps, identical weights."""
    straight = config(tmp_path / "a", teacher_scores=teacher_cache, epochs=2)
    a = train_student(straight, progress=False)
    cut = dataclasses.replace(straight, out=tmp_path / "b", stop_after=1)
    first = train_student(cut, progress=False)
    assert first["epochs"] == 1 and first["steps"] * 2 == a["steps"]
    b = train_student(dataclasses.replace(cut, stop_after=None, resume=True), progress=False)
    assert (a["steps"], a["epochs"]) == (b["steps"], b["epochs"]) == (a["steps"], 2)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    drop = ("train_seconds",)
    ra, rb = (
        read_jsonl(tmp_path / "a" / "metrics.jsonl"),
        read_jsonl(tmp_path / "b" / "metrics.jsonl"),
    )
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == [
        {k: v for k, v in r.items() if k not in drop} for r in rb
    ]
    with pytest.raises(ValueError, match="--resume: options \\['lr'\\] differ"):
        train_student(dataclasses.replace(cut, lr=0.1, resume=True, stop_after=None))


def _ddp_worker(rank: int, world: int, port: int, cfg: StudentTrainConfig, summary: Path) -> None:
    """One rank of a CPU DDP job, with the environment torchrun would give it."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)  # two ranks on two cores
    result = train_student(cfg, progress=False)
    summary.with_name(f"summary-{rank}.json").write_text(json.dumps(result))


def test_ddp_two_processes_on_cpu(config, teacher_cache, tmp_path):
    """2 gloo ranks finish, only rank 0 writes out, and the losses match one process."""
    single = config(tmp_path / "one", teacher_scores=teacher_cache)
    train_student(single, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # torch.multiprocessing.spawn with the variables torchrun sets (a torchrun subprocess would
    # import torch once more, in its launcher); fork is not safe once torch's threads run.
    two = dataclasses.replace(single, out=tmp_path / "two")
    args = (2, port, two, tmp_path / "summary.json")
    torch.multiprocessing.spawn(_ddp_worker, args, nprocs=2)
    summary = json.loads((tmp_path / "summary-0.json").read_text())
    assert summary["world_size"] == 2
    assert json.loads((tmp_path / "summary-1.json").read_text())["steps"] == summary["steps"]
    load_model(str(tmp_path / "two"))
    one = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if r["event"] == "train"]
    two = [r for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if r["event"] == "train"]
    assert len(one) == len(two) == summary["steps"]
    # The gathered batch gives every rank the single-process loss (same batches, same weights).
    np.testing.assert_allclose([r["total"] for r in two], [r["total"] for r in one], rtol=1e-3)


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"loss": "ranknet"}, "--loss 'ranknet' is unknown; choose one of cprd, kl, listmle"),
        ({"lam": -1.0}, "--lam must be >= 0"),
        ({"epochs": 0}, "--epochs must be >= 1"),
        ({"batch_size": 1}, "--batch-size must be >= 2"),
        ({"valid_top": 2, "valid_min_prob": 0.5}, "--valid-top and --valid-min-prob"),
        ({"teacher_scores": None}, "--loss cprd needs --teacher-scores PATH"),
        ({"teacher_scores": None, "loss": "none"}, "--batching hard needs neighbour lists"),
        ({"negatives": "all"}, "--negatives must be bank, explicit or inbatch"),
        ({"batching_order": "miner"}, "--batching-order miner needs --candidates DIR"),
        ({"bank_refresh": -1}, "--bank-refresh must be >= 0"),
    ],
)
def test_bad_options_name_the_flag(config, teacher_cache, tmp_path, change, match):
    """Invalid options raise a ValueError naming the flag, before any work."""
    cfg = config(tmp_path / "out", **{"teacher_scores": teacher_cache, **change})
    with pytest.raises(ValueError, match=match.replace("(", "\\(")):
        train_student(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_decoding_workers_persist_and_change_nothing(config, teacher_cache, tmp_path):
    """--num-workers 2: workers started once per run (steps and bank refresh, over 2 epochs and a
    mid-epoch refresh) train the same weights as decoding in the main process."""
    base = config(tmp_path / "a", teacher_scores=teacher_cache, epochs=2, bank_refresh=2)
    train_student(base, progress=False)
    train_student(dataclasses.replace(base, out=tmp_path / "b", num_workers=2), progress=False)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("workers", [0, 2])
def test_image_batches_follow_each_pass(workers):
    """One loader for the run: every pass yields exactly the rows of the ids set for it."""
    rows = FeatureRows(np.arange(20, dtype=np.float32).reshape(10, 2))
    images = ImageBatches(rows, workers, pin_memory=False)
    for ids in ([[0, 1], [2]], [[9], [3, 1, 0]], [np.array([4, 4])]):
        got = list(images.batches(ids))
        assert len(got) == len(ids)
        for want, px in zip(ids, got, strict=True):
            assert torch.equal(px, torch.stack([rows[i] for i in np.asarray(want).tolist()]))


def test_existing_out_needs_resume_or_overwrite(config, tmp_path):
    """An existing --out is refused without --resume/--overwrite; --overwrite replaces only ours."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    cfg = config(tmp_path / "out", loss="none", batching="random")
    with pytest.raises(ValueError, match="--out .* already exists; pass --resume"):
        train_student(cfg, progress=False)
    with pytest.raises(ValueError, match="--resume: .*last.pt' does not exist"):
        train_student(dataclasses.replace(cfg, resume=True), progress=False)
    with pytest.raises(ValueError, match="--overwrite: .* is not a train-student output"):
        train_student(dataclasses.replace(cfg, overwrite=True), progress=False)
    assert (tmp_path / "out" / "notes.txt").is_file()
    ours = dataclasses.replace(cfg, out=tmp_path / "ours")
    first = train_student(ours, progress=False)
    again = train_student(dataclasses.replace(ours, overwrite=True, seed=1), progress=False)
    assert again["steps"] == first["steps"]
    assert len(read_jsonl(tmp_path / "ours" / "metrics.jsonl")) == first["steps"] + 1
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["seed"] == 1


def test_bad_caches_are_refused(config, small_dataset, teacher_cache, tmp_path):
    """A missing path, another dataset's cache, a damaged shard: errors naming what is wrong."""
    cfg = config(tmp_path / "out", teacher_scores=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="teacher cache .*nope' does not exist"):
        train_student(cfg, progress=False)
    other = write_cache(small_dataset, tmp_path / "other", fingerprint="f" * 64)
    with pytest.raises(ValueError, match="made for another dataset"):
        train_student(dataclasses.replace(cfg, teacher_scores=other), progress=False)
    damaged = tmp_path / "damaged"
    shutil.copytree(teacher_cache, damaged)
    shard = damaged / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="shard .*shard-00001.parquet' is damaged"):
        train_student(dataclasses.replace(cfg, teacher_scores=damaged), progress=False)
    assert not (tmp_path / "out").exists()


def test_batching_order_miner_follows_the_candidates(
    config, small_dataset, teacher_cache, tmp_path
):
    """--batching-order miner: neighbour queues in the miner's order, negatives from the teacher."""
    ds = Dataset.load(small_dataset)
    score = np.random.default_rng(2).normal(size=(ds.images.height, ds.captions.height))
    cand = write_candidates_dir(ds, tmp_path / "cand", score, ds.fingerprint)
    teacher, miner = (
        load_lookup(ds, 4, **kw) for kw in ({"teacher_scores": teacher_cache}, {"candidates": cand})
    )
    owner = ds.captions["image_id"].to_numpy()
    for order in (teacher, miner):
        p = planner(ds, teacher, neighbours=order)
        for image, caption in (
            (int(owner[c]), c) for c in ds.split("train")[1]["caption_id"].to_list()
        ):
            caps, cs, _ = order.i2t.of(image)
            imgs, is_, _ = order.t2i.of(caption)
            scored = sorted(
                [(-s, k, int(owner[c])) for k, (c, s) in enumerate(zip(caps, cs, strict=True))]
                + [
                    (-s, len(caps) + k, int(i))
                    for k, (i, s) in enumerate(zip(imgs, is_, strict=True))
                ]
            )
            assert p._neighbours(image, caption)[0] == [w[2] for w in scored]
    cfg = config(
        tmp_path / "out", teacher_scores=teacher_cache, candidates=cand, batching_order="miner"
    )
    summary = train_student(cfg, progress=False)
    assert summary["batching_order"] == "miner" and summary["lookup"]["source"] == "teacher"
    assert summary["negatives_per_query"]["t2i"]["min_share"] == 1.0


def test_finished_only_after_every_epoch(config, tmp_path):
    """A run stopped after its first epoch already has student.json, but is not finished."""
    from student.checkpoint import finished

    cut = config(tmp_path / "a", loss="none", batching="random", epochs=2, stop_after=1)
    train_student(cut, progress=False)
    assert (tmp_path / "a" / "student.json").is_file() and not finished(tmp_path / "a")
    train_student(dataclasses.replace(cut, stop_after=None, resume=True), progress=False)
    assert finished(tmp_path / "a") and not finished(tmp_path / "missing")
