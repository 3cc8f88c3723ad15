"""Distributed training plumbing: one process or ``torchrun`` ranks (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ferret_runtime.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # setup() created the process group, so close() destroys it

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_type: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def close(self) -> None:
        """After a successful run: wait for every rank, then destroy the group we created (left
        alive, gloo's threads can abort the process at exit: "terminate called without an active
        exception")."""
        if self.world > 1 and self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"Received trainer.device={name!r}, but PyTorch sees no CUDA device")
        dev = torch.device("cuda", d.local_rank if d.world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    return dev
