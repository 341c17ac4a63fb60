"""One run trained by several processes, one per GPU: starting them (`launch`, from plain `python
train.py`; `accelerate launch` and `torchrun` work too), which process this is, sharing and gathering
values, and fastai's DDP callback. In one process every helper is a no-op."""
from __future__ import annotations

import logging
import sys
import uuid
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


def launch(n: int, argv: list[str]) -> int:
    """`python argv...` in `n` processes, one per GPU, by torch's elastic launcher (what `torchrun` runs:
    a stray process is stopped when another fails, a signal to this one reaches them all). Returns the
    main process's exit status, which reports every stop (the others then end with 0), else the failed
    process's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.disable(logging.CRITICAL)  # the launcher's own reports of a failure: the processes said it already
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=1)
    try:
        elastic_launch(config, sys.executable)(*argv)
        return 0
    except SignalException:  # forwarded to the processes, which stopped (the main one said how)
        return 130
    except ChildFailedError as e:
        failed = {f.local_rank: f.exitcode for f in e.failures.values()}
        first = min(failed, key=lambda r: (failed[r] <= 0, r))  # the main one, unless only stopped by the launcher
        code = failed[first]
        if first:
            print(f"Process {first + 1} of {n} failed (exit status {code}); its error is above", file=sys.stderr)
        return code if code > 0 else 128 - code  # killed by signal -code


class Distributed(DistributedTrainer):
    """fastai's DistributedTrainer (accelerate wraps the model in DDP) with the loaders left as they are:
    `PairDL` shards itself. fastai 2.8's `DistributedDL` cannot be used: it sends the batch order as a
    `.cuda()` tensor (no gloo group on the CPU, where the tests run), and gives each process a contiguous
    block, so batches gathered for the validation metrics would not follow image order."""

    def __init__(self):
        super().__init__(sync_bn=False, cpu=not torch.cuda.is_available())  # a ViT has no batch norm

    def _wrap_dl(self, dl):
        return dl
