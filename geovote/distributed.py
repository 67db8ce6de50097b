"""Devices and torchrun, shared by the stages: this process's device, rank and world size, a barrier.

    GEOVOTE_DEVICE=cpu python -m embed.build ...     # force the CPU where a GPU is present (tests do)

torch is imported only inside the functions: the numpy core never pays for it.
"""
from __future__ import annotations

import os
from datetime import timedelta

DEVICE_ENV = "GEOVOTE_DEVICE"
# the default timeout of a collective (NCCL's own is 10 minutes): generous, since a rank may wait while
# another finishes a slow shard; phases that only rank 0 runs (index, tuning) wait on nobody
DEFAULT_TIMEOUT_MIN = 120.0
# how long joining the group waits for every rank to arrive: ranks start apart by their imports and file
# listings (seconds on a loaded machine), whatever the collectives' own timeout is
RENDEZVOUS_TIMEOUT_MIN = 10.0


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


def init(timeout_min: float = DEFAULT_TIMEOUT_MIN) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL when this
    process works on a GPU (bound to it first), gloo otherwise, with `timeout_min` for every collective
    (joining waits at least RENDEZVOUS_TIMEOUT_MIN for the other ranks); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        device = pick_device()
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        timeout = timedelta(minutes=timeout_min)
        # a torch with dist.set_timeout shortens the timeout once joined; an older one keeps one for both
        set_timeout = getattr(dist, "set_timeout", None)
        join = max(timeout, timedelta(minutes=RENDEZVOUS_TIMEOUT_MIN)) if set_timeout else timeout
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=join)
        if join != timeout:
            set_timeout(timeout)
    return dist.get_rank(), dist.get_world_size()


def leave() -> None:
    """Leave the process group (no-op outside torchrun): a rank that is done waits on nobody."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value, src: int = 0):
    """Rank `src`'s value on every rank (the value itself outside torchrun): one decision for all."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather(value) -> list:
    """Every rank's value, in rank order ([value] outside torchrun)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
