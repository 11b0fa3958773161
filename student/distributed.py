"""Data parallelism for train-student: torchrun's environment, slices of a batch, gathers.

Every rank builds the same batches (the sampler is deterministic); rank r encodes its slice
``np.array_split(pool, world)[r]`` of the step's images and captions, and the embeddings are
all-gathered *with gradients*, so every rank computes the loss over the whole batch (in-batch
hard negatives may sit on any rank). The gather's backward sums each rank's gradient into the
owner's slice (W times the gradient of the one shared loss); DistributedDataParallel then averages
over the W ranks, which gives exactly the single-process gradient (open_clip's gather_with_grad).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int  # global rank (0 writes every file)
    world: int  # number of processes
    device: torch.device  # this process's device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistEnv:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(0, 1, device)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), device)


def close_distributed(env: DistEnv) -> None:
    """Leave the process group this module joined."""
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.world > 1:
        dist.barrier()


def my_slice(items: np.ndarray, env: DistEnv) -> np.ndarray:
    """This rank's contiguous share of ``items`` (shares differ in length by at most one)."""
    return np.array_split(items, env.world)[env.rank]


def gather_rows(x: torch.Tensor, total: int, env: DistEnv) -> torch.Tensor:
    """(total, D): every rank's (n_r, D) slice, in rank order, differentiable (module docstring)."""
    if env.world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = [len(s) for s in np.array_split(np.arange(total), env.world)]
    pad = max(sizes) - x.shape[0]  # all_gather needs one shape on every rank
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    parts = all_gather(x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
