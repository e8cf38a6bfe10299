"""Multi-process data parallel helpers: detect ``torchrun``, pick the backend, collectives that
are no-ops in a single process.

``torchrun --nproc_per_node K ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; the trainer
then starts a process group (NCCL when the device is CUDA, gloo otherwise) and each process uses
``cuda:LOCAL_RANK`` when the device flag says ``cuda``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from xray.cli_base import parse_device



@dataclass(frozen=True)
class ProcessContext:
    rank: int
    world: int
    device: torch.device


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` flag -> torch.device through :func:`xray.cli_base.parse_device` (auto = CUDA
    when available); plain ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    d = parse_device(device, local_rank)
    if d.type == "cuda":
        torch.cuda.set_device(d)
    return d


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def process_group(device: str | None) -> Iterator[ProcessContext]:
    """Start the process group when running under torchrun (once per process: it stays up for
    the next :func:`ipa_core.trainer.fit` of the same command, e.g. the IPA stage after the VAE
    stage, and is destroyed at exit; re-creating one in the same process can hang)."""
    rank, world, local = env_world()
    dev = resolve_device(device, local)
    if world > 1 and not is_active():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        atexit.register(_destroy)
    yield ProcessContext(rank, world, dev)


def _destroy() -> None:
    if is_active():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel over the trainable parameters (frozen ones are left alone)."""
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a CPU tensor (identity in one process)."""
    if not is_active():
        return t
    t = t.clone()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu() / dist.get_world_size()


def max_scalar(x: float) -> float:
    """Max over processes (NaN propagates), so every process takes the same decision."""
    if not is_active():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    nan = torch.isnan(t).to(t.dtype)
    dist.all_reduce(nan)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float("nan") if nan.item() > 0 else t.item()


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` in one process)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (``obj`` itself in one process)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
