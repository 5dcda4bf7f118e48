"""Runs under torchrun: joining the process group that torchrun describes,
and which rank this process is.

    torchrun --nproc_per_node 2 -m experiments.cli run ...   # or: supervised, sweep

Every rank runs the same cells in the same order; only rank 0 writes
results (:func:`experiments.results.managed_run`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """This rank's GPU (torchrun's LOCAL_RANK) where there is one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{torch.cuda.current_device()}" if dist.is_initialized() else "cuda")


@contextlib.contextmanager
def process_group_from_env() -> Iterator[bool]:
    """Join the process group that torchrun describes in the environment
    (gloo on CPU, nccl on GPU) and leave it at the end; yields False, doing
    nothing, when the process was not launched by torchrun with more than
    one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield False
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield True
    finally:
        dist.destroy_process_group()
