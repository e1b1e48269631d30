"""Data-parallel training under `torchrun` (PyTorch DDP; gloo on CPU, NCCL on GPU).

`torchrun --nproc-per-node N $(which tidar) train ...` starts N copies of the trainer; each
reads RANK / WORLD_SIZE / LOCAL_RANK from the environment torchrun sets, joins one process
group, and takes its contiguous share of every global batch (real rows and rollout rows
split alike, so each rank has the same rows and tokens). Each rank's loss is the mean over
its rows and DDP averages gradients, so a step's update is the one-process update of the
same global batch (up to float summation order). Rank 0 alone generates rollouts, evaluates
and writes the output folder; the others wait at a barrier and read what it wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self) -> torch.device:
        """This rank's device: its local GPU when CUDA is there, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The ranks' mean of each scalar (for logging)."""
        names = sorted(values)
        stacked = torch.stack([values[n].detach().float() for n in names])
        if self.active:
            dist.all_reduce(stacked)
            stacked /= self.world
        return {n: float(v) for n, v in zip(names, stacked.tolist())}

    def share(self, rows: torch.Tensor, what: str) -> torch.Tensor:
        """This rank's contiguous share of a global batch's rows."""
        if rows.shape[0] % self.world:
            raise ValueError(f"{what}: {rows.shape[0]} rows per step do not split evenly over {self.world} ranks")
        size = rows.shape[0] // self.world
        return rows[self.rank * size: (self.rank + 1) * size]


def join() -> Group:
    """The process group torchrun describes in the environment, joined; a one-process group
    when not started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    group = Group(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(group.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return group
