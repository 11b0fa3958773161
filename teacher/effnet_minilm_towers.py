"""The frozen towers of the ``effnet-minilm`` teacher and their on-disk feature caches.

- Image: timm ``efficientnet_lite0`` with the ImageNet weights of the image package,
  ``forward_features`` of the 224 x 224 centre crop (open_clip's eval transform, ImageNet
  mean/std): (C, 7, 7), cached as (V, C) fp16. The final 1280-channel map is cached rather than
  the (320, 7, 7) block output that conv_head/bn2 expand: 376 MB for 3,000 images is affordable,
  and the trained head then never runs a tower layer.
- Text: MiniLM-L6's last hidden states, [CLS] and [SEP] included, at most 40 tokens, cached as
  (L, T) fp16 without padding.

The towers are built on first use only: a run whose features are all cached never builds them.
Letters in shape comments: N images, V = 49 image tokens, C = 1280 channels, L caption tokens,
T = 384 text width, P captions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.transform import image_transform
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel

from pipeline.torchkit import features, towers
from pipeline.torchkit.towers import IMAGE_PACKAGE, TEXT_PACKAGE, TEXT_WEIGHTS, cached_file_sha256

IMAGE_SIZE = 224
GRID = 7  # the 224-pixel input's 7 x 7 feature map
IMAGE_WIDTH = 1280
TEXT_WIDTH = 384
MAX_TEXT_LENGTH = 40  # MiniLM tokens, special ones included (Flickr8k's longest caption has 38)
NEEDED_BY = "the effnet-minilm teacher"


class Towers:
    """The frozen towers (built on first use) behind two feature stores under ``root``."""

    def __init__(self, root: str | Path | None = None, device: torch.device | str = "cpu"):
        self.image_file = towers.package_path(IMAGE_PACKAGE, needed_by=NEEDED_BY)
        self.text_dir = towers.package_path(TEXT_PACKAGE, needed_by=NEEDED_BY)
        self.device = torch.device(device)
        self.hashes = {
            "image_weights_sha256": cached_file_sha256(self.image_file),
            "text_weights_sha256": cached_file_sha256(self.text_dir / TEXT_WEIGHTS),
            "text_files_sha256": towers.text_files_sha256(self.text_dir),
        }
        self.preprocess = image_transform(
            IMAGE_SIZE, is_train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD
        )
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.text_dir))
        image_id = {
            "tower": "timm efficientnet_lite0",
            "package": IMAGE_PACKAGE.dist,
            "weights_sha256": self.hashes["image_weights_sha256"],
            "preprocess": {
                "size": IMAGE_SIZE,
                "resize": "shortest side, bicubic, centre crop (open_clip eval)",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "output": f"forward_features {IMAGE_WIDTH}x{GRID}x{GRID} fp16 as ({GRID * GRID}, "
            f"{IMAGE_WIDTH}) row-major",
        }
        text_id = {
            "tower": "MiniLM-L6 BertModel",
            "package": TEXT_PACKAGE.dist,
            "weights_sha256": self.hashes["text_weights_sha256"],
            "text_files_sha256": self.hashes["text_files_sha256"],
            "max_tokens": MAX_TEXT_LENGTH,
            "output": f"last_hidden_state (L, {TEXT_WIDTH}) fp16, special tokens kept, no padding",
        }
        self.image_store = features.FeatureStore(image_id, root)
        self.text_store = features.FeatureStore(text_id, root)
        self._image_model: nn.Module | None = None
        self._bert: BertModel | None = None

    def image_model(self) -> nn.Module:
        """The frozen image tower (timm efficientnet_lite0, no classifier), built once."""
        if self._image_model is None:
            trunk = timm.create_model("efficientnet_lite0", num_classes=0)
            towers.load_efficientnet_lite0(trunk, self.image_file)
            # Depthwise convolutions run about 1.7x faster on CPU with channels-last weights.
            trunk = trunk.to(self.device, memory_format=torch.channels_last)
            self._image_model = trunk.eval().requires_grad_(False)
        return self._image_model

    def bert(self) -> BertModel:
        """The frozen text tower (MiniLM-L6 as a BertModel without pooler), built once."""
        if self._bert is None:
            bert = BertModel(
                BertConfig.from_pretrained(str(self.text_dir)), add_pooling_layer=False
            )
            towers.load_minilm(bert, self.text_dir)
            self._bert = bert.to(self.device).eval().requires_grad_(False)
        return self._bert

    @torch.no_grad()
    def _encode_images(self, images: list[Image.Image]) -> list[np.ndarray]:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images])  # (N, 3, H, W)
        pixels = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
        maps = self.image_model().forward_features(pixels).float()  # (N, C, 7, 7)
        maps = maps.flatten(2).transpose(1, 2).half().cpu().numpy()  # (N, V, C)
        return list(maps)

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        tok = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=MAX_TEXT_LENGTH,
            return_tensors="pt",
        )
        tok = {k: v.to(self.device) for k, v in tok.items()}
        states = self.bert()(**tok).last_hidden_state.float().half().cpu().numpy()  # (B, L, T)
        lengths = tok["attention_mask"].sum(1).tolist()
        return [states[i, :n] for i, n in enumerate(lengths)]

    def image_features(
        self,
        keys: Sequence[str],
        load: Callable[[list[int]], list[Image.Image]],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray]:
        """(V, C) fp16 map of each image key; missing ones encode ``load(rows)`` (rows of keys)."""
        return self.image_store.get(
            keys, lambda rows: self._encode_images(load(rows)), batch_size, progress
        )

    def text_features(
        self,
        texts: Sequence[str],
        batch_size: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> list[np.ndarray]:
        """(L, T) fp16 last hidden states of each caption, from the cache or the text tower."""
        return self.text_store.get(
            features.text_keys(texts),
            lambda rows: self._encode_texts([texts[r] for r in rows]),
            batch_size,
            progress,
        )


def image_keys(images: Sequence[Image.Image]) -> list[str]:
    """Feature-cache keys of decoded images, taken from their RGB pixels."""
    return [features.image_key(im if im.mode == "RGB" else im.convert("RGB")) for im in images]


def pad_texts(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, L, T) zero-padded states and the (P, L) bool mask of real tokens."""
    lengths = torch.tensor([len(s) for s in states])
    padded = nn.utils.rnn.pad_sequence(list(states), batch_first=True)  # (P, L, T)
    mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # (P, L)
    return padded, mask
