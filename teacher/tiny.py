"""A tiny BLIP image-text-matching model and an offline tokenizer, built from training captions.

The demo teacher is a real ``BlipForImageTextRetrieval`` (same code, same save format as
``Salesforce/blip-itm-base-coco``), only small, so it goes through the loading and scoring code a
real checkpoint does. Nothing is downloaded: the WordPiece vocabulary is built from the captions.

Sizes follow what binding needs on the demo images (DESIGN 6): 8-pixel patches (smaller than a
shape) and BLIP's learned 2-D position embeddings, initialised with a usable scale (BLIP's vision
default of 1e-10 is meant for loading pretrained weights, not for training from scratch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessor,
    BlipProcessor,
)

# BERT's special tokens plus BLIP's decoder/encoder markers ([DEC] is BLIP's text bos token).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")

# BERT's basic tokenizer splits on whitespace and punctuation; this mirrors it for vocab building.
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def build_vocab(captions: Iterable[str], min_count: int = 1) -> dict[str, int]:
    """A WordPiece vocabulary: special tokens, then every lower-cased word and character.

    Every character also appears as a ``##`` continuation piece, so a word never seen in training
    splits into characters instead of collapsing to [UNK].
    """
    counts: dict[str, int] = {}
    for text in captions:
        for word in _WORD.findall(text.lower()):
            counts[word] = counts.get(word, 0) + 1
    words = sorted(w for w, c in counts.items() if c >= min_count)
    chars = sorted({ch for w in counts for ch in w})
    tokens = list(SPECIAL_TOKENS) + words
    tokens += [c for c in chars if c not in set(tokens)] + [f"##{c}" for c in chars]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_processor(
    captions: Iterable[str], image_size: int = 64, max_text_length: int = 32
) -> BlipProcessor:
    """A ``BlipProcessor``: ``BlipImageProcessor`` at ``image_size`` and a vocab-built tokenizer."""
    tokenizer = BertTokenizer(
        vocab=build_vocab(captions),
        do_lower_case=True,
        model_max_length=max_text_length,
        bos_token="[DEC]",
    )
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, do_convert_rgb=True
    )
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_config(
    vocab_size: int,
    *,
    pad_token_id: int,
    sep_token_id: int,
    bos_token_id: int,
    image_size: int = 64,
    patch_size: int = 8,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    heads: int = 4,
    max_text_length: int = 32,
    init_range: float | None = None,
) -> BlipConfig:
    """A small ``BlipConfig``: ViT over ``patch_size`` patches, a BERT with cross-attention.

    ``init_range`` (weight init std) defaults to BERT-base's scale relative to the width (0.02
    at 768 wide, so ~0.07 at 64): BLIP's absolute 0.02 on a 64-wide model makes every layer's
    output nearly input-independent, and training from scratch then sits on a plateau.
    """
    init_std = 0.02 * math.sqrt(768 / hidden_size) if init_range is None else init_range
    vision = {
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "initializer_range": init_std,
    }
    text = {
        "vocab_size": vocab_size,
        "initializer_range": init_std,
        "hidden_size": hidden_size,
        "encoder_hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_text_length,
        "pad_token_id": pad_token_id,
        "sep_token_id": sep_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": sep_token_id,
        "is_decoder": True,  # BLIP's text encoder: is_decoder adds the cross-attention layers
    }
    return BlipConfig(
        vision_config=vision,
        text_config=text,
        image_text_hidden_size=hidden_size,
        initializer_range=init_std,
    )


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) 2-D sine-cosine position codes (MAE's), row-major like ViT patches.

    Half the channels encode the row, half the column; neighbouring patches get similar codes,
    so adjacency (what a shape is made of) is visible from the first step.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be a multiple of 4 for 2-D sine-cosine codes")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float) / (dim // 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1).float() * freqs[None, :]  # (grid*grid, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(ys), code(xs)], dim=1)


def init_positions(model: BlipForImageTextRetrieval, scale: float = 0.5) -> None:
    """Start BLIP's learned vision position embeddings from 2-D sine-cosine codes (still learned).

    BLIP's default initialisation (1e-10, or 0.02 here) leaves positions far weaker than patch
    content, and a model from scratch then learns neither shapes nor "left of" in budget.
    """
    emb = model.vision_model.embeddings
    grid = int(round(math.sqrt(emb.num_patches)))
    with torch.no_grad():
        emb.position_embedding.zero_()
        emb.position_embedding[0, 1:] = scale * sincos_2d(grid, emb.embed_dim)


def build_tiny_teacher(
    captions: Iterable[str],
    image_size: int = 64,
    *,
    patch_size: int = 8,
    hidden_size: int = 64,
    vision_layers: int = 3,
    text_layers: int = 2,
    heads: int = 4,
    max_text_length: int = 32,
    init_range: float | None = None,
) -> tuple[BlipForImageTextRetrieval, BlipProcessor]:
    """A freshly initialised tiny ``BlipForImageTextRetrieval`` and its ``BlipProcessor``."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    processor = build_processor(captions, image_size, max_text_length)
    tok = processor.tokenizer
    config = tiny_config(
        len(tok),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.bos_token_id,
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        vision_layers=vision_layers,
        text_layers=text_layers,
        heads=heads,
        max_text_length=max_text_length,
        init_range=init_range,
    )
    model = BlipForImageTextRetrieval(config)
    init_positions(model)
    return model, processor
