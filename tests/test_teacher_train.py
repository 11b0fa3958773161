"""Teacher training: losses, hard-negative mining, neighbour batches, and a short real run."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from teacher.batches import lexical_neighbours, neighbour_batches  # noqa: E402
from teacher.losses import blip_itc_loss, blip_losses, sample_hard_negatives  # noqa: E402
from teacher.model import load_teacher  # noqa: E402
from teacher.tiny import build_tiny_teacher  # noqa: E402
from teacher.train import TeacherTrainConfig, train_teacher  # noqa: E402


def test_itc_loss_is_clip_loss_for_distinct_images():
    """With one caption per image, ITC is CLIP's symmetric cross-entropy on the diagonal."""
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    target = torch.arange(5)
    expected = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
    torch.testing.assert_close(blip_itc_loss(sim, torch.eye(5, dtype=torch.bool)), expected)


def test_itc_loss_shares_target_between_captions_of_one_image():
    """Two captions of one image are both positives (soft target 1/2), never each other's negatives."""
    sim = torch.zeros(3, 3)
    positive = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    # Uniform scores: i2t rows with 2 positives lose log 3 - 0; check against a by-hand value.
    expected = torch.tensor(3.0).log()
    torch.testing.assert_close(blip_itc_loss(sim, positive), expected)
    with pytest.raises(ValueError, match="same \\(B, B\\) shape"):
        blip_itc_loss(sim, positive[:2])


def test_hard_negatives_never_positive_and_follow_similarity():
    """Sampled negatives avoid positives; a much more similar negative is drawn almost always."""
    gen = torch.Generator().manual_seed(0)
    positive = torch.eye(4, dtype=torch.bool)
    positive[0, 1] = True  # caption 1 also describes image 0
    sim = torch.zeros(4, 4)
    sim[0, 2] = 20.0  # image 0 confuses caption 2
    rows, cols = sample_hard_negatives(sim, positive, k=1, generator=gen)
    assert rows.tolist() == [0, 1, 2, 3]
    assert not positive[rows, cols].any()
    assert cols[0].item() == 2
    rows, cols = sample_hard_negatives(sim, positive, k=5, generator=gen)
    assert len(rows) == 2 + 3 + 3 + 3  # capped at the negatives each row has
    assert not positive[rows, cols].any()


def test_lexical_neighbour_batches_keep_word_groups_together():
    """Images whose captions share the same words share a batch; every image appears once."""
    colours = ["red", "blue", "green", "yellow", "purple", "white", "orange", "cyan"]
    shapes = ["circle", "square", "star", "cross"]
    texts = []
    for g in range(8):  # 8 groups of 4 images with one bag of words per group
        a, b, x, y = colours[g], colours[(g + 3) % 8], shapes[g % 4], shapes[(g + 1) % 4]
        for first, second in [
            (f"{a} {x}", f"{b} {y}"),
            (f"{b} {x}", f"{a} {y}"),
            (f"{a} {y}", f"{b} {x}"),
            (f"{b} {y}", f"{a} {x}"),
        ]:
            texts.append([f"a {first} left of a {second}", f"the {second} is right of the {first}"])
    nb = lexical_neighbours(texts, k=6)
    group = np.arange(32) // 4
    assert (group[nb[:, :3]] == group[:, None]).all()
    batches = neighbour_batches(nb, batch_size=8, group_size=4, rng=np.random.default_rng(1))
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(32))
    assert all(len(set(group[b])) == 2 for b in batches)  # two whole groups per batch


def _scene(left: tuple[int, int, int], right: tuple[int, int, int]) -> torch.Tensor:
    """(3, 32, 32) a dark image with a coloured square on the left and one on the right."""
    img = torch.full((3, 32, 32), -1.0)
    img[:, 12:20, 4:12] = torch.tensor(left, dtype=torch.float)[:, None, None] / 127.5 - 1
    img[:, 12:20, 20:28] = torch.tensor(right, dtype=torch.float)[:, None, None] / 127.5 - 1
    return img


def test_losses_decrease_on_a_fixed_batch():
    """Optimiser steps on one batch lower the ITC and ITM losses (gradients reach both heads)."""
    torch.manual_seed(0)
    red, blue, green, yellow = (230, 30, 30), (40, 80, 245), (30, 200, 50), (245, 225, 30)
    scenes = [(red, blue), (blue, red), (green, yellow), (yellow, green)]
    texts = [
        "a red square left of a blue square",
        "a blue square left of a red square",
        "a green square left of a yellow square",
        "a yellow square left of a green square",
    ]
    model, processor = build_tiny_teacher(
        texts, image_size=32, hidden_size=32, vision_layers=1, text_layers=1
    )
    pixels = torch.stack([_scene(a, b) for a, b in scenes])
    tok = processor.tokenizer(
        texts, padding="longest", return_tensors="pt", return_token_type_ids=False
    )
    positive = torch.eye(4, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        terms = blip_losses(
            model,
            pixels,
            tok["input_ids"],
            tok["attention_mask"],
            positive,
            temperature=0.07,
            num_hard_negatives=1,
            num_random_negatives=1,
            generator=gen,
        )
        opt.zero_grad()
        (terms["itc"] + terms["itm"]).backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    first, last = history[0], history[-5:]
    # ITC separates the four scenes; ITM (from scratch, a long plateau) at least learns its prior.
    assert np.mean([h["itc"] for h in last]) < 0.5 * first["itc"]
    assert np.mean([h["itm"] for h in last]) < 0.8 * first["itm"]


def test_train_teacher_short_run_writes_loadable_teacher(demo_dataset: Path, tmp_path: Path):
    """A few steps of train_teacher save a model load_teacher accepts, plus config and metrics."""
    out = tmp_path / "teacher"
    cfg = TeacherTrainConfig(
        data=str(demo_dataset),
        out=str(out),
        epochs=2,
        batch_size=8,
        image_size=32,
        hidden_size=32,
        vision_layers=1,
        text_layers=1,
        warmup=2,
        val_images=8,
        max_steps=5,
    )
    summary = train_teacher(cfg, progress=False)
    assert summary["steps"] == 5
    assert len(summary["epochs"]) == 2  # 4 steps per epoch of 32 images
    teacher = load_teacher(str(out), device="cpu")
    assert teacher.identity["preprocessing"]["image_size"] == [32, 32]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_itc", "train_itm", "itc_rsum", "itm_t2i_R@1", "hard_t2i_R@1"):
        assert key in records[-1]
    # The demo data carries its full relation: positives came from it, val is scored on it too.
    assert "hard_full_t2i_R@1" in records[-1] and "itm_full_i2t_R@1" in records[-1]
    trained_on = json.loads((out / "trained_on.json").read_text())
    assert trained_on["labels"] == "relation"
    assert trained_on["source"]["generator_version"] == 3
    assert records[-1]["hard_chance_R@1"] == pytest.approx(25.0)
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 5
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_teacher(cfg, progress=False)


def test_train_config_rejects_bad_values():
    """Config validation names the field."""
    with pytest.raises(ValueError, match="--batch-size"):
        TeacherTrainConfig(data="d", out="o", batch_size=1)
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        TeacherTrainConfig(data="d", out="o", epochs=0)
    with pytest.raises(ValueError, match="ITM needs negatives"):
        TeacherTrainConfig(data="d", out="o", num_hard_negatives=0, num_random_negatives=0)


def test_relation_labels_make_every_true_match_a_positive(tmp_path: Path):
    """With --labels relation a caption is a positive for every image the relation says it fits
    (never drawn as a negative); with --labels captions only for its own image."""
    import polars as pl

    from pipeline.core.dataset import Dataset
    from pipeline.stages.demo_data import generate_demo_data
    from teacher.train import _Split

    generate_demo_data(
        tmp_path / "d", train_images=24, val_images=4, test_images=4, image_size=32,
        progress=False,
    )  # fmt: skip
    ds = Dataset.load(tmp_path / "d")
    images, captions = ds.split("train")
    rows = np.arange(images.height)
    caps = list(range(captions.height))
    full = _Split(ds, "train", labels="relation").fit_matrix(rows, caps).numpy()
    own = _Split(ds, "train", labels="captions").fit_matrix(rows, caps).numpy()
    rel = ds.relation.filter(pl.col("caption_id").is_in(captions["caption_id"].implode()))
    want = np.zeros_like(full)
    first_image, first_caption = images["image_id"][0], captions["caption_id"][0]
    want[rel["image_id"] - first_image, rel["caption_id"] - first_caption] = True
    np.testing.assert_array_equal(full, want)
    owner = captions["image_id"].to_numpy() - first_image
    np.testing.assert_array_equal(own, rows[:, None] == owner[None, :])
    assert (full & ~own).any() and not (own & ~full).any()
