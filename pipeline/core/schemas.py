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

# Optional: the full caption-image relation, every pair that truly matches (a generated dataset
# knows it; ECCV Caption / CxC extend COCO's labels towards it). Listed in dataset.json when
# present; it holds every labelled pair, and pairs never cross splits.
RELATION_FILE = "relation.parquet"
RELATION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),  # an image the caption is true of
        pa.field("caption_id", pa.int64(), nullable=False),  # sorted by caption_id, image_id
    ]
)

# ---- candidates directory (mine-candidates) ---------------------------------------------------
CANDIDATES_JSON = "candidates.json"  # manifest: model, k, split, fingerprint, files; written last
CANDIDATES_FILE = "candidates.parquet"
CANDIDATES_FORMAT = "cprd-candidates"
CANDIDATES_VERSION = 1
EMBEDDINGS_DIR = "embeddings"  # image.npy, image_ids.npy, caption.npy, caption_ids.npy
DIRECTIONS = ("i2t", "t2i")  # i2t: image queries over captions; t2i: caption queries over images

CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("direction", pa.string(), nullable=False),  # "i2t" or "t2i"
        pa.field("query_id", pa.int64(), nullable=False),  # image_id (i2t) or caption_id (t2i)
        pa.field("candidate_id", pa.int64(), nullable=False),  # caption_id (i2t) or image_id (t2i)
        pa.field("rank", pa.int32(), nullable=False),  # 0-based rank under the miner, best first
        pa.field("score", pa.float32(), nullable=False),  # the miner's cosine similarity
        pa.field("is_positive", pa.bool_(), nullable=False),  # a ground-truth pair; never dropped
    ]
)
