"""The ``effnet-minilm`` teacher: a cross-encoder over two frozen pretrained towers (DESIGN 6b).

The towers are the ImageNet EfficientNet-Lite0 and MiniLM-L6 that ship in two PyPI packages
(pipeline.torchkit.towers). Being frozen, they compute a fixed function: their outputs are cached
on disk per image and caption (pipeline.torchkit.features); only the small head below trains.

Letters in shape comments: N images, P pairs, V = 49 image tokens (7 x 7 grid), C = 1280 image
channels, L caption tokens, T = 384 text width, E prior embedding width, D fusion width.

- Tower features (teacher.effnet_minilm_towers): the (V, C) map of the image tower's last stage,
  the caption's (L, T) MiniLM token states.
- Prior (the dual encoder, DESIGN 6b): cos(Linear(mean of the map), Linear(masked mean of the
  states)), the two projections fitted by ITC.
- Fusion: image tokens -> Linear + LayerNorm + learned 2-D position embedding; caption states ->
  Linear -> ``fusion_layers`` pre-norm transformer decoder layers (self-attention over the
  caption, cross-attention to the image tokens) -> LayerNorm -> Linear at [CLS] = fusion logit.
  Its output layer starts at zero, so an untrained fusion scores exactly as the prior does.
- Score (the log-odds of a match, cached and used for re-ranking) = fusion + w * cos + b;
  prob = sigmoid(score) (teacher.model.match_prob).

A trained teacher is a directory: ``cprd_teacher.json`` (kind, format, architecture, the tower
packages' versions and hashes), ``model.safetensors`` (the head only), ``train_config.json``,
``metrics.jsonl``. ``load_effnet_minilm`` reads it; ``teacher.model.load_teacher`` dispatches here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pipeline.core.atomic import json_sha256
from pipeline.torchkit import features
from pipeline.torchkit.encode import autocast, cast_model, pick_device, resolve_precision
from pipeline.torchkit.towers import IMAGE_PACKAGE, TEXT_PACKAGE, cached_file_sha256, dist_version
from teacher.effnet_minilm_towers import (
    GRID,
    IMAGE_SIZE,
    IMAGE_WIDTH,
    MAX_TEXT_LENGTH,
    TEXT_WIDTH,
    Towers,
    image_keys,
    pad_texts,
)
from teacher.scoring import TeacherScores, match_prob

log = logging.getLogger(__name__)

KIND = "effnet-minilm"
FORMAT = 1
TEACHER_JSON = "cprd_teacher.json"
MODEL_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The trained head's architecture (saved in cprd_teacher.json)."""

    embed_dim: int = 256  # width E of the prior's shared embedding space
    fusion_dim: int = 128  # width D of the fusion layers
    fusion_layers: int = 2  # transformer decoder layers over the caption, cross-attending the image
    fusion_heads: int = 4  # attention heads per fusion layer
    dropout: float = 0.1  # dropout inside the fusion layers while training


class Prior(nn.Module):
    """The dual encoder over the pooled tower features: one linear projection per tower."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(IMAGE_WIDTH, embed_dim)
        self.text_proj = nn.Linear(TEXT_WIDTH, embed_dim)

    def embed_image(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, E) unit-norm embedding of (N, V, C) image maps (mean over the grid)."""
        return F.normalize(self.image_proj(maps.float().mean(1)), dim=-1)

    def embed_text(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(P, E) unit-norm embedding of (P, L, T) states, mean over the (P, L) mask."""
        m = mask.float()[..., None]  # (P, L, 1)
        pooled = (states.float() * m).sum(1) / m.sum(1).clamp_min(1.0)  # (P, T)
        return F.normalize(self.text_proj(pooled), dim=-1)


# ---- the trained head ----------------------------------------------------------------------------


class EffnetMiniLMHead(nn.Module):
    """Prior projections, fusion layers and the score's w and b: everything that trains."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.fusion_dim
        self.prior = Prior(cfg.embed_dim)
        self.image_in = nn.Linear(IMAGE_WIDTH, d)
        self.image_norm = nn.LayerNorm(d)
        self.image_pos = nn.Parameter(torch.randn(GRID * GRID, d) * 0.02)  # (V, D), 2-D grid
        self.text_in = nn.Linear(TEXT_WIDTH, d)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d, cfg.fusion_heads, 4 * d, cfg.dropout, batch_first=True, norm_first=True
            )
            for _ in range(cfg.fusion_layers)
        )
        self.out_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)
        nn.init.zeros_(self.out.weight)  # the fusion starts silent: score = prior
        nn.init.zeros_(self.out.bias)
        self.w = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def memory(self, maps: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per fusion layer, the cross-attention (keys, values), each (N, H, V, D/H), of (N, V, C)
        maps: computed once per image and shared by all its pairs."""
        tokens = self.image_norm(self.image_in(maps.float())) + self.image_pos  # (N, V, D)
        n, v, d = tokens.shape
        heads = self.cfg.fusion_heads
        out = []
        for layer in self.layers:
            attn = layer.multihead_attn
            w, b = attn.in_proj_weight[d:], attn.in_proj_bias[d:]  # key and value rows
            k, val = F.linear(tokens, w, b).view(n, v, 2, heads, d // heads).unbind(2)
            out.append((k.transpose(1, 2), val.transpose(1, 2)))
        return out

    def fusion(
        self,
        memory: list[tuple[torch.Tensor, torch.Tensor]],
        states: torch.Tensor,
        mask: torch.Tensor,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """(P,) fusion logit of pairs (caption p, image ``image_index[p]`` of ``memory``).

        Each layer computes what ``nn.TransformerDecoderLayer(norm_first=True)`` does with the
        image tokens as its memory (tests check it against the layer's own forward), with two
        shortcuts that leave the result unchanged: the cross-attention keys and values come per
        image from ``memory``, and the last layer computes only position 0 ([CLS], all the
        head reads), attending over every position's keys: over half the compute per pair.
        """
        x = self.text_in(states.float())  # (P, L, D)
        p, _, d = x.shape
        heads = self.cfg.fusion_heads
        for i, (layer, (k, v)) in enumerate(zip(self.layers, memory, strict=True)):
            h = query = layer.norm1(x)
            if i == len(self.layers) - 1:
                x, query = x[:, :1], h[:, :1]  # (P, 1, D) from here on
            sa = layer.self_attn(query, h, h, key_padding_mask=~mask, need_weights=False)[0]
            x = x + layer.dropout1(sa)
            length = x.shape[1]
            attn = layer.multihead_attn
            q = F.linear(layer.norm2(x), attn.in_proj_weight[:d], attn.in_proj_bias[:d])
            q = q.view(p, length, heads, d // heads).transpose(1, 2)  # (P, H, L, D/H)
            drop = attn.dropout if self.training else 0.0
            a = F.scaled_dot_product_attention(q, k[image_index], v[image_index], dropout_p=drop)
            x = x + layer.dropout2(attn.out_proj(a.transpose(1, 2).reshape(p, length, d)))
            h = layer.linear1(layer.norm3(x))
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(h))))
        return self.out(self.out_norm(x[:, 0])).squeeze(-1)  # (P,)

    def encode_images(self, maps: torch.Tensor) -> tuple[list, torch.Tensor]:
        """(fusion memory, (N, E) prior embeddings) of (N, V, C) maps, for ``score``."""
        return self.memory(maps), self.prior.embed_image(maps)

    def score(
        self,
        images: tuple[list, torch.Tensor],
        states: list[torch.Tensor],
        image_index: torch.Tensor,
        cos: torch.Tensor | None = None,
        chunk: int = 128,
    ) -> dict[str, torch.Tensor]:
        """{"score", "fusion", "cos"}, each (P,), of pairs (``states[p]``, image ``image_index[p]``
        of ``images`` = ``encode_images(maps)``): score = fusion + w * cos + b.

        ``states`` are the captions' (L_p, T) states. Captions of similar length share a padded
        chunk of at most ``chunk`` pairs, so that little compute goes to padding. A given
        (P,) ``cos`` replaces the prior's (training uses out-of-fold prior similarities).
        """
        memory, image = images
        device = image.device
        order = sorted(range(len(states)), key=lambda r: len(states[r]))
        fusions, coss = [], []
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            text, mask = pad_texts([states[r] for r in rows])
            text, mask = text.to(device), mask.to(device)
            index = image_index[torch.as_tensor(rows, device=image_index.device)]
            fusions.append(self.fusion(memory, text, mask, index))
            if cos is None:
                coss.append((image[index] * self.prior.embed_text(text, mask)).sum(-1))
        back = torch.empty(len(order), dtype=torch.long, device=device)
        back[torch.as_tensor(order, device=device)] = torch.arange(len(order), device=device)
        fusion = torch.cat(fusions)[back]
        cos = torch.cat(coss)[back] if cos is None else cos
        return {"score": fusion + self.w * cos + self.b, "fusion": fusion, "cos": cos}

    def forward(
        self, maps: torch.Tensor, states: list[torch.Tensor], image_index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``score`` of pairs (``states[p]``, ``maps[image_index[p]]``); maps (N, V, C)."""
        return self.score(self.encode_images(maps), states, image_index)


@torch.no_grad()
def score_pairs_batched(
    head: EffnetMiniLMHead,
    maps: torch.Tensor,
    states: Sequence[torch.Tensor],
    image_rows: np.ndarray,
    caption_rows: np.ndarray,
    batch_size: int,
    device: torch.device,
    images_per_step: int = 256,
) -> np.ndarray:
    """(P,) float32 scores of pairs (image_rows[p], caption_rows[p]) of ``maps`` (N, V, C) and
    ``states``: each image is encoded once (``images_per_step`` at a time, pairs grouped by
    image), its pairs scored ``batch_size`` at a time."""
    out = np.zeros(len(image_rows), dtype=np.float32)
    for lo in range(0, len(maps), images_per_step):
        hi = min(lo + images_per_step, len(maps))
        pairs = np.flatnonzero((image_rows >= lo) & (image_rows < hi))
        if not len(pairs):
            continue
        with autocast(device):
            images = head.encode_images(maps[lo:hi].to(device))
            for start in range(0, len(pairs), batch_size):
                rows = pairs[start : start + batch_size]
                index = torch.as_tensor(image_rows[rows] - lo, device=device)
                score = head.score(images, [states[c] for c in caption_rows[rows]], index)
                out[rows] = score["score"].float().cpu().numpy()
    return out


# ---- the saved teacher ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EffnetMiniLMTeacher:
    """A loaded ``effnet-minilm`` teacher: usable wherever a teacher.model.LoadedTeacher is."""

    head: EffnetMiniLMHead  # eval mode, requires_grad False
    towers: Towers
    device: torch.device
    identity: dict  # {"spec", "kind", "weights_sha256", "preprocessing": {...}, "precision"}

    @property
    def max_text_length(self) -> int:
        return MAX_TEXT_LENGTH

    @torch.no_grad()
    def score_grouped(
        self, images: list[Image.Image], captions: list[list[str]], batch_size: int = 64
    ) -> TeacherScores:
        """Scores of each image's captions (teacher.model.score_grouped checked the arguments)."""
        todo = [i for i, c in enumerate(captions) if c]
        keys = image_keys([images[i] for i in todo])
        maps = self.towers.image_features(keys, lambda rows: [images[todo[r]] for r in rows])
        texts = [t for i in todo for t in captions[i]]
        states = self.towers.text_features(texts)
        image_rows = np.repeat(np.arange(len(todo)), [len(captions[i]) for i in todo])
        scores = score_pairs_batched(
            self.head,
            torch.from_numpy(np.stack(maps)) if maps else torch.zeros(0, GRID * GRID, IMAGE_WIDTH),
            [torch.from_numpy(x) for x in states],
            image_rows,
            np.arange(len(texts)),
            batch_size,
            self.device,
        )
        logits = [np.zeros(len(c), dtype=np.float32) for c in captions]
        at = 0
        for i in todo:
            logits[i] = scores[at : at + len(captions[i])]
            at += len(captions[i])
        return TeacherScores(logits=logits, probs=[match_prob(x) for x in logits])


def teacher_json(cfg: HeadConfig, tw: Towers) -> dict:
    """The ``cprd_teacher.json`` content of a head over these towers."""
    return {
        "kind": KIND,
        "format": FORMAT,
        "architecture": dataclasses.asdict(cfg),
        "image_size": IMAGE_SIZE,
        "max_text_length": MAX_TEXT_LENGTH,
        "packages": {p.dist: dist_version(p) for p in (IMAGE_PACKAGE, TEXT_PACKAGE)},
        **tw.hashes,
    }


def load_effnet_minilm(spec: str, device: str | torch.device | None = None) -> EffnetMiniLMTeacher:
    """Load a saved ``effnet-minilm`` teacher directory, frozen; ValueError if it is not one."""
    path = Path(spec).expanduser()
    try:
        meta = json.loads((path / TEACHER_JSON).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"teacher '{spec}': {TEACHER_JSON} is unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("kind") != KIND or meta.get("format") != FORMAT:
        raise ValueError(
            f"teacher '{spec}': {TEACHER_JSON} describes kind {meta.get('kind')!r} format "
            f"{meta.get('format')!r}; this cprd reads {KIND} format {FORMAT}"
        )
    dev = pick_device(str(device) if device is not None else None)
    tw = Towers(features.default_root(), dev)
    for name, have in tw.hashes.items():
        if meta.get(name) != have:
            pkg = IMAGE_PACKAGE if name.startswith("image") else TEXT_PACKAGE
            saved = meta.get("packages", {}).get(pkg.dist)
            raise ValueError(
                f"teacher '{spec}' was trained on other {pkg.dist} files ({name} differs; "
                f"saved with version {saved}, installed {dist_version(pkg)}); install that "
                f"one: pip install {pkg.dist}=={saved}"
            )
    try:
        cfg = HeadConfig(**meta["architecture"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"teacher '{spec}': bad architecture in {TEACHER_JSON} ({e})") from e
    head = EffnetMiniLMHead(cfg)
    model_file = path / MODEL_FILE
    if not model_file.is_file():
        raise ValueError(f"teacher '{spec}': {MODEL_FILE} is missing")
    try:
        state = load_file(model_file)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"teacher '{spec}': {MODEL_FILE} is unreadable ({e})") from e
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"teacher '{spec}': {MODEL_FILE} does not fit its architecture (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    head.eval().requires_grad_(False).to(dev)
    # What the scores depend on (not the package versions: equal files compute the same).
    function = {k: meta.get(k) for k in ("format", "architecture", "max_text_length", *tw.hashes)}
    function["image_size"] = meta.get("image_size")
    function["model_file_sha256"] = cached_file_sha256(model_file)
    identity = {
        "spec": spec,
        "kind": KIND,
        "weights_sha256": json_sha256(function),
        "weights_hash_of": f"{MODEL_FILE} and {TEACHER_JSON} (architecture, tower hashes)",
        "preprocessing": {
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
            "max_text_length": MAX_TEXT_LENGTH,
        },
        "precision": resolve_precision(dev),  # --precision, part of the cache key
    }
    cast_model(head, dev)  # pure bf16 / fp16 under --precision (the towers run under autocast)
    log.info("loaded %s teacher %s on %s", KIND, spec, dev)
    return EffnetMiniLMTeacher(head=head, towers=tw, device=dev, identity=identity)
