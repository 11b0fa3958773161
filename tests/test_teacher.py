"""The BLIP teacher: loading, identity, grouped scoring against the naive reference, training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from teacher.model import (  # noqa: E402
    LoadedTeacher,
    load_teacher,
    score_grouped,
    score_pairs_naive,
)
from teacher.tiny import build_tiny_teacher  # noqa: E402

CAPTIONS = [
    "a red circle to the left of a blue square",
    "a blue circle to the left of a red square",
    "a red square above a blue circle",
    "the green triangle is below the yellow star",
]


def _images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_dir_master(tmp_path_factory) -> Path:
    """A tiny random BLIP ITM model saved with save_pretrained (built once per session)."""
    torch.manual_seed(0)
    model, processor = build_tiny_teacher(CAPTIONS, image_size=32, hidden_size=32)
    out = tmp_path_factory.mktemp("tiny") / "teacher"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture
def tiny_dir(tiny_dir_master: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny teacher directory."""
    return Path(shutil.copytree(tiny_dir_master, tmp_path / "teacher"))


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dir_master: Path) -> LoadedTeacher:
    """The session's tiny teacher, loaded (read-only use)."""
    return load_teacher(str(tiny_dir_master), device="cpu")


def test_load_teacher_frozen_with_identity(tiny_teacher: LoadedTeacher, tiny_dir_master: Path):
    """A saved tiny BLIP loads frozen in eval mode, with a complete cache identity."""
    assert not tiny_teacher.model.training
    assert not any(p.requires_grad for p in tiny_teacher.model.parameters())
    ident = tiny_teacher.identity
    assert ident["spec"] == str(tiny_dir_master)
    assert len(ident["weights_sha256"]) == 64
    assert ident["preprocessing"]["image_size"] == [32, 32]
    assert ident["preprocessing"]["max_text_length"] == 32
    assert len(ident["preprocessing"]["image_mean"]) == 3
    assert ident["precision"] == "fp32"
    json.dumps(ident)  # the cache writes it as JSON


def test_tokenizer_knows_real_words(tiny_teacher: LoadedTeacher):
    """Caption words map to real ids, never [UNK] (transformers 5 ignores BertTokenizer(vocab_file=))."""
    tok = tiny_teacher.processor.tokenizer
    ids = tok("A red circle to the left of a blue square")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == [
        "[CLS]",
        "a",
        "red",
        "circle",
        "to",
        "the",
        "left",
        "of",
        "a",
        "blue",
        "square",
        "[SEP]",
    ]
    assert tok.unk_token_id not in ids
    # An unseen word falls back to known characters, not to [UNK].
    assert tok.unk_token_id not in tok("a reed")["input_ids"]


def test_save_load_round_trip_same_scores(
    tiny_teacher: LoadedTeacher, tiny_dir: Path, tmp_path: Path
):
    """Re-saving a loaded teacher gives identical weights hash and identical scores."""
    again = tmp_path / "again"
    tiny_teacher.model.save_pretrained(again)
    tiny_teacher.processor.save_pretrained(again)
    reloaded = load_teacher(str(again), device="cpu")
    assert reloaded.identity["weights_sha256"] == tiny_teacher.identity["weights_sha256"]
    images, caps = _images(2), [CAPTIONS[:3], CAPTIONS[1:]]
    a = score_grouped(tiny_teacher, images, caps)
    b = score_grouped(reloaded, images, caps)
    for x, y in zip(a.logits, b.logits, strict=True):
        np.testing.assert_array_equal(x, y)


def test_weights_hash_changes_with_weights(tiny_dir: Path):
    """Changing one weight changes weights_sha256 (the cache key must follow the weights)."""
    from transformers import BlipForImageTextRetrieval

    before = load_teacher(str(tiny_dir), device="cpu").identity["weights_sha256"]
    model = BlipForImageTextRetrieval.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.itm_head.bias[0] += 1.0
    model.save_pretrained(tiny_dir)
    assert load_teacher(str(tiny_dir), device="cpu").identity["weights_sha256"] != before


def test_score_grouped_matches_naive(tiny_teacher: LoadedTeacher):
    """Grouped scoring (vision once per image) equals one full forward per pair, pair for pair."""
    images = _images(4, seed=1)
    caps = [CAPTIONS, [CAPTIONS[2]], [], [CAPTIONS[3], CAPTIONS[0], "a blue square"]]
    grouped = score_grouped(tiny_teacher, images, caps, batch_size=3)  # batches cross images
    assert [len(x) for x in grouped.logits] == [4, 1, 0, 3]
    for image, texts, logits, probs in zip(
        images, caps, grouped.logits, grouped.probs, strict=True
    ):
        naive = score_pairs_naive(tiny_teacher, image, texts)
        assert logits.dtype == np.float32 and probs.dtype == np.float32
        np.testing.assert_allclose(logits, naive.logits[0], atol=1e-5)
        np.testing.assert_allclose(probs, naive.probs[0], atol=1e-5)
        assert ((probs > 0) & (probs < 1)).all()
    assert np.ptp(np.concatenate(grouped.logits)) > 0  # not a constant: the test can fail


def test_score_grouped_rejects_mismatched_lists(tiny_teacher: LoadedTeacher):
    """One caption list per image is required."""
    with pytest.raises(ValueError, match="one list of captions"):
        score_grouped(tiny_teacher, _images(2), [CAPTIONS])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p / "missing", "no such file or directory"),
        (lambda p: p, "no config.json"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "not a model directory"),
        (
            lambda p: (p / "config.json").write_text('{"model_type": "bert"}') and p,
            "model_type 'bert'",
        ),
    ],
)
def test_load_teacher_refuses_non_models(tmp_path: Path, make, reason: str):
    """A missing path or a directory that is not a BLIP ITM model is a one-line ValueError."""
    spec = str(make(tmp_path))
    with pytest.raises(ValueError) as err:
        load_teacher(spec)
    msg = str(err.value)
    assert "\n" not in msg and reason in msg
    assert msg.startswith(f"teacher '{spec}' is not a loadable BLIP image-text-matching model (")
    assert "`cprd train-teacher` or a Salesforce/blip-itm-* checkpoint" in msg


def test_load_teacher_refuses_blip_without_itm_head(tiny_dir: Path):
    """A BLIP checkpoint lacking ITM weights is refused, not loaded with a random head."""
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_dir / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("itm_head")},
        tiny_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="weights missing from the checkpoint: itm_head"):
        load_teacher(str(tiny_dir))
