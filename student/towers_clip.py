"""The model class of the ``effnet-minilm`` spec (built by student/pretrained.py).

``PretrainedTowersCLIP`` is open_clip's ``CustomTextCLIP`` (same modules, same state dict) with
what frozen pretrained towers need: frozen layers that stay in eval mode, and a feature path
(``tower_features`` / ``feature_identity``) that lets callers cache a frozen tower's output
(pipeline/torchkit/features.py) and feed it back in place of pixels or token ids.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP

from pipeline.torchkit.encode import weights_sha256

__all__ = ["BUILDER_VERSION", "CONTEXT_LENGTH", "SPEC_NAME", "PretrainedTowersCLIP"]

SPEC_NAME = "effnet-minilm"
BUILDER_VERSION = 1  # bump when the architecture or the head init changes: identities then differ
CONTEXT_LENGTH = 40  # MiniLM tokens; Flickr8k's longest caption has 38, longer ones are truncated


class PretrainedTowersCLIP(CustomTextCLIP):
    """open_clip's ``CustomTextCLIP`` with the same modules and state dict, and three differences.

    Frozen layers stay in eval mode under ``train()``, so BatchNorm statistics and dropout never
    change what they compute. ``encode_text`` drops the token columns that are padding in every
    row before the text tower (the tokenizer pads to ``CONTEXT_LENGTH``; most captions are half
    as long): the attention and the pooling mask padding, so the result is the same.

    A frozen tower's output can be computed once and cached (pipeline/torchkit/features.py):
    ``tower_features("image", pixels)`` is the image trunk's pooled output (N, 1280) and
    ``tower_features("text", tokens)`` the MiniLM tower's mean-pooled states (N, 384), both taken
    before the trainable projection; ``encode_image`` and ``encode_text`` accept such a floating
    (N, F) tensor in place of pixels or token ids. ``feature_identity(tower)`` says what the
    tower computes (the cache key), or None while it has trainable weights.
    """

    frozen_modules: tuple[str, ...] = ()  # names of the submodules held in eval mode
    pad_id: int = 0  # the BERT tokenizer's [PAD]

    def train(self, mode: bool = True) -> PretrainedTowersCLIP:
        super().train(mode)
        for name in self.frozen_modules:
            self.get_submodule(name).eval()
        return self

    def _trim(self, text: torch.Tensor) -> torch.Tensor:
        used = (text != self.pad_id).any(dim=0)  # (L,)
        if used.any():
            text = text[:, : int(used.nonzero().max()) + 1]  # (N, L') with L' <= L
        return text

    def _tower(self, tower: str) -> torch.nn.Module | None:
        if tower == "image":
            return self.visual.trunk
        if tower == "text":  # only the pretrained MiniLM tower has a projection-free output
            return self.text.transformer if hasattr(self.text, "pooler") else None
        raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")

    def feature_identity(self, tower: str) -> dict[str, Any] | None:
        """What ``tower_features(tower, ...)`` computes, or None when it is not a fixed function."""
        module = self._tower(tower)
        if module is None or any(p.requires_grad for p in module.parameters()):
            return None
        identity = {
            "model": SPEC_NAME,
            "builder": BUILDER_VERSION,
            "tower": tower,
            "weights_sha256": weights_sha256(module),
        }
        if tower == "image":
            identity["preprocess"] = dict(self.visual.preprocess_cfg)
            identity["output"] = "timm efficientnet_lite0 trunk, global average pool"
        else:
            identity["context_length"] = CONTEXT_LENGTH
            identity["output"] = "MiniLM last hidden state, mean over non-padding tokens"
        return identity

    def tower_features(self, tower: str, inputs: torch.Tensor) -> torch.Tensor:
        """(N, F) output of a tower before its projection: pixels (N, 3, H, W) or tokens (N, L)."""
        if tower == "image":
            return self.visual.trunk(inputs)
        if self._tower("text") is None:
            raise ValueError("this text tower trains from scratch: it has no fixed features")
        tokens = self._trim(inputs)
        mask = (tokens != self.pad_id).long()
        return self.text.pooler(self.text.transformer(input_ids=tokens, attention_mask=mask), mask)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if image.ndim == 2:  # (N, F) trunk features
            features = self.visual.head(image)
        else:
            features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if text.is_floating_point():  # (N, F) tower features
            features = self.text.proj(text)
        elif hasattr(self.text, "pooler"):  # MiniLM: masks padding, so it can be trimmed
            features = self.text(self._trim(text))
        else:  # open_clip's text transformer: its causal mask wants the full context length
            features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features
