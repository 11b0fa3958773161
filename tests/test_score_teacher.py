"""Stage 2 (score-teacher) and the teacher cache, with a tiny real BLIP the tests build and save."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import assert_error, run
from PIL import Image

from pipeline.core import cache
from pipeline.core.candidates import load_candidates
from pipeline.core.dataset import Dataset
from pipeline.core.pairs import load_pair_set
from pipeline.stages.score import parse_shard_ids, resolve_rank, unique_pairs


@pytest.fixture
def teacher_dir(tiny_teacher_dir) -> Path:
    """The session's tiny BLIP teacher."""
    return tiny_teacher_dir


@pytest.fixture(scope="module")
def cands(small_dataset, tmp_path_factory) -> dict[int, Path]:
    """Candidates of the train split mined with k=3 and k=5 (same tiny student)."""
    base = tmp_path_factory.mktemp("cands")
    out = {}
    for k in (3, 5):
        result = run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            small_dataset,
            "--out",
            base / f"k{k}",
            "--k",
            k,
        )
        assert result.exit_code == 0, result.output
        out[k] = base / f"k{k}"
    return out


def score(cand: Path, teacher: Path, cache_dir: Path, *extra) -> dict:
    result = run(
        "score-teacher",
        "--candidates",
        cand,
        "--teacher",
        teacher,
        "--cache-dir",
        cache_dir,
        "--json",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def all_rows(path: Path) -> pl.DataFrame:
    return cache.load_scores(path)[1].sort("image_id", "caption_id")


def test_scores_every_unique_pair_once(cands, teacher_dir, tmp_path, small_dataset):
    """N shard files plus a manifest; each unique pair of both directions, and every ground-truth
    pair of the split, scored exactly once (against a set built by a plain loop)."""
    s = score(cands[3], teacher_dir, tmp_path, "--shards", "4")
    path = Path(s["cache_path"])
    assert sorted(p.name for p in path.glob("shard-*.parquet")) == [
        f"shard-{i:05d}.parquet" for i in range(4)
    ]
    assert (path / "cache.json").is_file() and s["complete"] and s["pairs_missing"] == 0
    _, cand = load_candidates(cands[3])
    from_cand = set()
    for direction, query, other in cand.select("direction", "query_id", "candidate_id").iter_rows():
        from_cand.add((query, other) if direction == "i2t" else (other, query))
    assert len(from_cand) < cand.height  # the two directions overlap: dedup matters
    _, captions = Dataset.load(small_dataset).split("train")
    positives = {(i, c) for c, i in captions.select("caption_id", "image_id").iter_rows()}
    assert positives - from_cand  # the miner missed some positives: scoring them matters
    expect = from_cand | positives
    assert s["pairs_total"] == s["pairs_scored"] == len(expect)
    assert s["pairs_candidates"] == len(from_cand) == unique_pairs(cand).height
    added = len(positives - from_cand)
    assert s["positives"] == {"total": len(positives), "added": added, "cached": len(positives)}
    rows = all_rows(path)
    assert rows.height == len(expect)
    assert set(rows.select("image_id", "caption_id").iter_rows()) == expect
    assert cache.shard_by(cache.read_key(path)) == "image"  # a new cache's layout
    for shard in range(4):  # each row sits in the shard its image hashes to
        part = cache.read_shard(path, shard)
        ids = part["image_id"].to_numpy(), part["caption_id"].to_numpy()
        assert (cache.shard_of(*ids, 4, by="image") == shard).all()
    assert not list(path.glob(".*tmp-*"))
    assert set(s["teacher_score"]) == {"mean", "std", "q05", "q25", "q50", "q75", "q95"}


def test_score_is_log_odds(small_dataset, cands, teacher_dir, tmp_path):
    """The cached score is the ITM log-odds and prob = sigmoid(score) bit for bit; both agree
    with the model's own softmax over its two ITM columns."""
    from teacher.model import load_teacher, match_prob

    s = score(cands[3], teacher_dir, tmp_path, "--shards", "2")
    rows = all_rows(Path(s["cache_path"]))
    got_score, got_prob = rows["score"].to_numpy(), rows["prob"].to_numpy()
    np.testing.assert_array_equal(got_prob, match_prob(got_score))
    np.testing.assert_array_equal(got_prob, torch.sigmoid(torch.tensor(got_score)).numpy())
    ds = Dataset.load(small_dataset)
    paths = dict(ds.images.select("image_id", "path").iter_rows())
    teacher = load_teacher(str(teacher_dir))
    proc = teacher.processor
    for image_id, caption_id, cached, prob in rows.head(12).iter_rows():
        with Image.open(ds.image_path(paths[image_id])) as img:
            pixels = proc.image_processor(images=[img.convert("RGB")], return_tensors="pt")
        tok = proc.tokenizer([ds.captions["caption"][caption_id]], return_tensors="pt")
        with torch.no_grad():
            itm = teacher.model(
                input_ids=tok["input_ids"],
                attention_mask=tok["attention_mask"],
                pixel_values=pixels["pixel_values"],
                use_itm_head=True,
            ).itm_score[0]  # (2,): no match, match
        soft = itm.softmax(-1)
        assert cached == pytest.approx(float(itm[1] - itm[0]), abs=1e-4)
        assert prob == pytest.approx(float(soft[1]), abs=1e-6)
        assert cached == pytest.approx(float(torch.log(soft[1] / soft[0])), abs=1e-4)


def test_old_cache_version_is_refused(cands, teacher_dir, tmp_path):
    """A cache of format version 1 (raw match logits) is refused on every read, with the fix."""
    s = score(cands[3], teacher_dir, tmp_path, "--shards", "2")
    path = Path(s["cache_path"])
    for name in ("key.json", "cache.json"):
        meta = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ValueError, match="version 1 .*raw ITM match logits.*delete"):
        cache.load_scores(path)
    assert_error(run("cache", "verify", path), "version 1", "delete", "score-teacher")
    assert_error(run("cache", "info", path), "version 1", "--cache-dir")
    line = assert_error(
        run(
            "score-teacher",
            "--candidates",
            cands[3],
            "--teacher",
            teacher_dir,
            "--cache-dir",
            tmp_path,
            "--shards",
            "2",
        ),
        "version 1",
    )
    assert f"delete '{path}'" in line and "new --cache-dir" in line
    listed = json.loads(run("cache", "list", tmp_path, "--json").stdout)["caches"]
    assert "version 1" in listed[0]["error"]


def test_shard_of_fixed_values():
    """shard_of is a fixed function of the pair: these values may never change, or an existing
    cache would find a pair in another shard than the one that holds it."""
    images = np.array([0, 0, 1, 7, 123456, 2**31 - 1, 3, 3], dtype=np.int64)
    captions = np.array([0, 1, 0, 35, 654321, 5, 2**40, 4], dtype=np.int64)
    assert cache.shard_of(images, captions, 64).tolist() == [47, 1, 56, 1, 46, 60, 33, 29]
    assert cache.shard_of(images, captions, 7).tolist() == [2, 2, 6, 5, 5, 5, 5, 2]
    assert cache.shard_of(images, captions, 1).tolist() == [0] * 8


def test_shard_of_image_keeps_an_image_in_one_shard():
    """by="image" puts every pair of an image in the shard of (image, caption 0), whatever the
    caption; by="pair" (the older layout) spreads them."""
    images = np.repeat(np.arange(20, dtype=np.int64), 30)
    captions = np.arange(600, dtype=np.int64)
    by_image = cache.shard_of(images, captions, 64, by="image")
    assert (by_image.reshape(20, 30) == by_image.reshape(20, 30)[:, :1]).all()
    np.testing.assert_array_equal(by_image, cache.shard_of(images, np.zeros_like(captions), 64))
    assert len(set(cache.shard_of(images, captions, 64)[:30].tolist())) > 1
    with pytest.raises(ValueError, match="shard_by"):
        cache.shard_of(images, captions, 64, by="caption")


def test_pair_sharded_cache_is_extended_in_its_own_layout(cands, teacher_dir, tmp_path):
    """A cache in the older pair-hashed layout (key.json without shard_by) keeps it: score-teacher
    fills and extends it pair-hashed, verify finds it healthy, and its scores equal those of the
    image-sharded cache (same pairs, same values up to float noise from other batch shapes)."""
    new = score(cands[3], teacher_dir, tmp_path / "new", "--shards", "4")
    new_path = Path(new["cache_path"])
    old_path = tmp_path / "old" / new_path.name  # the same key, the older layout
    old_path.mkdir(parents=True)
    meta = cache.read_key(new_path)
    meta.pop("shard_by")
    (old_path / "key.json").write_text(json.dumps(meta))
    first = score(cands[3], teacher_dir, tmp_path / "old", "--shards", "4")
    assert first["cache_path"] == str(old_path) and first["complete"]
    more = score(cands[5], teacher_dir, tmp_path / "old", "--shards", "4")  # a re-mining round
    assert more["complete"] and 0 < more["pairs_scored"] < more["pairs_total"]
    assert cache.shard_by(cache.read_key(old_path)) == "pair"
    for shard in range(4):
        part = cache.read_shard(old_path, shard)
        ids = part["image_id"].to_numpy(), part["caption_id"].to_numpy()
        assert (cache.shard_of(*ids, 4) == shard).all()
    report = json.loads(run("cache", "verify", old_path, "--json").stdout)
    assert report["healthy"], report
    a = all_rows(new_path)
    b = all_rows(old_path).join(a.select("image_id", "caption_id"), on=["image_id", "caption_id"])
    assert b.height == a.height
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), atol=1e-5)


def test_batched_scores_equal_per_pair(small_dataset, cands, teacher_dir, tmp_path):
    """Cached scores (image encoded once per group) equal one full forward per pair."""
    from teacher.model import load_teacher, score_pairs_naive

    s = score(cands[3], teacher_dir, tmp_path, "--shards", "2", "--batch-size", "3")
    rows = all_rows(Path(s["cache_path"]))
    ds = Dataset.load(small_dataset)
    paths = dict(ds.images.select("image_id", "path").iter_rows())
    teacher = load_teacher(str(teacher_dir))
    for image_id, group in rows.group_by("image_id", maintain_order=True):
        img = Image.open(ds.image_path(paths[image_id[0]])).convert("RGB")
        texts = [ds.captions["caption"][c] for c in group["caption_id"]]
        ref = score_pairs_naive(teacher, img, texts)
        np.testing.assert_allclose(group["score"].to_numpy(), ref.logits[0], atol=1e-4)
        np.testing.assert_allclose(group["prob"].to_numpy(), ref.probs[0], atol=1e-5)


def test_second_run_scores_nothing(cands, teacher_dir, tmp_path):
    """An identical second run reports pairs_scored 0 and skips every shard."""
    first = score(cands[3], teacher_dir, tmp_path, "--shards", "3")
    again = score(cands[3], teacher_dir, tmp_path, "--shards", "3")
    assert again["cache_path"] == first["cache_path"]
    assert again["pairs_scored"] == 0 and again["shards_skipped"] == 3
    assert again["shards_written"] == 0


def test_incremental_after_remine(cands, teacher_dir, tmp_path):
    """A re-mine with a larger k scores only the new pairs, into the same N shards."""
    first = score(cands[3], teacher_dir, tmp_path, "--shards", "4")
    before = all_rows(Path(first["cache_path"]))
    second = score(cands[5], teacher_dir, tmp_path, "--shards", "4")
    assert second["cache_path"] == first["cache_path"]
    new_pairs = load_pair_set(cands[5])[3].pairs.join(
        before.select("image_id", "caption_id"), on=["image_id", "caption_id"], how="anti"
    )
    assert second["pairs_scored"] == new_pairs.height > 0
    after = all_rows(Path(second["cache_path"]))
    assert len(list(Path(second["cache_path"]).glob("shard-*.parquet"))) == 4
    kept = after.join(before, on=["image_id", "caption_id"], how="inner")
    assert (kept["score"] == kept["score_right"]).all()  # old scores untouched
    assert_error(
        run(
            "score-teacher",
            "--candidates",
            cands[5],
            "--teacher",
            teacher_dir,
            "--cache-dir",
            tmp_path,
            "--shards",
            "8",
        ),
        "has 4 shards",
        "--shards 4",
    )


def test_resume_equals_clean_run(cands, teacher_dir, tmp_path):
    """A run that stopped part-way (some shards done, one left mid-write) resumes to a clean run."""
    clean = all_rows(
        Path(score(cands[3], teacher_dir, tmp_path / "a", "--shards", "4")["cache_path"])
    )
    part = score(cands[3], teacher_dir, tmp_path / "b", "--shards", "4", "--shard-ids", "0-1")
    path = Path(part["cache_path"])
    assert not part["complete"] and not (path / "cache.json").exists()
    # What a kill -9 can leave behind: a shard renamed but not yet recorded, and a temporary.
    (path / "shard-00001.json").unlink()
    (path / ".shard-00002.parquet.tmp-999-deadbeef").write_bytes(b"half")
    resumed = score(cands[3], teacher_dir, tmp_path / "b", "--shards", "4")
    assert resumed["complete"]
    assert resumed["pairs_scored"] == clean.height - part["pairs_scored"]
    assert all_rows(path).equals(clean)


def test_workers_share_the_shards(cands, teacher_dir, tmp_path):
    """Two ranks take disjoint shards; the one that completes the set writes the manifest."""
    r0 = score(cands[3], teacher_dir, tmp_path, "--shards", "5", "--rank", "0", "--world-size", "2")
    assert r0["shards_written"] == 3 and not r0["complete"]
    r1 = score(cands[3], teacher_dir, tmp_path, "--shards", "5", "--rank", "1", "--world-size", "2")
    assert r1["shards_written"] == 2 and r1["complete"]
    assert r0["pairs_scored"] + r1["pairs_scored"] == r0["pairs_total"]


def test_busy_shard_is_left_to_its_owner(cands, teacher_dir, tmp_path):
    """A shard locked by another process is skipped, not written twice; a later run finishes it."""
    first = score(cands[3], teacher_dir, tmp_path, "--shards", "2", "--shard-ids", "0")
    path = Path(first["cache_path"])
    with cache.shard_lock(path, 1) as got:
        assert got
        busy = score(cands[3], teacher_dir, tmp_path, "--shards", "2")
    assert busy["shards_busy"] == 1 and not busy["complete"]
    assert not (path / "shard-00001.parquet").exists()
    assert score(cands[3], teacher_dir, tmp_path, "--shards", "2")["complete"]


def test_incremental_run_with_a_busy_shard_is_not_complete(cands, teacher_dir, tmp_path):
    """Re-mined candidates while another process holds a shard: every shard has a marker, but
    that shard lacks the new pairs, so the run says incomplete and leaves no manifest."""
    first = score(cands[3], teacher_dir, tmp_path, "--shards", "2")
    path = Path(first["cache_path"])
    with cache.shard_lock(path, 1) as got:
        assert got
        busy = score(cands[5], teacher_dir, tmp_path, "--shards", "2")
    assert busy["shards_busy"] == 1 and not busy["complete"] and busy["pairs_missing"] > 0
    assert all(cache.read_marker(path, s) for s in range(2))
    assert not (path / "cache.json").exists()  # removed before shard 0 was rewritten
    with pytest.raises(ValueError, match="incomplete"):
        cache.load_scores(path)
    done = score(cands[5], teacher_dir, tmp_path, "--shards", "2")
    assert done["complete"] and done["pairs_missing"] == 0
    assert done["pairs_scored"] == busy["pairs_missing"]


def test_damaged_shard_detected_and_rescored(cands, teacher_dir, tmp_path):
    """A shard whose bytes changed is refused by readers, and score-teacher scores it again."""
    s = score(cands[3], teacher_dir, tmp_path, "--shards", "2")
    path = Path(s["cache_path"])
    clean = all_rows(path)
    f = path / "shard-00000.parquet"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(ValueError, match="shard-00000.parquet.*damaged"):
        cache.load_scores(path)
    again = score(cands[3], teacher_dir, tmp_path, "--shards", "2")
    assert again["pairs_scored"] > 0 and all_rows(path).equals(clean)


def test_cache_list_and_info(cands, teacher_dir, tmp_path):
    """cache list/info say what is cached, for which dataset and teacher, complete or not."""
    s = score(cands[3], teacher_dir, tmp_path, "--shards", "2")
    listed = json.loads(run("cache", "list", tmp_path, "--json").stdout)["caches"]
    assert [e["cache_path"] for e in listed] == [s["cache_path"]]
    info = json.loads(run("cache", "info", s["cache_path"], "--json").stdout)
    assert info["complete"] and info["pairs"] == s["pairs_total"] and info["num_shards"] == 2
    assert info["teacher"]["spec"] == str(teacher_dir)
    text = run("cache", "list", tmp_path)
    assert text.exit_code == 0 and "complete" in text.output
    assert_error(run("cache", "info", cands[3]), "not a teacher cache", "candidates dir")
    assert_error(run("cache", "info", tmp_path), "cache root")


def test_bad_scoring_input(cands, teacher_dir, tmp_path, small_dataset):
    """Bad --shards, a missing candidates dir, an unloadable teacher: one clear line each."""
    base = ["score-teacher", "--cache-dir", tmp_path / "c"]
    assert_error(
        run(*base, "--candidates", cands[3], "--teacher", teacher_dir, "--shards", "0"),
        "--shards",
        "must be >= 1",
    )
    assert_error(
        run(*base, "--candidates", tmp_path / "none", "--teacher", teacher_dir),
        "does not exist",
        "mine-candidates",
    )
    assert_error(
        run(*base, "--candidates", small_dataset, "--teacher", teacher_dir), "not a candidates dir"
    )
    (tmp_path / "empty").mkdir()
    assert_error(
        run(*base, "--candidates", cands[3], "--teacher", tmp_path / "empty"), "not a loadable BLIP"
    )
    assert_error(
        run(*base, "--candidates", cands[3], "--teacher", teacher_dir, "--shard-ids", "3-x"),
        "--shard-ids",
    )
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("shard-*"))


def test_cache_for_other_teacher_is_another_entry(cands, teacher_dir, tmp_path):
    """Another teacher's weights give another cache key: nothing is mixed up."""
    from transformers import BlipForImageTextRetrieval

    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    model = BlipForImageTextRetrieval.from_pretrained(other)
    with torch.no_grad():
        model.itm_head.bias.add_(1.0)
    model.save_pretrained(other)
    a = score(cands[3], teacher_dir, tmp_path / "c", "--shards", "2")
    b = score(cands[3], other, tmp_path / "c", "--shards", "2")
    assert a["cache_path"] != b["cache_path"] and b["pairs_scored"] == b["pairs_total"]
    with pytest.raises(ValueError, match="another dataset"):
        cache.load_scores(Path(a["cache_path"]), fingerprint="0" * 64)


def test_shard_ids_and_rank_parsing(monkeypatch):
    """--shard-ids ranges parse; rank comes from flags, torchrun env, then Slurm arrays."""
    assert parse_shard_ids("0-2,5") == (0, 1, 2, 5)
    with pytest.raises(ValueError, match="--shard-ids"):
        parse_shard_ids("2-a")
    for var in (
        "RANK",
        "WORLD_SIZE",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
    ):
        monkeypatch.delenv(var, raising=False)
    assert resolve_rank(None, None) == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert resolve_rank(None, None) == (1, 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert resolve_rank(None, None) == (2, 4)
    assert resolve_rank(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="--rank"):
        resolve_rank(3, 2)


def test_rerank_matches_naive(small_dataset, teacher_dir, tmp_path):
    """evaluate --rerank-teacher equals a per-pair loop: top-K by cosine, then sorted by ITM score."""
    from pipeline.core.candidates import load_embeddings
    from teacher.model import load_teacher, score_pairs_naive

    k = 4
    result = run(
        "evaluate",
        "--student",
        "tiny",
        "--data",
        small_dataset,
        "--split",
        "train",
        "--json",
        "--rerank-teacher",
        teacher_dir,
        "--rerank-k",
        k,
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])["rerank"]

    assert (
        run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            small_dataset,
            "--out",
            tmp_path / "c",
            "--k",
            "1",
        ).exit_code
        == 0
    )  # the same tiny student's embeddings
    emb = load_embeddings(tmp_path / "c")
    ds = Dataset.load(small_dataset)
    images, captions = ds.split("train")
    owner = [images["image_id"].to_list().index(i) for i in captions["image_id"]]
    teacher = load_teacher(str(teacher_dir))
    pil = [Image.open(ds.image_path(p)).convert("RGB") for p in images["path"]]
    texts = captions["caption"].to_list()

    @functools.cache
    def itm(i: int, c: int) -> float:
        return float(score_pairs_naive(teacher, pil[i], [texts[c]]).logits[0][0])

    sim = emb.image @ emb.caption.T
    i2t, t2i = [], []
    for i in range(len(pil)):
        top = np.argsort(-sim[i])[:k]
        order = sorted(top, key=lambda c: -itm(i, c))
        hits = [n for n, c in enumerate(order) if owner[c] == i]
        i2t.append(hits[0] if hits else 10**6)
    for c in range(len(texts)):
        top = np.argsort(-sim[:, c])[:k]
        order = sorted(top, key=lambda i: -itm(i, c))
        hits = [n for n, i in enumerate(order) if i == owner[c]]
        t2i.append(hits[0] if hits else 10**6)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for r in (1, 5, 10):
            assert got[f"{name}_R@{r}"] == pytest.approx(100 * np.mean(np.array(ranks) < r))
