"""What a training step feeds the student: images as preprocessed pixels read from their files,
or a frozen tower's cached features (pipeline/torchkit/features.py); captions as token ids, or
cached features likewise. ``model_inputs`` decides per modality, once per run."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.core.dataset import Dataset
from pipeline.torchkit.encode import frozen_features, pixel_batches
from student.train_config import StudentTrainConfig


class ImageFiles(torch.utils.data.Dataset):
    """Image id -> preprocessed (3, H, W) tensor."""

    def __init__(self, ds: Dataset, preprocess):
        self.paths = [ds.image_path(p) for p in ds.images["path"].to_list()]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, image_id: int) -> torch.Tensor:
        with Image.open(self.paths[image_id]) as img:
            return self.preprocess(img.convert("RGB"))


class _Chunks(torch.utils.data.Sampler):
    """A batch sampler whose batches are set before each pass (the loader's workers persist)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageBatches:
    """Batches of image rows (pixels or features), by id, decoded by worker processes that are
    started once per run, not once per pass: ``batches(ids_per_batch)`` iterates the stacked
    rows of each list of ids in order. One pass at a time per instance."""

    def __init__(self, images: torch.utils.data.Dataset, workers: int, pin_memory: bool):
        self._chunks = _Chunks()
        self.loader = torch.utils.data.DataLoader(
            images,
            batch_sampler=self._chunks,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin_memory,
        )

    def batches(self, ids: list) -> torch.utils.data.dataloader._BaseDataLoaderIter:
        self._chunks.batches = [np.asarray(b).tolist() for b in ids]
        return iter(self.loader)


class FeatureRows(torch.utils.data.Dataset):
    """Image id -> its row of precomputed frozen-tower features (F,)."""

    def __init__(self, features: np.ndarray):
        self.features = torch.from_numpy(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, image_id: int) -> torch.Tensor:
        return self.features[image_id]


def model_inputs(model, loaded, ds: Dataset, cfg: StudentTrainConfig, device, progress: bool):
    """(image dataset, caption encoder, frozen) a step feeds the model: pixels and token ids, or a
    frozen tower's cached features (pipeline/torchkit/features.py), computed once for the whole run;
    ``frozen`` says per modality ("image", "caption") which of the two it is."""
    paths = [ds.image_path(p) for p in ds.images["path"].to_list()]
    texts = ds.captions["caption"].to_list()
    kw = {"device": device, "progress": progress, "cache": cfg.feature_cache}
    pixels = pixel_batches(loaded.preprocess)
    keys = ds.images["sha256"].to_list()  # the files' sha256, recorded at import
    img = frozen_features(model, "image", paths, pixels, batch_size=cfg.batch_size, keys=keys, **kw)
    txt = frozen_features(
        model, "text", texts, loaded.tokenizer, batch_size=4 * cfg.batch_size, **kw
    )
    images = ImageFiles(ds, loaded.preprocess) if img is None else FeatureRows(img)

    def captions(ids) -> torch.Tensor:
        if txt is None:
            return loaded.tokenizer([texts[c] for c in ids])  # (Pc, L)
        return torch.from_numpy(txt[np.asarray(ids, dtype=np.int64)])  # (Pc, F)

    return images, captions, {"image": img is not None, "caption": txt is not None}
