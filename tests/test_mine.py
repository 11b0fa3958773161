"""Stage 1 (mine-candidates) and evaluate, through the CLI on real files and the tiny student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import assert_error, run

from pipeline.core.candidates import load_candidates, load_embeddings
from pipeline.core.dataset import Dataset
from pipeline.core.metrics import retrieval_metrics


def mine(data: Path, out: Path, *extra) -> dict:
    result = run(
        "mine-candidates", "--student", "tiny", "--data", data, "--out", out, "--json", *extra
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mined(small_dataset, tmp_path_factory) -> Path:
    """Candidates of the small dataset's train split, k=5, mined once for this module."""
    out = tmp_path_factory.mktemp("mined") / "cand"
    mine(small_dataset, out, "--k", "5", "--split", "train")
    return out


def test_candidates_are_exact_topk(small_dataset, mined):
    """Every query has exactly k candidates, equal to torch.topk over the saved embeddings."""
    manifest, cand = load_candidates(mined)
    emb = load_embeddings(mined)
    images, captions = Dataset.load(small_dataset).split("train")
    assert emb.image_ids.tolist() == images["image_id"].to_list()
    assert emb.caption_ids.tolist() == captions["caption_id"].to_list()
    np.testing.assert_allclose(np.linalg.norm(emb.image, axis=1), 1.0, atol=1e-5)

    sim = torch.from_numpy(emb.image @ emb.caption.T)  # (N, M)
    for direction, scores, q_ids, g_ids in (
        ("i2t", sim, emb.image_ids, emb.caption_ids),
        ("t2i", sim.T, emb.caption_ids, emb.image_ids),
    ):
        rows = cand.filter(pl.col("direction") == direction).sort("query_id", "rank")
        assert rows.height == len(q_ids) * 5
        ref_s, ref_i = torch.topk(scores, 5, dim=1)
        got_ids = rows["candidate_id"].to_numpy().reshape(len(q_ids), 5)
        assert (got_ids == g_ids[ref_i.numpy()]).all()
        got_s = rows["score"].to_numpy().reshape(len(q_ids), 5)
        np.testing.assert_allclose(got_s, ref_s.numpy(), atol=1e-5)
        assert rows["rank"].to_list() == list(range(5)) * len(q_ids)
        assert sorted(set(rows["query_id"].to_list())) == sorted(q_ids.tolist())
    assert manifest["counts"]["i2t"] == 12 * 5 and manifest["k_used"] == {"i2t": 5, "t2i": 5}
    assert manifest["dataset"]["fingerprint"] == Dataset.load(small_dataset).fingerprint


def test_positives_flagged(small_dataset, mined):
    """is_positive is true exactly for ground-truth pairs, in both directions."""
    _, cand = load_candidates(mined)
    owner = dict(Dataset.load(small_dataset).captions.select("caption_id", "image_id").iter_rows())
    for direction, q, c, pos in cand.select(
        "direction", "query_id", "candidate_id", "is_positive"
    ).iter_rows():
        image, caption = (q, c) if direction == "i2t" else (c, q)
        assert pos == (owner[caption] == image)


def test_remine_reuses_embeddings(small_dataset, mined, tmp_path):
    """A re-mine with another k reuses the embeddings (no encoding) and gives a top-k prefix."""
    out = tmp_path / "again"
    result = run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        small_dataset,
        "--out",
        out,
        "--k",
        "3",
        "--embeddings-from",
        mined,
    )
    assert result.exit_code == 0, result.output
    assert "reusing embeddings" in result.stderr and "encoding images" not in result.stderr
    _, small = load_candidates(out)
    _, big = load_candidates(mined)
    key = ["direction", "query_id", "rank"]
    prefix = big.filter(pl.col("rank") < 3).sort(key)
    assert (
        small.sort(key).select(key + ["candidate_id"]).equals(prefix.select(key + ["candidate_id"]))
    )

    result = run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        small_dataset,
        "--out",
        out,
        "--k",
        "4",
        "--overwrite",
    )
    assert result.exit_code == 0 and "reusing embeddings" in result.stderr
    assert load_candidates(out)[0]["k"] == 4


def test_k_clamped_with_warning(small_dataset, tmp_path):
    """k larger than the gallery keeps the whole gallery and warns."""
    summary = mine(small_dataset, tmp_path / "c", "--split", "val", "--k", "50")
    assert summary["k_used"] == {"i2t": summary["counts"]["captions"], "t2i": 6}
    result = run(
        "mine-candidates",
        "--student",
        "tiny",
        "--data",
        small_dataset,
        "--out",
        tmp_path / "d",
        "--split",
        "val",
        "--k",
        "50",
    )
    assert "--k 50 is more than the 6 images" in result.stderr


def test_approximate_index_reports_recall(small_dataset, tmp_path):
    """--index hnsw writes its measured recall against exact search into the manifest."""
    summary = mine(small_dataset, tmp_path / "c", "--index", "hnsw", "--k", "4")
    assert set(summary["index_recall"]) == {"i2t", "t2i"}
    assert all(0.0 <= r <= 1.0 for r in summary["index_recall"].values())


def test_target_recall_tunes_and_records_the_index(small_dataset, tmp_path):
    """--target-recall tunes nprobe per direction; the manifest records the index, its settings
    as used, the sampled recall (>= the target) and every setting tried; flat records 1.0."""
    summary = mine(
        small_dataset, tmp_path / "c", "--index", "ivf", "--nlist", "2", "--target-recall", "0.9"
    )
    manifest, _ = load_candidates(tmp_path / "c")
    assert manifest["index"] == summary["index"] == "ivf"
    assert manifest["config"]["target_recall"] == 0.9 and manifest["config"]["nlist"] == 2
    for direction in ("i2t", "t2i"):
        report = manifest["index_search"][direction]
        assert report["settings"]["nlist"] == 2 and report["settings"]["nprobe"] in (1, 2)
        assert report["reached"] and report["recall"] >= 0.9
        assert report["recall"] == manifest["index_recall"][direction]
        assert report["tried"][-1] == {
            "nprobe": report["settings"]["nprobe"],
            "recall": report["recall"],
        }
        assert summary["index_settings"][direction] == report["settings"]
    flat = mine(small_dataset, tmp_path / "f", "--k", "3")
    assert flat["index_recall"] == {"i2t": 1.0, "t2i": 1.0} and flat["index"] == "flat"


def test_student_dir_spec(small_dataset, tmp_path):
    """A saved student directory is a model spec: it mines the same as the model it saved."""
    from student.models import TINY_MODEL_CFG, load_model, save_student

    torch.manual_seed(0)
    save_student(load_model("tiny").model, TINY_MODEL_CFG, tmp_path / "stu", base_spec="tiny")
    mine(small_dataset, tmp_path / "a", "--k", "3", "--seed", "0")
    mine(small_dataset, tmp_path / "b", "--k", "3", "--student", tmp_path / "stu")
    a, b = load_embeddings(tmp_path / "a"), load_embeddings(tmp_path / "b")
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)


BAD_MINING = [
    (["--k", "0"], ["--k must be >= 1"]),
    (["--split", "dev"], ["unknown split 'dev'"]),
    (["--student", "NoSuchModel-B-99"], ["NoSuchModel-B-99"]),
    (["--batch-size", "0"], ["--batch-size", "must be >= 1"]),
    (["--embeddings-from", "/nonexistent/cand"], ["/nonexistent/cand", "does not exist"]),
    (
        ["--index", "ivf", "--target-recall", "1.5"],
        ["--target-recall must be in (0, 1], got 1.5; e.g. 0.95"],
    ),
    (["--index", "ivf", "--nprobe", "0"], ["--nprobe must be >= 1, got 0"]),
    (
        ["--index", "hnsw", "--nlist", "8"],
        ["--nlist applies to --index ivf, not hnsw; drop it or pass --index ivf"],
    ),
]


@pytest.mark.parametrize("extra,fragments", BAD_MINING, ids=[" ".join(b[0]) for b in BAD_MINING])
def test_bad_mining_input(small_dataset, tmp_path, extra, fragments):
    """Each bad mining input gives exit 1 and one Error line; nothing is written."""
    out = tmp_path / "cand"
    assert_error(
        run("mine-candidates", "--student", "tiny", "--data", small_dataset, "--out", out, *extra),
        *fragments,
    )
    assert not out.exists()


def test_mining_refuses_missing_and_existing(small_dataset, mined, tmp_path):
    """A missing dataset and an existing --out are clear errors."""
    assert_error(
        run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            tmp_path / "nope",
            "--out",
            tmp_path / "c",
        ),
        "does not exist",
    )
    assert_error(
        run("mine-candidates", "--student", "tiny", "--data", small_dataset, "--out", mined),
        "--overwrite",
    )


def test_embeddings_from_other_split_refused(small_dataset, mined, tmp_path):
    """Embeddings mined for another split are refused, not silently reused."""
    assert_error(
        run(
            "mine-candidates",
            "--student",
            "tiny",
            "--data",
            small_dataset,
            "--out",
            tmp_path / "c",
            "--split",
            "val",
            "--embeddings-from",
            mined,
        ),
        "--embeddings-from",
        "another dataset, split or model",
    )


def test_tampered_candidates_detected(mined, tmp_path):
    """A candidates file that no longer matches its checksum is refused naming the file."""
    import shutil

    copy = tmp_path / "cand"
    shutil.copytree(mined, copy)
    with open(copy / "candidates.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="candidates.parquet.*checksum"):
        load_candidates(copy)


def test_evaluate_matches_reference(small_dataset, tmp_path):
    """evaluate --json equals retrieval_metrics over the full similarity of the same embeddings."""
    result = run(
        "evaluate", "--student", "tiny", "--data", small_dataset, "--split", "train", "--json"
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    mine(small_dataset, tmp_path / "c", "--k", "2")  # same model (tiny, seed 0) and split
    emb = load_embeddings(tmp_path / "c")
    images, captions = Dataset.load(small_dataset).split("train")
    row = {i: r for r, i in enumerate(images["image_id"].to_list())}
    owner = [row[i] for i in captions["image_id"].to_list()]
    ref = retrieval_metrics(emb.image @ emb.caption.T, owner)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key
    assert got["images"] == 12


def test_evaluate_table_and_errors(small_dataset):
    """evaluate prints a table; a bad split and --rerank-teacher (not built yet) are clear errors."""
    result = run("evaluate", "--student", "tiny", "--data", small_dataset, "--split", "test")
    assert result.exit_code == 0 and "rsum" in result.output and "dual-encoder" in result.output
    assert_error(
        run("evaluate", "--student", "tiny", "--data", small_dataset, "--split", "nope"),
        "unknown split",
    )
