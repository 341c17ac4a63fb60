"""What a run derives on this machine, computed once (`make_plan`) and never written back into the
settings: the run's id and how its steps are split. The optimisation is the settings' alone (`bs` pairs
per step at `lr`); the machine decides only each process's share of a step and, where a share does not
fit in GPU memory, the micro-batches it is taken in (accelerate's search, less a margin)."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate.utils import find_executable_batch_size

from .distributed import gather, world
from .errors import TwinsError
from .loss import DCALLoss
from .model import DCAL, device, mixed_precision
from .settings import Settings

MARGIN = 0.1  # fewer pairs than the largest that fit: validation, heatmaps and fragmentation need room too
MAX_PROBE_STEPS = 20  # each overflow halves the loss scale: 65536 reaches 1 in 16 steps


@dataclass(frozen=True)
class Plan:
    """How a run trains on this machine: `bs` pairs per optimiser step (all processes together),
    shared by `processes` processes, each in `accum` micro-batches."""
    run_id: str
    bs: int
    accum: int
    processes: int

    @property
    def micro_bs(self) -> int:
        """Pairs per forward pass in each process."""
        return self.bs // self.processes // self.accum

    def __str__(self) -> str:
        n, share = self.processes, self.bs // self.processes
        parts = [f"{n} processes x {share}"] if n > 1 else []
        if self.accum > 1:
            parts.append(f"{self.accum} micro-batches of {self.micro_bs}" + (" each" if n > 1 else ""))
        return f"{self.bs} pairs per optimiser step" + (f" ({', '.join(parts)})" if parts else "")


def largest_fitting(step: Callable[[int], None], start: int) -> int:
    """The first batch size, from `start` down by accelerate's 10 % steps, for which `step(batch)`
    runs without running out of memory; TwinsError when not even one pair fits."""
    @find_executable_batch_size(starting_batch_size=start)
    def probe(batch_size: int) -> int:
        step(batch_size)
        return batch_size
    try:
        return probe()
    except RuntimeError as e:
        if "No executable batch size found" not in str(e):
            raise
        raise TwinsError("not even one training pair fits in this GPU's memory: pass a smaller --size") from None


def split(run_id: str, bs: int, processes: int, fits: int) -> Plan:
    """`bs` pairs per step shared equally by `processes`, each share in equal micro-batches: the largest
    that divides it and is at most `fits` pairs."""
    if bs % processes:
        fit = [n for n in range(1, min(bs, 8) + 1) if bs % n == 0]
        raise TwinsError(f"{bs} pairs per step cannot be shared equally by {processes} processes: use "
                         f"{' or '.join(map(str, fit))} GPU(s) (CUDA_VISIBLE_DEVICES=0,1,...), or a fresh run with a "
                         f"--bs that {processes} divides")
    share = bs // processes
    return Plan(run_id, bs, share // max(d for d in range(1, min(share, fits) + 1) if share % d == 0), processes)


def make_plan(s: Settings, model: DCAL, n_classes: int, run_id: str, saved: Plan | None = None) -> Plan:
    """`s.bs` pairs per step shared by the processes that run now, in micro-batches no larger than what fits
    (measured on CUDA, less MARGIN; at most a resumed run's own: known to fit; the whole share on the CPU)."""
    n = world()
    if saved is not None:
        if saved.processes == n:
            return saved
        print(f"The run was trained by {saved.processes} process(es); {n} continue it with the same steps")
        return split(saved.run_id, saved.bs, n, saved.micro_bs)
    plan = split(run_id, s.bs, n, s.bs)  # each share in one forward pass; refused when n cannot share a step
    if not torch.cuda.is_available():
        return plan
    start = int(plan.micro_bs / (1 - MARGIN)) + 1  # a share that fits with MARGIN to spare is taken whole
    print(f"Batch: measuring the largest micro-batch that fits on {torch.cuda.get_device_name()}, from {start} "
          "pairs down")
    t = time.time()
    fits = min(gather(largest_fitting(training_step(model, n_classes, s.size, device()), start)))
    torch.cuda.empty_cache()
    print(f"Batch: {fits} pairs fit{' on each GPU' if n > 1 else ''} (search {time.time() - t:.1f} s), "
          f"{MARGIN:.0%} kept free")
    return split(run_id, s.bs, n, max(1, int(fits * (1 - MARGIN))))


def training_step(model: DCAL, n_classes: int, size: int, dev: torch.device) -> Callable[[int], None]:
    """Real training steps (DCAL loss, AdamW, fp16 and loss scaling on CUDA) of a copy of `model` on random
    images, repeated until one has run with AdamW's state in memory: a fresh GradScaler's first steps may
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
