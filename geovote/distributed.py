"""Devices and torchrun, shared by the stages: this process's device, rank and world size, a barrier.

    GEOVOTE_DEVICE=cpu python -m embed.build ...     # force the CPU where a GPU is present (tests do)

torch is imported only inside the functions: the numpy core never pays for it.
"""
from __future__ import annotations

import os
from datetime import timedelta

DEVICE_ENV = "GEOVOTE_DEVICE"
# rank 0 alone builds the index and tunes while the others wait at a barrier: far longer than NCCL's
# 10-minute default on a 5M-image dataset
COLLECTIVE_TIMEOUT = timedelta(hours=4)


def pick_device(device: str = "auto") -> str:
    """'auto': $GEOVOTE_DEVICE when set, else this process's GPU (cuda:<LOCAL_RANK>, as torchrun sets it)
    when torch sees one, else 'cpu'. An explicit 'cuda...' without a GPU is a ValueError."""
    import torch

    if device == "auto":
        device = os.environ.get(DEVICE_ENV, "auto") or "auto"
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but torch sees {torch.cuda.device_count()} GPU(s): start "
                             "at most one process per GPU (torchrun --nproc-per-node)")
        return f"cuda:{local}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def init() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL when this
    process works on a GPU (bound to it first), gloo otherwise; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        device = pick_device()
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
