"""One run trained by several processes, one per GPU (started by `accelerate launch` or `torchrun`):
which process this is, sharing and gathering values, and fastai's DDP callback.
Plain `python train.py` is the one-process case: every helper is then a no-op."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from fastai.distributed import DistributedTrainer
from fastai.torch_core import num_distrib, rank_distrib
from torch import nn

from .errors import TwinsError

T = TypeVar("T")


def world() -> int:
    """How many processes train this run (fastai reads WORLD_SIZE, which both launchers set)."""
    return max(1, num_distrib())


def rank() -> int:
    return rank_distrib()


def is_main() -> bool:
    """The process that writes (checkpoints, maps, reports, lock, W&B) and prints."""
    return rank() == 0


def start() -> None:
    """Join the other processes (accelerate: NCCL on GPUs, each process on its own; gloo on the CPU)."""
    if world() > 1:
        PartialState(cpu=not torch.cuda.is_available())


def share(obj):
    """The main process's `obj`, on every process."""
    return broadcast_object_list([obj])[0] if world() > 1 else obj


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` in the main process only; its result, or the TwinsError it raised, in every process."""
    result = error = None
    if is_main():
        try:
            result = fn()
        except TwinsError as e:
            error = e
    result, error = share((result, error))
    if error is not None:
        raise error
    return result


def gather(obj) -> list:
    """Every process's `obj`, in process order."""
    return gather_object([obj]) if world() > 1 else [obj]


def bare(model: nn.Module) -> nn.Module:
    """The model inside DDP's wrapper (callbacks and checkpoints use the model's own methods and keys)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def launch_command(args: str) -> str:
    """The command line that runs `train.py args` as this run runs (one process, or one per GPU)."""
    if world() == 1:
        return f"python train.py {args}"
    return f"accelerate launch --multi_gpu --num_processes {world()} train.py {args}"


class Distributed(DistributedTrainer):
    """fastai's DistributedTrainer (accelerate wraps the model in DDP; the backward pass is fastai's
    own `Learner._backward`, the callback's `_backward` is no event), with the loaders left as they
    are: `PairDL` shards itself. fastai's `DistributedDL` (fastai 2.8)
    cannot be used: its `_broadcast` sends the batch order as a `.cuda()` tensor (so no gloo process
    group on the CPU, where the tests run), and it gives each process a contiguous block of the data,
    so batches gathered for the validation metrics interleave the processes instead of following
    image order."""

    def __init__(self):
        super().__init__(sync_bn=False, cpu=not torch.cuda.is_available())  # a ViT has no batch norm

    def _wrap_dl(self, dl):
        return dl
