"""Load tensors from a user's file without running code: no pickled objects, ever.

``torch.load`` unpickles by default, and unpickling can run any code a file names. Every file
from a user path (checkpoints, student weights) goes through :func:`load_tensors`, which keeps
``weights_only=True`` (tensors and plain containers only) and turns a refused file into a
one-line error that names it; safetensors and ``np.load(allow_pickle=False)`` are safe already.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


def load_tensors(path: str | Path, fix: str) -> Any:
    """The contents of a torch-saved file: tensors and plain containers, on CPU.

    A file holding other pickled objects is refused with a ValueError naming it and ``fix``
    (what to pass instead); nothing in it is run.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"'{path}' holds pickled Python objects besides tensors; cprd does not unpickle them "
            f"(that could run code): {fix} ({first[:160]})"
        ) from e
