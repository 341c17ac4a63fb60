"""What a run derives on this machine, computed once (`make_plan`) and never written back into the
settings: the run's id and how its steps are split. `--bs auto` takes the largest batch that survives
real training steps of this model at this size (accelerate's search) less a margin; below the
settings' `step_pairs`, gradients are accumulated so that the optimisation stays the one planned."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from accelerate.utils import find_executable_batch_size

from .distributed import gather, world
from .errors import CheckpointError
from .loss import DCALLoss
from .model import DCAL, device, mixed_precision
from .settings import Settings

MARGIN = 0.1  # fewer pairs than the largest that fit: validation, heatmaps and fragmentation need room too
MAX_FACTOR = 2  # the search starts at this multiple of the settings' step_pairs
MAX_PROBE_STEPS = 20  # each overflow halves the loss scale: 65536 reaches 1 in 16 steps


@dataclass(frozen=True)
class Plan:
    """How a run trains on this machine: `bs` pairs per optimiser step (all processes together),
    shared by `processes` processes, each in `accum` micro-batches; the peak `lr` for that batch."""
    run_id: str
    bs: int
    accum: int
    processes: int
    lr: float
    branched_from: str | None = None  # the run whose checkpoint this one continued in another folder

    @property
    def micro_bs(self) -> int:
        """Pairs per forward pass in each process."""
        return self.bs // self.processes // self.accum

    def __str__(self) -> str:
        n, share = self.processes, self.bs // self.processes
        parts = [f"{n} processes x {share}"] if n > 1 else []
        if self.accum > 1:
            parts.append(f"{self.accum} micro-batches of {self.micro_bs}" + (" each" if n > 1 else ""))
        return (f"{self.bs} pairs per optimiser step" + (f" ({', '.join(parts)})" if parts else "")
                + f", peak lr {self.lr:.3g}")


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


def from_fits(fits: int, step_pairs: int, lr: float, processes: int, run_id: str) -> Plan:
    """The plan from the largest batch that fits one process's GPU. Memory to spare: every process
    fills its GPU, `lr` scaled linearly with the pairs per step. Memory short: `step_pairs` pairs per
    step (rounded up to a multiple of `processes`), shared by the processes, each in equal micro-batches."""
    safe = max(1, int(fits * (1 - MARGIN)))
    if safe * processes >= step_pairs:
        bs, accum = safe * processes, 1
    else:
        share = -(-step_pairs // processes)
        bs, accum = share * processes, share // micro_batch(share, safe)
    return Plan(run_id, bs, accum, processes, lr * bs / step_pairs)


def reshare(plan: Plan, processes: int) -> Plan:
    """A run's steps taken by another number of processes (a resume on more or fewer GPUs): the same
    pairs per step and learning rate, each process's share in micro-batches no larger than the run's
    (the memory known to fit)."""
    if plan.bs % processes:
        fit = [n for n in range(1, plan.bs + 1) if plan.bs % n == 0 and n <= 8]
        raise CheckpointError(f"this run steps with {plan.bs} pairs, which {processes} processes cannot share "
                              f"equally; resume it with {' or '.join(map(str, fit))} process(es)")
    share = plan.bs // processes
    return replace(plan, accum=share // micro_batch(share, plan.micro_bs), processes=processes)


def make_plan(s: Settings, model: DCAL, n_classes: int, run_id: str, saved: Plan | None = None) -> Plan:
    """The plan of a run: a resumed run's own (shared by the processes that run now; under `run_id`, a
    branch, when that is not the saved run's); `--bs N`: N pairs
    on each process; `--bs auto`: on CUDA the largest batch that fits in every process, on the CPU
    `step_pairs` in each process (lr scaled with the processes)."""
    n = world()
    if saved is not None:
        if run_id != saved.run_id:  # a resume into another folder: a run of its own
            saved = replace(saved, run_id=run_id, branched_from=saved.run_id)
        if saved.processes == n:
            return saved
        print(f"The run was trained by {saved.processes} process(es); {n} continue it with the same steps")
        return reshare(saved, n)
    if s.bs != "auto":
        return Plan(run_id, s.bs * n, 1, n, s.lr)
    scaled = f"; lr scaled linearly from {s.lr:.3g} at {s.step_pairs} pairs"
    if not torch.cuda.is_available():
        print(f"Batch: the recipe's {s.step_pairs} pairs in each process (no GPU to measure)" + (scaled if n > 1 else ""))
        return Plan(run_id, s.step_pairs * n, 1, n, s.lr * n)
    start = MAX_FACTOR * s.step_pairs
    print(f"Batch: searching the largest that fits on {torch.cuda.get_device_name()}, from {start} pairs down")
    t = time.time()
    fits = min(gather(largest_fitting(training_step(model, n_classes, s.size, device()), start)))
    torch.cuda.empty_cache()
    plan = from_fits(fits, s.step_pairs, s.lr, n, run_id)
    print(f"Batch: {fits} pairs fit{' on each GPU' if n > 1 else ''} (search {time.time() - t:.1f} s), "
          f"{MARGIN:.0%} kept free" + (scaled if plan.lr != s.lr else ""))
    return plan


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
