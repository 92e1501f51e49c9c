"""DistributedDataParallel set-up under ``torchrun`` (NCCL on GPUs, gloo on CPU); rank 0 alone writes files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from advreid.utils.misc import get_device


@dataclass(frozen=True)
class DistInfo:
    """``world`` processes, this one's global ``rank`` and ``local_rank`` (1, 0, 0 when not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def dist_info() -> DistInfo:
    """From torchrun's environment variables."""
    return DistInfo(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                    int(os.environ.get("LOCAL_RANK", "0")))


def setup_device(info: DistInfo, device: str | None) -> torch.device:
    """Initialise the process group when distributed and return this process's device."""
    wants_cuda = torch.cuda.is_available() and device != "cpu"
    if info.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    if info.distributed and wants_cuda:
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return get_device(device)


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The module the training step calls: ``model`` itself, or its DDP wrapper."""
    if not info.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown(info: DistInfo) -> None:
    """Final barrier and process-group shutdown."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
