"""cprd's pipeline, in three floors (docs/architecture.md; the rule is DESIGN 8):

- ``pipeline.core``: the on-disk contract and pure helpers (schemas, atomic writes, dataset,
  candidates, teacher cache, metrics, search, tracking). Imports nothing else of cprd.
- ``pipeline.torchkit``: the torch plumbing both models share (devices and encoding, the
  frozen-feature store, the pretrained towers). Imports only ``pipeline.core``.
- ``pipeline.stages``: the stages (import, demo data, mine, score, evaluate, re-rank, gallery,
  demo, report). They sit above ``teacher`` and ``student`` and may import both.

``teacher`` and ``student`` sit between torchkit and stages and never import each other.
The layers are checked by import-linter (pyproject.toml, tests/test_layers.py).
"""
