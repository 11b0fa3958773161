"""Frozen-tower feature caching: the store, the model's feature path, encoding and training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

from pipeline.core.dataset import Dataset
from pipeline.torchkit.encode import encode_images, encode_texts, frozen_features
from pipeline.torchkit.features import FeatureStore, file_keys, image_key, text_keys
from student.models import load_model, load_student, save_student

CAPTIONS = ["a dog runs on the grass .", "two children play in the water", "a red car"]


def pictures(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(n)]


def counting(calls: list):
    def compute(rows: list[int]) -> list[np.ndarray]:
        calls.append(list(rows))
        return [np.full((1 + r % 3, 4), r, dtype=np.float16) for r in rows]

    return compute


def test_store_computes_each_key_once_and_persists(tmp_path):
    ident = {"tower": "test", "v": 1}
    calls: list = []
    store = FeatureStore(ident, tmp_path)
    keys = ["a", "b", "a", "c"]
    items = store.get(keys, counting(calls), batch_size=2)
    assert calls == [[0, 1], [3]]  # "a" once, in batches of at most 2
    assert [x.shape for x in items] == [(1, 4), (2, 4), (1, 4), (1, 4)]  # variable first dim
    assert items[3][0, 0] == 3 and (store.hits, store.misses) == (0, 3)  # nothing on disk yet
    assert json.loads((store.dir / "tower.json").read_text()) == ident

    again = FeatureStore(ident, tmp_path)  # another process: reads the parts back
    more: list = []
    items2 = again.get(["c", "b", "d"], counting(more))
    assert more == [[2]] and (again.hits, again.misses) == (2, 1)
    np.testing.assert_array_equal(items2[1], items[1])
    other = FeatureStore({"tower": "test", "v": 2}, tmp_path)  # another tower: its own folder
    assert len(other) == 0 and other.dir != store.dir


def test_store_ignores_a_damaged_part(tmp_path):
    store = FeatureStore({"t": 1}, tmp_path)
    store.get(["a"], counting([]))
    (store.dir / "part-broken.npz").write_bytes(b"not a zip")
    calls: list = []
    again = FeatureStore({"t": 1}, tmp_path)
    again.get(["a", "b"], counting(calls))
    assert calls == [[1]]


def test_keys_follow_content(tmp_path):
    a, b = pictures(2)
    assert image_key(a) == image_key(a.copy()) != image_key(b)
    assert text_keys(["x", "x ", "x"]) == [text_keys(["x"])[0], text_keys(["x "])[0]] + text_keys(
        ["x"]
    )
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    ka, kb = file_keys([tmp_path / "a.png", tmp_path / "b.png"])
    assert ka != kb and len(ka) == 64


@pytest.fixture(scope="module")
def effnet():
    return load_model("effnet-minilm")


def test_model_takes_features_in_place_of_inputs(effnet):
    """encode_image/encode_text on tower features equal the full towers."""
    model = effnet.model
    pixels = torch.stack([effnet.preprocess(im) for im in pictures()])
    tokens = effnet.tokenizer(CAPTIONS)
    with torch.no_grad():
        via_pixels = model.encode_image(pixels, normalize=True)
        via_feats = model.encode_image(model.tower_features("image", pixels), normalize=True)
        via_tokens = model.encode_text(tokens, normalize=True)
        via_text = model.encode_text(model.tower_features("text", tokens), normalize=True)
    torch.testing.assert_close(via_feats, via_pixels, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_text, via_tokens, atol=1e-5, rtol=1e-5)
    assert model.tower_features("image", pixels).shape == (3, 1280)
    assert model.feature_identity("image")["tower"] == "image"


def test_trainable_towers_have_no_cached_features():
    loaded = load_model("effnet-minilm:unfreeze-image=1,text-layers=1,text-width=32")
    assert loaded.model.feature_identity("image") is None
    assert loaded.model.feature_identity("text") is None
    assert frozen_features(loaded.model, "image", [], loaded.preprocess) is None


def test_encoding_through_the_cache_matches_and_hits(effnet, tmp_path):
    paths = []
    for i, im in enumerate(pictures()):
        im.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    cache = tmp_path / "cache"
    kw = {"progress": False, "cache": cache, "device": torch.device("cpu")}
    img = encode_images(effnet.model, effnet.preprocess, paths, **kw)
    cap = encode_texts(effnet.model, effnet.tokenizer, CAPTIONS, **kw)
    with torch.no_grad():
        pixels = torch.stack([effnet.preprocess(Image.open(p).convert("RGB")) for p in paths])
        ref_img = effnet.model.encode_image(pixels, normalize=True).numpy()
        ref_cap = effnet.model.encode_text(effnet.tokenizer(CAPTIONS), normalize=True).numpy()
    # Features are stored as float16: embeddings agree to about 1e-3.
    np.testing.assert_allclose(img, ref_img, atol=3e-3)
    np.testing.assert_allclose(cap, ref_cap, atol=3e-3)
    stores = list(cache.iterdir())
    assert len(stores) == 2  # one image store, one text store
    parts = sorted(str(p) for p in cache.rglob("part-*.npz"))
    encode_images(effnet.model, effnet.preprocess, paths, **kw)  # all hits: no new part
    frozen_features(effnet.model, "text", CAPTIONS, effnet.tokenizer, **kw)
    assert sorted(str(p) for p in cache.rglob("part-*.npz")) == parts


def test_scratch_text_tower_spec(tmp_path):
    spec = "effnet-minilm:text-layers=2,text-width=64,seed=3"
    a, b = load_model(spec), load_model(spec)
    text_params = sum(p.numel() for p in a.model.text.parameters())
    minilm = 22_000_000  # MiniLM-L6's text tower, for scale
    assert text_params < minilm / 5
    assert all(p.requires_grad for p in a.model.text.parameters())
    assert not any(p.requires_grad for p in a.model.visual.trunk.parameters())
    for (n, p), (_, q) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), n  # the seed fixes the from-scratch init
    c = load_model("effnet-minilm:text-layers=2,text-width=64,seed=4")
    assert not torch.equal(a.model.text.token_embedding.weight, c.model.text.token_embedding.weight)
    tokens = a.tokenizer(CAPTIONS)
    vocab = a.tokenizer.tokenizer
    assert vocab.unk_token_id not in tokens[0].tolist()  # real words are known
    assert a.identity["weights_sha256"] != load_model("effnet-minilm").identity["weights_sha256"]
    # Padding does not change a caption's embedding (causal attention, pooled at [SEP]).
    with torch.no_grad():
        one = a.model.encode_text(a.tokenizer(CAPTIONS[:1]), normalize=True)
        padded = a.model.encode_text(tokens, normalize=True)[:1]
    torch.testing.assert_close(one, padded, atol=1e-5, rtol=1e-5)

    save_student(a.model, a.model_cfg, tmp_path / "s", base_spec=spec)
    back = load_student(tmp_path / "s")
    with torch.no_grad():
        again = back.model.encode_text(back.tokenizer(CAPTIONS), normalize=True)
        first = a.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(again, first)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("effnet-minilm:text-layers=2,unfreeze-text=1", "pass one of them"),
        ("effnet-minilm:text-layers=2,text-width=100", "pass a multiple of 32"),
        ("effnet-minilm:text-width=0", "text-width='0'"),
    ],
)
def test_bad_text_options(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_model(spec)


def test_train_student_computes_features_once(small_dataset, tmp_path):
    """A frozen image tower's features are computed in the first run and only read after."""
    cache = tmp_path / "features"
    ds = Dataset.load(small_dataset)
    common = ["--data", small_dataset, "--student", "effnet-minilm:text-layers=1,text-width=32"]
    common += ["--epochs", "1", "--batch-size", "4", "--loss", "none", "--batching", "random"]
    common += ["--feature-cache", cache, "--json"]
    first = run("train-student", *common, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    parts = sorted(cache.rglob("part-*.npz"))
    assert parts, "no features were cached"
    store = FeatureStore(json.loads(next(cache.glob("*/tower.json")).read_text()), cache)
    assert len(store) == ds.images.height  # every image once, whatever the epochs and val
    second = run("train-student", *common, "--out", tmp_path / "b")
    assert second.exit_code == 0, second.output
    assert sorted(cache.rglob("part-*.npz")) == parts  # nothing recomputed
    result = run(
        "evaluate",
        "--data",
        small_dataset,
        "--student",
        tmp_path / "b",
        "--split",
        "test",
        "--json",
    )
    assert result.exit_code == 0, result.output
