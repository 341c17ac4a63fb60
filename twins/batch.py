"""How many pairs a training step takes on this GPU (`--bs auto`): the largest batch that survives
real training steps of this model at this size, found by accelerate's search, less a safety margin;
below the recipe's batch, gradients are accumulated so that the optimisation stays the recipe's."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from accelerate.utils import find_executable_batch_size

from .loss import DCALLoss
from .model import DCAL

MARGIN = 0.1  # fewer pairs than the largest that fit: validation, heatmaps and fragmentation need room too
MAX_FACTOR = 2  # the search starts at this multiple of the recipe's batch


def largest_fitting(step: Callable[[int], None], start: int) -> int:
    """The first batch size, from `start` down by accelerate's 10 % steps, for which `step(batch)`
    runs without running out of memory."""
    @find_executable_batch_size(starting_batch_size=start)
    def probe(batch_size: int) -> int:
        step(batch_size)
        return batch_size
    return probe()


def plan(fits: int, recipe_bs: int, recipe_lr: float) -> dict:
    """From the largest batch that fits to the run's `bs` (pairs per optimiser step), `accum`
    (micro-batches per step) and `lr`. Memory to spare: more pairs per step and the learning rate
    scaled linearly with them. Memory short: the recipe's batch in `accum` equal micro-batches."""
    safe = max(1, int(fits * (1 - MARGIN)))
    if safe >= recipe_bs:
        return {"bs": safe, "accum": 1, "lr": recipe_lr * safe / recipe_bs}
    micro = max(d for d in range(1, safe + 1) if recipe_bs % d == 0)
    return {"bs": recipe_bs, "accum": recipe_bs // micro, "lr": recipe_lr}


def training_step(model: DCAL, n_classes: int, size: int, dev: torch.device) -> Callable[[int], None]:
    """A real training step of a copy of `model` on random images of the run's size: forward with PWCA
    and GLCA, the DCAL loss, backward, an AdamW step, fp16 autocast and loss scaling on CUDA."""
    net = copy.deepcopy(model).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
    loss_fn = DCALLoss()

    def step(bs: int) -> None:
        opt.zero_grad(set_to_none=True)
        xa, xb = (torch.randn(bs, 3, size, size, device=dev) for _ in range(2))
        ids = torch.randint(0, n_classes, (2, bs), device=dev)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            loss = loss_fn(net(xa, xb), (ids[0] == ids[1]).float(), ids[0], ids[1])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return step
