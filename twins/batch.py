"""How many pairs a training step takes on this GPU (`--bs auto`): the largest batch that survives
real training steps of this model at this size, found by accelerate's search, less a safety margin;
below the recipe's batch, gradients are accumulated so that the optimisation stays the recipe's."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from accelerate.utils import find_executable_batch_size

from .errors import CheckpointError
from .loss import DCALLoss
from .model import DCAL, mixed_precision

MARGIN = 0.1  # fewer pairs than the largest that fit: validation, heatmaps and fragmentation need room too
MAX_FACTOR = 2  # the search starts at this multiple of the recipe's batch
MAX_PROBE_STEPS = 20  # each overflow halves the loss scale: 65536 reaches 1 in 16 steps


def largest_fitting(step: Callable[[int], None], start: int) -> int:
    """The first batch size, from `start` down by accelerate's 10 % steps, for which `step(batch)`
    runs without running out of memory."""
    @find_executable_batch_size(starting_batch_size=start)
    def probe(batch_size: int) -> int:
        step(batch_size)
        return batch_size
    return probe()


def micro_batch(share: int, limit: int) -> int:
    """The largest micro-batch of at most `limit` pairs that divides a process's `share` of a step."""
    return max(d for d in range(1, min(share, limit) + 1) if share % d == 0)


def plan(fits: int, recipe_bs: int, recipe_lr: float, processes: int = 1) -> dict:
    """From the largest batch that fits one process's GPU to the run's `bs` (pairs per optimiser
    step, all processes together), `accum` (micro-batches per step in each process), `lr` and
    `processes`. Memory to spare: every process fills its GPU, the learning rate scaled linearly
    with the pairs per step. Memory short: the recipe's pairs per step (rounded up to a multiple of
    `processes`), shared by the processes, each in `accum` equal micro-batches."""
    safe = max(1, int(fits * (1 - MARGIN)))
    if safe * processes >= recipe_bs:
        bs, accum = safe * processes, 1
    else:
        share = -(-recipe_bs // processes)
        bs, accum = share * processes, share // micro_batch(share, safe)
    return {"bs": bs, "accum": accum, "lr": recipe_lr * bs / recipe_bs, "processes": processes}


def reshare(cfg: dict, processes: int) -> dict:
    """A run's steps (`bs` pairs) taken by another number of processes (a resume on more or fewer
    GPUs): the same pairs per step and learning rate, each process's share in micro-batches no
    larger than the run's (the memory known to fit). Returns the new `accum` and `processes`."""
    if cfg["bs"] % processes:
        fit = [n for n in range(1, cfg["bs"] + 1) if cfg["bs"] % n == 0 and n <= 8]
        raise CheckpointError(f"this run steps with {cfg['bs']} pairs, which {processes} processes cannot share "
                              f"equally; resume it with {' or '.join(map(str, fit))} process(es)")
    micro = cfg["bs"] // (cfg["processes"] * cfg["accum"])
    share = cfg["bs"] // processes
    return {"accum": share // micro_batch(share, micro), "processes": processes}


def describe(cfg: dict) -> str:
    """The effective batch of a run and its learning rate, in words."""
    n, share = cfg["processes"], cfg["bs"] // cfg["processes"]
    parts = [f"{n} processes x {share}"] if n > 1 else []
    if cfg["accum"] > 1:
        parts.append(f"{cfg['accum']} micro-batches of {share // cfg['accum']}" + (" each" if n > 1 else ""))
    return f"{cfg['bs']} pairs per optimiser step" + (f" ({', '.join(parts)})" if parts else "") + \
        f", peak lr {cfg['lr']:.3g}"


def training_step(model: DCAL, n_classes: int, size: int, dev: torch.device) -> Callable[[int], None]:
    """Real training steps of a copy of `model` on random images of the run's size: forward with PWCA
    and GLCA, the DCAL loss, backward, an AdamW step, fp16 autocast and loss scaling on CUDA. Steps
    repeat until one has run with AdamW's state in memory: a fresh GradScaler's first steps may
    overflow and be skipped, and the state is allocated only at the first step taken."""
    net = copy.deepcopy(model).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    loss_fn = DCALLoss()

    def step(bs: int) -> None:
        for _ in range(MAX_PROBE_STEPS):
            allocated = bool(opt.state)
            opt.zero_grad(set_to_none=True)
            xa, xb = (torch.randn(bs, 3, size, size, device=dev) for _ in range(2))
            ids = torch.randint(0, n_classes, (2, bs), device=dev)
            with mixed_precision(dev):
                loss = loss_fn(net(xa, xb), (ids[0] == ids[1]).float(), ids[0], ids[1])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if allocated:
                return
        raise RuntimeError(f"the batch probe's loss scale overflowed in {MAX_PROBE_STEPS} steps: the model "
                           "gives non-finite gradients at this size")
    return step
