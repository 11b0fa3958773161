"""The on-disk contract every stage reads and writes: Parquet schemas and file names, in one place.

Readers open the files named here (and the manifests that list them) rather than globbing a
directory, so a stray or half-written file is never picked up.
"""

from __future__ import annotations

import pyarrow as pa

# Splits a dataset may hold. Karpathy's `restval` is folded into `train` at import.
SPLITS = ("train", "val", "test")

# ---- dataset directory --------------------------------------------------------------------------
DATASET_JSON = "dataset.json"  # counts, fingerprint, source; written last
IMAGES_FILE = "images.parquet"
CAPTIONS_FILE = "captions.parquet"
DATASET_FORMAT = "cprd-dataset"
DATASET_VERSION = 1

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # stable id, 0..N-1 in import order
        pa.field("path", pa.string(), nullable=False),  # relative to the dataset dir, or absolute
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS
        pa.field("sha256", pa.string(), nullable=False),  # hex digest of the image file's bytes
    ]
)

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field("caption_id", pa.int64(), nullable=False),  # stable id, 0..M-1 in import order
        pa.field("image_id", pa.int64(), nullable=False),  # the image this caption describes
        pa.field("caption", pa.string(), nullable=False),  # verbatim text, unicode untouched
    ]
)
