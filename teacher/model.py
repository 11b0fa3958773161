"""Load a BLIP image-text-matching teacher (hub id or local ``save_pretrained`` directory).

The teacher is frozen and in eval mode. Its ``identity`` is everything about it that changes a
score (DESIGN 3): name, a hash of the weights, preprocessing and scoring precision; the teacher
cache keys on it.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForImageTextRetrieval

from pipeline.torchkit.encode import (
    autocast,
    cast_model,
    pick_device,
    resolve_precision,
    weights_sha256,
)
from teacher.scoring import TeacherScores, match_prob

log = logging.getLogger(__name__)

_HINT = "pass a directory written by `cprd train-teacher` or a Salesforce/blip-itm-* checkpoint"


@dataclass(frozen=True)
class LoadedTeacher:
    """A frozen BLIP ITM model with its processor, the device it runs on, and its identity."""

    model: BlipForImageTextRetrieval  # eval mode, requires_grad False
    processor: Any  # BlipProcessor: .image_processor and .tokenizer
    device: torch.device
    identity: dict  # {"spec", "weights_sha256", "preprocessing": {...}, "precision"}

    @property
    def max_text_length(self) -> int:
        """Captions are truncated to this many tokens (special tokens included)."""
        return self.identity["preprocessing"]["max_text_length"]

    def score_grouped(
        self,
        images: list[Image.Image] | torch.Tensor,
        captions: list[list[str]],
        batch_size: int = 64,
    ) -> TeacherScores:
        """``score_grouped`` below: the method every teacher kind has (teacher.scoring)."""
        return score_grouped(self, images, captions, batch_size=batch_size)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, 3, H, W) pixel values on the CPU; ``score_grouped`` takes them for ``images``."""
        return preprocess(self, images)


def _fail(spec: str, reason: str) -> ValueError:
    return ValueError(
        f"teacher '{spec}' is not a loadable BLIP image-text-matching model ({reason}); {_HINT}"
    )


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "owner/name"; anything absolute, relative-dotted or home-based is a path.
    return spec.startswith(("/", "./", "../", "~")) or spec in (".", "..")


def max_text_length(model: BlipForImageTextRetrieval, tokenizer: Any) -> int:
    """Token limit for captions: the tokenizer's limit capped by the text position embeddings."""
    limit = model.config.text_config.max_position_embeddings
    tok_limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)); the model's limit rules then.
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return int(limit)


def _size_of(image_processor: Any) -> list[int]:
    """[height, width] the processor resizes to (transformers 5 keeps a SizeDict, 4 a dict)."""
    size = getattr(image_processor, "size", None)
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    if get("height") and get("width"):
        return [int(get("height")), int(get("width"))]
    if get("shortest_edge"):
        return [int(get("shortest_edge"))] * 2
    if isinstance(size, int):
        return [size, size]
    raise ValueError(f"cannot read the image size from {type(image_processor).__name__}: {size}")


def teacher_identity(
    spec: str, model: BlipForImageTextRetrieval, processor: Any, device: torch.device
) -> dict:
    """The cache-key part the teacher contributes (JSON-serialisable)."""
    ip = processor.image_processor
    return {
        "spec": spec,
        "weights_sha256": weights_sha256(model),
        "preprocessing": {
            "image_size": _size_of(ip),
            "image_mean": [float(x) for x in ip.image_mean],
            "image_std": [float(x) for x in ip.image_std],
            "max_text_length": max_text_length(model, processor.tokenizer),
        },
        "precision": resolve_precision(device),  # --precision, part of the cache key
    }


def _check_config(spec: str) -> None:
    """Refuse a local directory whose config is not a BLIP one before transformers guesses."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise _fail(spec, "no such file or directory")
    if not path.is_dir():
        raise _fail(spec, "it is a file, not a model directory")
    config = path / "config.json"
    if not config.is_file():
        raise _fail(spec, "the directory has no config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise _fail(spec, f"config.json is unreadable: {e}") from e
    if model_type != "blip":
        raise _fail(spec, f"config.json has model_type {model_type!r}, expected 'blip'")


def load_teacher(spec: str, device: str | torch.device | None = None) -> LoadedTeacher:
    """Load ``spec`` (hub id or directory) as a frozen teacher; ValueError if it is not one.

    A directory holding ``cprd_teacher.json`` (``train-teacher --base effnet-minilm``) loads as
    a teacher.effnet_minilm.EffnetMiniLMTeacher, which has the same ``device``, ``identity`` and
    ``max_text_length`` and scores through ``score_grouped`` below.
    """
    spec = str(spec)
    local = Path(spec).expanduser()
    if local.is_dir() and (local / "cprd_teacher.json").is_file():
        from teacher.effnet_minilm import load_effnet_minilm  # a `--base effnet-minilm` teacher

        return load_effnet_minilm(spec, device=device)
    if local.exists() or _looks_like_path(spec):
        _check_config(spec)
        source = str(local)
    else:
        source = spec  # a hub id; offline it resolves from the local HF cache only
    try:
        # transformers reads safetensors, or a .bin with torch.load(weights_only=True): a
        # pickled object in a checkpoint is refused, never run; no repository code runs either.
        model, info = BlipForImageTextRetrieval.from_pretrained(source, output_loading_info=True)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    except pickle.UnpicklingError as e:
        reason = "its weights hold pickled Python objects besides tensors; cprd does not unpickle"
        raise _fail(spec, f"{reason} them (that could run code)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(spec, reason) from e
    # A BLIP checkpoint without ITM weights (captioning, VQA) would load with a random ITM head
    # and score noise; refuse it rather than warn.
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise _fail(spec, f"{len(missing)} weights missing from the checkpoint: {shown}")
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise _fail(spec, f"its processor is a {type(processor).__name__}, not a BlipProcessor")

    dev = pick_device(str(device) if device is not None else None)
    identity = teacher_identity(spec, model, processor, dev)
    model.eval().requires_grad_(False).to(dev)
    cast_model(model, dev)  # pure bf16 / fp16 under --precision
    log.info("loaded teacher %s on %s (%s)", spec, dev, identity["precision"])
    return LoadedTeacher(model=model, processor=processor, device=dev, identity=identity)


# ---- scoring -------------------------------------------------------------------------------------
# Letters in shape comments: N images, P pairs in one text batch, V image tokens, D hidden width,
# L tokens.


def itm_log_odds(itm: torch.Tensor) -> torch.Tensor:
    """(P,) float32 log-odds of a match from (P, 2) ITM head output: logit(match) - logit(no
    match), so that sigmoid of it is softmax(itm)[:, 1]."""
    itm = itm.float()
    return itm[:, 1] - itm[:, 0]


def _tokenize(teacher: LoadedTeacher, texts: list[str]) -> dict[str, torch.Tensor]:
    tok = teacher.processor.tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=teacher.max_text_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {k: v.to(teacher.device) for k, v in tok.items()}


def preprocess(teacher: LoadedTeacher, images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) pixel values of PIL images, on the CPU (what a DataLoader worker computes)."""
    rgb = [im.convert("RGB") for im in images]
    return teacher.processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]


def _pixels(teacher: LoadedTeacher, images: list[Image.Image] | torch.Tensor) -> torch.Tensor:
    pixels = images if isinstance(images, torch.Tensor) else preprocess(teacher, images)
    return pixels.to(teacher.device)


def itm_logits(
    model: BlipForImageTextRetrieval,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """(P, 2) ITM head output for P pairs, given each pair's (P, V, D) vision encoder output.

    Mirrors ``BlipForImageTextRetrieval.forward(use_itm_head=True)`` in transformers 5: the
    tokenizer's ids go in unchanged (no [ENC] substitution, unlike LAVIS), every image token is
    attended, and the head reads the [CLS] position.
    """
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    hidden = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
    ).last_hidden_state  # (P, L, D)
    return model.itm_head(hidden[:, 0, :])  # (P, 2)


def _to_scores(out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(log-odds, match probability) of (P, 2) ITM head output."""
    score = itm_log_odds(out).cpu().numpy()  # (P,)
    return score, match_prob(score)


@torch.no_grad()
def score_grouped(
    teacher: LoadedTeacher,
    images: list[Image.Image] | torch.Tensor,
    captions: list[list[str]],
    batch_size: int = 64,
) -> TeacherScores:
    """ITM scores of each image's captions; the vision encoder runs once per image. ``images``
    are PIL images or their ``preprocess``-ed (N, 3, H, W) pixel values.

    ``captions[i]`` are the texts paired with ``images[i]`` (possibly none). Pairs are scored
    ``batch_size`` at a time, each reusing its image's encoder output.
    """
    if len(images) != len(captions):
        raise ValueError(
            f"got {len(images)} images but {len(captions)} caption lists; pass one list of "
            "captions (possibly empty) per image"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(teacher, LoadedTeacher):  # another kind of teacher scores itself
        return teacher.score_grouped(images, captions, batch_size=batch_size)
    model = teacher.model
    logits = [np.zeros(len(c), dtype=np.float32) for c in captions]
    probs = [np.zeros(len(c), dtype=np.float32) for c in captions]
    # Images go through the vision encoder batch_size at a time; their pairs follow in batches.
    for start in range(0, len(images), batch_size):
        chunk = range(start, min(start + batch_size, len(images)))
        todo = [i for i in chunk if captions[i]]
        if not todo:
            continue
        with autocast(teacher.device):
            chosen = images[todo] if isinstance(images, torch.Tensor) else [images[i] for i in todo]
            image_embeds = model.vision_model(
                pixel_values=_pixels(teacher, chosen)
            ).last_hidden_state  # (N, V, D)
        pairs = [(row, i, j) for row, i in enumerate(todo) for j in range(len(captions[i]))]
        for p0 in range(0, len(pairs), batch_size):
            batch = pairs[p0 : p0 + batch_size]
            rows = torch.tensor([row for row, _, _ in batch], device=teacher.device)  # (P,)
            tok = _tokenize(teacher, [captions[i][j] for _, i, j in batch])
            with autocast(teacher.device):
                out = itm_logits(model, image_embeds[rows], tok["input_ids"], tok["attention_mask"])
            lg, pr = _to_scores(out)
            for k, (_, i, j) in enumerate(batch):
                logits[i][j], probs[i][j] = lg[k], pr[k]
    return TeacherScores(logits=logits, probs=probs)


@torch.no_grad()
def score_pairs_naive(
    teacher: LoadedTeacher, image: Image.Image, captions: list[str]
) -> TeacherScores:
    """Reference scores: one full ``model(..., use_itm_head=True)`` forward per pair."""
    logits, probs = [], []
    for text in captions:
        tok = _tokenize(teacher, [text])
        with autocast(teacher.device):
            out = teacher.model(
                input_ids=tok["input_ids"],
                attention_mask=tok["attention_mask"],
                pixel_values=_pixels(teacher, [image]),
                use_itm_head=True,
            ).itm_score  # (1, 2)
        lg, pr = _to_scores(out)
        logits.append(lg[0])
        probs.append(pr[0])
    return TeacherScores(
        logits=[np.asarray(logits, dtype=np.float32)], probs=[np.asarray(probs, dtype=np.float32)]
    )
