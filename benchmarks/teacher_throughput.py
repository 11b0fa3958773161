"""Teacher scoring throughput: each image encoded once for its K captions vs once per pair.

Both sides run the same batched code path (`teacher.model.score_grouped`); the baseline simply
hands every pair its own copy of the image, so the vision encoder runs once per pair. The ratio
of the two times, measured in one process, is the speedup the cache's grouping buys.

    python benchmarks/teacher_throughput.py --quick --json
    python benchmarks/teacher_throughput.py --model base --images 4 --k 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import best_of, write_result  # noqa: E402


def build(model: str, tmp: Path, captions: list[str]) -> str:
    """Save a randomly initialised teacher of the given size; random weights give real speed."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from teacher.tiny import build_processor, build_tiny_teacher

    if model == "tiny":
        blip, processor = build_tiny_teacher(captions)
    else:  # BLIP-base: ViT-B/16 at 384 px, BERT-base text encoder with cross-attention
        processor = build_processor(captions, image_size=384, max_text_length=35)
        blip = BlipForImageTextRetrieval(BlipConfig())
    blip.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return str(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--images", type=int, default=16, help="images, each with K captions")
    ap.add_argument("--k", type=int, default=16, help="captions per image")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 images, 1 repeat")
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = ap.parse_args()
    if args.quick:
        args.model, args.images, args.repeats = "tiny", 4, 1
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    import tempfile

    from teacher.model import load_teacher, score_grouped

    rng = np.random.default_rng(0)
    words = ["red", "blue", "circle", "square", "left", "of", "a", "above", "the"]
    captions = [[" ".join(rng.choice(words, 8)) for _ in range(args.k)] for _ in range(args.images)]
    images = [
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_teacher(build(args.model, Path(tmp), sum(captions, [])))
    pairs = args.images * args.k
    flat_images = [im for im, caps in zip(images, captions, strict=True) for _ in caps]
    flat_caps = [[c] for caps in captions for c in caps]

    def grouped():
        return score_grouped(teacher, images, captions, batch_size=args.batch_size)

    def per_pair():
        return score_grouped(teacher, flat_images, flat_caps, batch_size=args.batch_size)

    a = np.concatenate(grouped().logits)
    b = np.concatenate(per_pair().logits)
    max_diff = float(np.abs(a - b).max())
    t_grouped = best_of(grouped, args.repeats)
    t_pair = best_of(per_pair, args.repeats)
    result = {
        "model": args.model,
        "device": str(teacher.device),
        "images": args.images,
        "k": args.k,
        "pairs": pairs,
        "pairs_per_s_reuse": pairs / t_grouped,
        "pairs_per_s_per_pair": pairs / t_pair,
        "ratio": t_pair / t_grouped,
        "max_score_diff": max_diff,
    }
    body = (
        f"| mode | pairs/s |\n| --- | --- |\n"
        f"| image encoded once per image | {result['pairs_per_s_reuse']:.1f} |\n"
        f"| image encoded once per pair | {result['pairs_per_s_per_pair']:.1f} |\n\n"
        f"Reuse speedup (`ratio`): **{result['ratio']:.2f}x** at K = {args.k} "
        f"({args.model} teacher, {args.images} images); largest score difference between "
        f"the two paths: {max_diff:.2e}."
    )
    if not args.quick:
        write_result(f"teacher_throughput_{args.model}", "Teacher throughput", body, result)
    print(body if not args.json else json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
