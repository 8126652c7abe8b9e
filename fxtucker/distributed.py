"""Where training runs: the device, the torchrun process group and DistributedDataParallel.

Under torchrun (``WORLD_SIZE`` > 1) :func:`setup_distributed` joins the process group (NCCL on
GPUs, gloo on CPUs) and returns a :class:`Dist` through which the loop sums its metrics, lets
rank 0 alone write files and gives every rank rank 0's buffers. Without DDP every call here is a
no-op or the plain single-process case. Each rank's share of the batches is
:mod:`fxtucker.batches`' matter. This is the one module of fxtucker that calls torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Dist",
    "env_world_size",
    "wants_ddp",
    "model_device",
    "resolve_device",
    "setup_distributed",
    "wrap_ddp",
    "launch_rank",
    "launch_device",
    "finish_distributed",
]


@dataclass
class Dist:
    """Rank and world size of this process, and the device collectives run on."""

    rank: int = 0
    world: int = 1
    comm_device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a float64 tensor over the ranks (a no-op without DDP)."""
        if not self.active:
            return values
        values = values.to(self.comm_device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def main_failed(self, failed: bool) -> bool:
        """Rank 0 tells the others whether its file writes failed."""
        if not self.active:
            return failed
        flag = torch.tensor([int(failed)], device=self.comm_device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, say)."""
        if not self.active:
            return
        for b in model.buffers():
            t = b.detach().to(self.comm_device)
            dist.broadcast(t, src=0)
            b.detach().copy_(t)


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"the environment variable WORLD_SIZE is {raw!r}, not an integer; fxtucker.train "
            f"reads it to decide on DistributedDataParallel: unset it or launch with torchrun"
        ) from None


def wants_ddp() -> bool:
    """Whether this process is one of several (launched by torchrun or an initialised group)."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    return env_world_size() > 1


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def resolve_device(model: nn.Module, device: Any, ddp: bool) -> torch.device:
    """The device to train on: ``device``, else the local GPU under DDP, else the model's."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"train: device={device!r} is not a device ({e}); pass e.g. 'cpu', 'cuda', "
                f"'cuda:1' or a torch.device"
            ) from None
    elif ddp and torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        dev = model_device(model)
    if dev.type == "cuda" and dev.index is None:
        index = int(os.environ.get("LOCAL_RANK", "0")) if ddp else torch.cuda.current_device()
        dev = torch.device("cuda", index)
    return dev


def setup_distributed(dev: torch.device) -> Dist:
    """Join (initialising if needed) the process group; a single-process Dist without DDP."""
    if not wants_ddp():
        return Dist()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL's object collectives use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    comm = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), comm_device=comm)


def wrap_ddp(model: nn.Module, ctx: Dist, dev: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel under DDP (``model`` itself otherwise)."""
    if not ctx.active:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None)


def launch_rank() -> int:
    """This process's rank under torchrun (0 in a single process), before or after train() joins the group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0  # a stray RANK without torchrun's WORLD_SIZE must not silence the only process
    return int(os.environ.get("RANK", "0") or 0)


def launch_device() -> torch.device:
    """Where train() puts this rank's model by default: the local GPU under torchrun with GPUs, else the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def finish_distributed() -> None:
    """Under torchrun: wait until every rank (rank 0's writes included) is done, then leave the process group."""
    if dist.is_available() and dist.is_initialized():
        # Every rank stays until the last one is done: a rank that tears gloo down early can abort the others.
        dist.barrier()
        dist.destroy_process_group()
