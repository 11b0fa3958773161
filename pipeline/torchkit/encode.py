"""Encode a dataset split with a dual encoder: L2-normalised float32 embeddings, in batches.

Letters in shape comments: N images, M captions, D embedding width, B batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU; ValueError naming --device."""
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(
                f"--device '{device}' is not a torch device; use cpu, cuda, cuda:N or mps"
            ) from None
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
        if dev.type in available and not available[dev.type]():
            raise ValueError(f"--device {device}: no {dev.type} device here; use --device cpu")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def worker_device(
    device: str | None,
    env: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
) -> str | None:
    """The device spec for one worker of a job launched as several processes on one machine.

    torchrun (``LOCAL_RANK``) or srun (``SLURM_LOCALID``) give each process its index on the
    machine: worker i takes ``cuda:i`` (modulo the GPU count, when there are more workers than
    GPUs), so N workers do not all land on GPU 0. An explicit ``--device`` other than plain
    ``cuda`` wins; without CUDA or a launcher the answer is ``device`` unchanged (None lets
    ``pick_device`` choose). Pure: ``env`` and ``cuda_devices`` default to this process's.
    """
    env = os.environ if env is None else env
    local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID"))
    if local is None or device not in (None, "cuda"):
        return device
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if count == 0:
        return device
    return f"cuda:{int(local) % count}"


# --precision (open_clip's names): fp32; amp_bf16 / amp: fp32 weights under bf16 / fp16
# autocast; bf16 / fp16: the weights themselves cast to that type (and autocast to it, which
# casts the inputs of every matmul and convolution). A stage sets it for everything it runs with
# ``precision_scope``; unset, it is amp_bf16 on CUDA (fast and safe for inference) and fp32
# elsewhere.
PRECISIONS = ("fp32", "amp_bf16", "amp", "bf16", "fp16")
_HALF = {
    "amp_bf16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "amp": torch.float16,
    "fp16": torch.float16,
}
_PRECISION: contextvars.ContextVar[str | None] = contextvars.ContextVar("precision", default=None)


def check_precision(precision: str | None) -> str | None:
    """``precision`` unchanged, or a ValueError naming --precision and the choices."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(
            f"--precision '{precision}' is unknown; choose one of {', '.join(PRECISIONS)}"
        )
    return precision


@contextlib.contextmanager
def precision_scope(precision: str | None) -> Iterator[None]:
    """Run the block with ``--precision`` ``precision`` (None: the device's default)."""
    token = _PRECISION.set(check_precision(precision))
    try:
        yield
    finally:
        _PRECISION.reset(token)


def with_precision(stage: Callable) -> Callable:
    """Decorate a stage ``stage(cfg, ...)`` to run under ``precision_scope(cfg.precision)``;
    ``cfg.precision`` None keeps the enclosing scope's (a stage run inside another)."""

    @functools.wraps(stage)
    def run(cfg, *args, **kwargs):
        precision = getattr(cfg, "precision", None)
        if precision is None:
            return stage(cfg, *args, **kwargs)
        with precision_scope(precision):
            return stage(cfg, *args, **kwargs)

    return run


def resolve_precision(device: torch.device) -> str:
    """The precision models run with on ``device``: the scope's, else the device's default."""
    chosen = _PRECISION.get()
    return chosen if chosen is not None else ("amp_bf16" if device.type == "cuda" else "fp32")


def cast_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with its weights cast when the precision is pure bf16 / fp16 (else unchanged)."""
    precision = resolve_precision(device)
    if precision in ("bf16", "fp16"):
        model.to(_HALF[precision])
    return model


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of the precision (resolve_precision): none for fp32."""
    dtype = _HALF.get(resolve_precision(device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def weights_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 of the state dict: every tensor's name, dtype, shape and bytes, in key order.

    A model's identity in manifests and cache keys: equal hashes compute the same function,
    whatever spec or file the weights came from.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], preprocess: Callable):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return self.preprocess(img.convert("RGB"))


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def frozen_features(
    model: torch.nn.Module,
    tower: str,
    inputs: list,
    to_batch: Callable[[list], torch.Tensor],
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
    keys: Sequence[str] | None = None,
) -> np.ndarray | None:
    """(N, F) float32 features of a frozen tower (``model.tower_features``) through the cache,
    or None when the model offers none for ``tower`` (it trains, or it is not such a model).

    ``inputs`` are image paths (keyed by the sha256 of the file's bytes: pass ``keys`` when
    they are known, as a dataset's ``images.sha256`` column is) or captions (keyed by text);
    ``to_batch``
    turns a list of them into the tower's input tensor (``pixel_batches(preprocess)`` or the
    tokenizer). Only what the cache (torchkit/features.py, root ``cache``) lacks is computed;
    hits and misses are logged.
    """
    identity = getattr(model, "feature_identity", None)
    identity = identity(tower) if identity is not None else None
    if identity is None:
        return None
    from pipeline.torchkit.features import FeatureStore, file_keys, text_keys

    device = device or pick_device()
    precision = resolve_precision(device)
    if precision != "fp32":  # features computed in half precision are other features
        identity = {**identity, "precision": precision}
    if keys is None:
        keys = file_keys(inputs) if tower == "image" else text_keys(inputs)
    store = FeatureStore(identity, cache)
    unique = set(keys)
    bar = tqdm(total=len(unique), desc=f"{tower} features", unit="item", disable=not progress)
    bar.update(sum(1 for k in unique if k in store))

    def compute(rows: list[int]) -> list[np.ndarray]:
        batch = to_batch([inputs[i] for i in rows]).to(device)
        with autocast(device):
            feats = model.tower_features(tower, batch)
        return list(feats.float().cpu().numpy().astype(np.float16)[:, None, :])

    items = store.get(keys, compute, batch_size=batch_size, progress=bar.update)
    bar.close()
    log.info(
        "feature cache (%s): %d hits, %d computed, in %s",
        tower,
        store.hits,
        store.misses,
        store.dir,
    )
    return np.concatenate(items).astype(np.float32)  # (N, F)


def pixel_batches(preprocess: Callable) -> Callable[[list[Path]], torch.Tensor]:
    """Image paths -> (N, 3, H, W) preprocessed pixels, decoded in this process."""

    def load(paths: list[Path]) -> torch.Tensor:
        files = _ImageFiles(paths, preprocess)
        return torch.stack([files[i] for i in range(len(paths))])

    return load


def _embed_features(
    encode: Callable, feats: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    out = []
    for sl in _batches(len(feats), batch_size):
        with autocast(device):
            out.append(encode(torch.from_numpy(feats[sl]).to(device), normalize=True).float())
    return _stack([o.cpu().numpy() for o in out])


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    preprocess: Callable,
    paths: list[Path],
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """(N, D) float32 unit-norm image embeddings, row i for ``paths[i]``.

    A frozen image tower's features come from the feature cache (root ``cache``, ``keys`` the
    files' sha256 when known, see ``frozen_features``); only the projection runs on them.
    """
    device = device or pick_device()
    kw = {"batch_size": batch_size, "device": device, "progress": progress, "keys": keys}
    feats = frozen_features(model, "image", paths, pixel_batches(preprocess), cache=cache, **kw)
    if feats is not None:
        return _embed_features(model.encode_image, feats, 4 * batch_size, device)
    # Decoding and resizing run in worker processes so they overlap the forward passes; small
    # jobs stay in-process where worker start-up would cost more than it saves.
    workers = min(4, max((os.cpu_count() or 1) - 1, 0)) if len(paths) > 4 * batch_size else 0
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, preprocess), batch_size=batch_size, num_workers=workers
    )
    out = []
    for pixels in tqdm(loader, desc="encoding images", unit="batch", disable=not progress):
        with autocast(device):
            emb = model.encode_image(pixels.to(device), normalize=True)  # (B, D)
        out.append(emb.float().cpu().numpy())
    return _stack(out)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable,
    texts: list[str],
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
) -> np.ndarray:
    """(M, D) float32 unit-norm caption embeddings, row j for ``texts[j]`` (a frozen text
    tower's features through the feature cache, like ``encode_images``)."""
    device = device or pick_device()
    kw = {"batch_size": batch_size, "device": device, "progress": progress}
    feats = frozen_features(model, "text", texts, tokenizer, cache=cache, **kw)
    if feats is not None:
        return _embed_features(model.encode_text, feats, batch_size, device)
    out = []
    batches = list(_batches(len(texts), batch_size))
    for sl in tqdm(batches, desc="encoding captions", unit="batch", disable=not progress):
        tokens = tokenizer(texts[sl]).to(device)  # (B, L)
        with autocast(device):
            emb = model.encode_text(tokens, normalize=True)  # (B, D)
        out.append(emb.float().cpu().numpy())
    return _stack(out)


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    emb = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    if not np.isfinite(emb).all():
        raise ValueError("the model produced NaN or infinite embeddings; check its weights")
    return emb


def encode_split(
    loaded,
    ds,
    images,
    captions,
    *,
    batch_size: int = 64,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, D), captions (M, D)) unit-norm embeddings of a split's rows, in row order.

    ``loaded`` is a ``student.models.LoadedModel``, ``ds`` the ``Dataset``, ``images`` and
    ``captions`` the frames ``ds.split(name)`` returned.
    """
    paths = [ds.image_path(p) for p in images["path"]]
    img = encode_images(
        loaded.model,
        loaded.preprocess,
        paths,
        batch_size=batch_size,
        device=device,
        progress=progress,
        keys=images["sha256"].to_list(),  # recorded at import: no file is hashed again
    )
    # Text batches are cheaper than image batches: four times as many fit the same time.
    cap = encode_texts(
        loaded.model,
        loaded.tokenizer,
        captions["caption"].to_list(),
        batch_size=4 * batch_size,
        device=device,
        progress=progress,
    )
    return img, cap
