"""Data-parallel training under torchrun: the process group, DDP or FSDP2 wrapping, and agreement across ranks.

`torchrun --nproc_per_node N -m pipeline train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` reads them and
joins the process group (nccl on GPU, gloo on CPU). Without torchrun everything here is a no-op for one process.
Every rank runs the same loop on its own slice of the cache; what must be equal on all ranks (DDK weights, the
LATF ratio) is computed from all-reduced statistics, and `check_identical` proves it bitwise.
"""

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cache_format import KdcacheError

log = logging.getLogger("kdcache")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: torch.device, fsdp: bool) -> tuple[Dist, torch.device]:
    """(this process's place, its device). Joins the process group when started by torchrun (LOCAL_RANK set);
    on CUDA each process takes GPU LOCAL_RANK. Ranks other than 0 log warnings only (all, with --debug)."""
    if "LOCAL_RANK" not in os.environ:
        if fsdp:
            raise KdcacheError("--fsdp needs a torchrun launch (torchrun --nproc_per_node N -m pipeline train ...)")
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    if not d.main and log.getEffectiveLevel() > logging.DEBUG:
        log.setLevel(logging.WARNING)
    return d, device


def close(finished: bool) -> None:
    """Leave the process group; after a finished run, once every rank is done with its collectives (tearing gloo
    down under a rank still in one can abort the process). After an error, at once: torchrun stops the others."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, layers: list[torch.nn.Module], fsdp: bool, d: Dist, device: torch.device):
    """The module to train: itself (one process), DDP, or FSDP2 with every layer in `layers` its own unit."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        return fully_shard(module)
    if d.world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def grad_sync(module: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when `sync` (the last
    micro-batch of an optimizer step), as DDP's no_sync / FSDP2's set_requires_gradient_sync do."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
    elif isinstance(module, DistributedDataParallel) and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum over ranks (the tensor itself on one process); every rank gets the same bits."""
    if d.world_size > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def gather(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable python)."""
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def check_identical(obj, what: str, d: Dist) -> None:
    """KdcacheError on every rank unless `obj` (python floats, compared by their exact repr) is the same on all
    ranks."""
    values = gather(repr(obj), d)
    if len(set(values)) > 1:
        raise KdcacheError(f"{what} differ across ranks: {values}")


def on_main(fn, d: Dist):
    """fn() run by rank 0 only; its result, or the KdcacheError it raised, on every rank."""
    result, error = None, None
    if d.main:
        try:
            result = fn()
        except KdcacheError as e:
            error = e
    if d.world_size > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result
