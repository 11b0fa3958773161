"""Model specs: tiny, open_clip name + local checkpoint, cprd student directories, errors."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may download

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from student.models import (  # noqa: E402
    TINY_MODEL_CFG,
    LoadedModel,
    load_model,
    load_student,
    save_student,
)
from student.storage import STUDENT_JSON  # noqa: E402

TEST_ARCH = "cprd-test-tiny"  # registered with open_clip below, like a built-in name


def images(n: int = 2, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)
    ]


def encode(loaded: LoadedModel, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) normalised image and text embeddings through the loaded preprocess and tokenizer."""
    pixels = torch.stack([loaded.preprocess(im) for im in images(len(captions))])  # (N, 3, H, W)
    with torch.no_grad():
        return (
            loaded.model.encode_image(pixels, normalize=True),
            loaded.model.encode_text(loaded.tokenizer(captions), normalize=True),
        )


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    """The built-in tiny model, seeded."""
    torch.manual_seed(0)
    return load_model("tiny")


def test_tiny_encodes_to_unit_vectors(tiny):
    """`tiny` is a real open_clip CLIP in eval mode whose embeddings are unit-norm of embed_dim."""
    assert isinstance(tiny.model, open_clip.CLIP) and not tiny.model.training
    img, txt = encode(tiny, ["a red circle left of a blue square", "a blue square"])
    dim = TINY_MODEL_CFG["embed_dim"]
    assert img.shape == txt.shape == (2, dim)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(2))
    assert tiny.preprocess(images(1)[0]).shape == (3, 64, 64)
    assert tiny.identity["spec"] == "tiny" and len(tiny.identity["weights_sha256"]) == 64


def test_tiny_tokenizer_knows_real_words(tiny):
    """The open_clip BPE tokenizer gives distinct known ids to real words and decodes them back."""
    tokens = tiny.tokenizer(["red circle", "blue square"])  # (2, L)
    assert tokens.shape == (2, TINY_MODEL_CFG["text_cfg"]["context_length"])
    assert tokens.dtype == torch.long
    ids = [tiny.tokenizer.encode(w) for w in ("red", "blue", "circle", "square")]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 4
    assert tiny.tokenizer.decode(tiny.tokenizer.encode("red circle")).strip() == "red circle"


def test_tiny_is_seeded_by_global_rng():
    """Same torch seed, same weights hash; another seed, another hash."""
    hashes = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        hashes.append(load_model("tiny").identity["weights_sha256"])
    assert hashes[0] == hashes[1] != hashes[2]


def test_open_clip_name_with_local_checkpoint(tmp_path):
    """NAME:/path.pt builds the architecture through open_clip and loads exactly those weights."""
    cfg_file = tmp_path / f"{TEST_ARCH}.json"
    cfg_file.write_text(json.dumps(TINY_MODEL_CFG))
    open_clip.add_model_config(cfg_file)
    torch.manual_seed(3)
    model = open_clip.create_model(TEST_ARCH)
    state = model.state_dict()
    state["logit_scale"] = torch.tensor(1.234)
    state["text_projection"] = torch.randn_like(state["text_projection"])
    ckpt = tmp_path / "ckpt.pt"
    torch.save(state, ckpt)

    loaded = load_model(f"{TEST_ARCH}:{ckpt}")
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    assert loaded.identity["pretrained"] == str(ckpt)
    assert loaded.identity["weights_hash_of"] == "file:ckpt.pt"
    assert loaded.model_cfg["embed_dim"] == TINY_MODEL_CFG["embed_dim"]
    img, txt = encode(loaded, ["one", "two"])
    assert img.shape == txt.shape == (2, TINY_MODEL_CFG["embed_dim"])


def test_save_and_load_student_round_trip(tmp_path):
    """save_student -> load_student (and load_model on the dir) gives identical embeddings."""
    torch.manual_seed(0)
    tiny = load_model("tiny")  # a private one: this test changes its weights
    with torch.no_grad():
        tiny.model.logit_scale.fill_(2.5)  # a trained-looking change the reload must carry
    out = save_student(
        tiny.model, tiny.model_cfg, tmp_path / "stu", base_spec="tiny", train_cfg={"epochs": 1}
    )
    meta = json.loads((out / STUDENT_JSON).read_text())
    assert meta["format"] == "cprd-student" and meta["version"] == 1
    assert meta["base_spec"] == "tiny" and meta["image_size"] == [64, 64]
    assert meta["context_length"] == 32 and meta["train_cfg"] == {"epochs": 1}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left

    captions = ["a green triangle", "a red circle above a square"]
    want = encode(tiny, captions)
    for reloaded in (load_student(out), load_model(str(out))):
        assert reloaded.identity["kind"] == "cprd-student"
        assert reloaded.identity["weights_sha256"] == meta["weights_sha256"]
        assert reloaded.model.logit_scale.item() == pytest.approx(2.5)
        got = encode(reloaded, captions)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_student_with_replaced_weights_is_refused(tiny, tmp_path):
    """A model.pt that no longer matches student.json's sha256 is refused."""
    out = save_student(tiny.model, tiny.model_cfg, tmp_path / "stu", base_spec="tiny")
    torch.save({}, out / "model.pt")
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_student(out)


def test_spec_errors(tmp_path):
    """Each bad spec raises one clear error naming the spec and the fix."""
    with pytest.raises(ValueError, match="model spec is empty; pass `tiny`"):
        load_model("  ")
    with pytest.raises(ValueError, match=r"unknown model 'ViT-Nope' .*e\.g\. ViT-B-32"):
        load_model("ViT-Nope")
    missing = tmp_path / "nope.pt"
    with pytest.raises(
        FileNotFoundError, match=f"checkpoint '{missing}' in model spec .* does not exist"
    ):
        load_model(f"ViT-B-32:{missing}")
    with pytest.raises(ValueError, match="unknown pretrained tag 'no_such_tag' for ViT-B-32"):
        load_model("ViT-B-32:no_such_tag")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a cprd student directory \\(no student.json\\)"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such directory or model"):
        load_model(str(tmp_path / "runs" / "missing"))
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; name the architecture"):
        load_model(str(tmp_path / "w.pt"))
