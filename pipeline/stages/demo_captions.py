"""Generator version 3's captions: some fit more images than the one they were written for.

Real captions are often true of other images too, and datasets label only the image each was
written for. Version 3 of the embedded benchmark copies that (DESIGN.md section 6):

- of every 5 caption slots, slots 0-2 are full descriptions as in version 2 (colours, shapes and
  the relation: true of one scene), slots 3-4 are *under-specified*, each of one kind per group:
  ``objects`` "a red circle and a blue square" (no relation: true of both orders), ``shapes``
  "a circle to the left of a square" (no colours), ``colours`` "a red shape to the left of a
  blue shape" (no shapes) and ``single`` "a red circle and another shape" (one object);
- about REPEAT_FRACTION of the groups repeat an earlier group's four scenes (new layouts, new
  noise, new captions), so even a full caption can fit two pictures.

Every caption carries a *key*, the facts it states, and every scene the keys of every caption
true of it; the generator joins the two into the full caption-image relation it writes beside
the dataset (pipeline.relation). A caption's key is always among its own scene's keys, so the
relation holds every labelled pair.
"""

from __future__ import annotations

Obj = tuple[str, str]  # (colour, shape)
Scene = tuple[Obj, Obj]  # (first, second) along the axis
Key = tuple  # the facts a caption states; equal keys mean equal truth conditions

SLOT_CYCLE = 5  # caption slots come in rounds of 5 ...
FULL_SLOTS = 3  # ... of which the first 3 describe the scene fully
UNDER_KINDS = ("objects", "shapes", "colours", "single")
REPEAT_FRACTION = 0.15  # groups (after the first) that repeat an earlier group's scenes
RELATION_WORDS = {"horizontal": "to the left of", "vertical": "above"}


def scene_keys(scene: Scene, axis: str) -> list[Key]:
    """The keys of every caption, full or under-specified, that is true of ``scene``."""
    first, second = scene
    return [
        ("full", axis, first, second),
        ("objects", *sorted(scene)),  # "and" names no order and no axis
        ("shapes", axis, first[1], second[1]),
        ("colours", axis, first[0], second[0]),
        ("single", first),
        ("single", second),
    ]


def full_key(scene: Scene, axis: str) -> Key:
    return ("full", axis, scene[0], scene[1])


def under_caption(kind: str, scene: Scene, axis: str) -> tuple[str, Key]:
    """(text, key) of an under-specified caption of ``kind`` written for ``scene``.

    The first (left / top) object is named first, as in every full template: reading order is
    position order wherever a relation is stated.
    """
    (ca, sa), (cb, sb) = scene
    rel = RELATION_WORDS[axis]
    if kind == "objects":
        return f"a {ca} {sa} and a {cb} {sb}", ("objects", *sorted(scene))
    if kind == "shapes":
        return f"a {sa} {rel} a {sb}", ("shapes", axis, sa, sb)
    if kind == "colours":
        return f"a {ca} shape {rel} a {cb} shape", ("colours", axis, ca, cb)
    if kind == "single":
        return f"a {ca} {sa} and another shape", ("single", scene[0])
    raise ValueError(f"unknown caption kind '{kind}'; expected one of {UNDER_KINDS}")


def caption_plan(n: int) -> list[tuple[bool, int]]:
    """For caption slots 0..n-1: (full?, index) = the full-template step or under-kind slot."""
    plan = []
    for k in range(n):
        rnd, slot = divmod(k, SLOT_CYCLE)
        if slot < FULL_SLOTS:
            plan.append((True, rnd * FULL_SLOTS + slot))
        else:
            plan.append((False, rnd * (SLOT_CYCLE - FULL_SLOTS) + slot - FULL_SLOTS))
    return plan


def relation_pairs(
    image_keys: list[tuple[int, list[Key]]], caption_keys: list[tuple[int, Key]]
) -> tuple[list[int], list[int]]:
    """(image ids, caption ids) of every pair where the caption's key is true of the image.

    ``image_keys`` holds (image_id, scene_keys) and ``caption_keys`` (caption_id, key) of one
    split: the relation never crosses splits.
    """
    images_of: dict[Key, list[int]] = {}
    for image_id, keys in image_keys:
        for key in keys:
            images_of.setdefault(key, []).append(image_id)
    image_ids, caption_ids = [], []
    for caption_id, key in caption_keys:
        fits = images_of.get(key, [])
        image_ids += fits
        caption_ids += [caption_id] * len(fits)
    return image_ids, caption_ids
