"""Training callbacks: weight-decay groups, branch-loss logging, the periodic checkpoint and
attention-map capture, and the per-epoch report with the time budget."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import wandb
from fastai.callback.core import Callback, CancelBatchException, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.callback.wandb import WandbCallback
from fastai.learner import Recorder
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import epoch_path, snapshot, write_atomic
from .data import Split
from .distributed import bare, gather, rank, share, world
from .explain import pair_rows
from .tracking import log_figure
from .viz import plot_pairs


def span(seconds: float) -> str:
    """A duration as people read it: 42 s, 3.5 min, 2.25 h."""
    if abs(seconds) < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if abs(seconds) < 3600 else f"{seconds / 3600:.2f} h"


class TimmWeightDecay(Callback):
    """No weight decay on biases, norms, position embedding, class token, and the loss's own
    parameters (uncertainty weights, pair-logit scale/bias), as timm and DeiT train ViTs."""
    order = 0

    def before_fit(self):
        if self.opt is None:  # `learn.validate()` runs before_fit too, with no optimizer yet
            return
        skip = self.model.no_weight_decay()
        for name, p in self.model.named_parameters():
            if p.ndim <= 1 or name in skip:
                self.opt.state[p]["do_wd"] = False


class BranchLogger(Callback):
    """Each branch loss and uncertainty weight: to W&B every batch; their epoch means in `means()`.
    With several processes, the mean over all processes' batches (like fastai's train_loss)."""
    order, run_valid = WandbCallback.order - 1, False  # its uncommitted values ride on W&B's commit of the batch

    def before_epoch(self):
        self.sums, self.count = {}, 0

    def after_batch(self):
        last = self.learn.loss_func.last
        values = self.learn.to_detach(torch.stack(list(last.values())))  # gathered: one sync, not six
        last = dict(zip(last, values.view(-1, len(last)).mean(0).tolist()))
        for k, v in last.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if wandb.run is not None:
            wandb.run.log({f"branch/{k}": v for k, v in last.items()}, commit=False)

    def means(self) -> dict:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


class EveryNEpochs(Callback):
    """Calls `act(epochs_done)` after every `every`-th trained epoch and after the last. Never for
    epochs skipped on resume: fastai's SkipToEpoch still fires after_epoch for them."""

    def __init__(self, every: int):
        self.every = every

    def before_epoch(self):
        self.trained = False

    def after_train(self):
        self.trained = True

    def after_epoch(self):
        done = self.epoch + 1
        if self.trained and (done % self.every == 0 or done == self.n_epoch):
            self.act(done)  # the subclass's


class AgreedStop(Callback):
    """Stops that every process agrees on, at the same batch: a non-finite training loss in any process, a
    signal to any or a checkpoint not written (`request`). After every loss, before any gradient is
    exchanged, the processes exchange their reasons (one small all-gather) and all cancel the fit
    together, so none is left waiting in a collective. `learn.stop` says (kind, why)."""
    order, reason = TerminateOnNaNCallback.order, None

    def before_fit(self):
        self.learn.stop = None

    def request(self, kind: str, why: str):
        self.reason = self.reason or (kind, why)

    def after_loss(self):
        if self.training and not torch.isfinite(self.loss):
            where = f" in process {rank() + 1} of {world()}" if world() > 1 else ""
            self.request("diverged", f"the training loss became {float(self.loss.detach())}{where} in epoch "
                         f"{self.epoch + 1} (step {self.iter // self.plan.accum + 1})")
        agreed = next((r for r in gather(self.reason) if r), None)
        if agreed:
            self.learn.stop = agreed
            raise CancelFitException()


class StepAccumulation(Callback):
    """An optimiser step every `accum` micro-batches, of their mean gradient, all-reduced once per step
    (what DDP's `no_sync` sets, for the others), at the learning rate and momentum of the step's place in
    the one-cycle schedule: a step trains the same whichever processes and micro-batches share it. The
    loader gives each process whole steps (`data.shard`), so no step straddles two epochs. (fastai's
    GradientAccumulation counts across epochs, all-reduces every micro-batch and schedules per batch.)"""
    order, run_valid = MixedPrecision.order - 4, False  # as fastai's: before the loss scaler's step

    def before_batch(self):
        self.last = (self.iter + 1) % self.plan.accum == 0
        if isinstance(self.model, DistributedDataParallel):
            self.model.require_backward_grad_sync = self.last

    def after_loss(self):
        self.learn.loss_grad = self.loss_grad / self.plan.accum

    def before_step(self):
        if not self.last:
            raise CancelBatchException()  # keep the gradients: no step, no zero_grad
        if (sched := getattr(self.learn, "param_scheduler", None)) is not None:  # fastai's, by train step
            steps = self.n_iter // self.plan.accum
            sched._update_val((self.epoch * steps + self.iter // self.plan.accum) / (self.n_epoch * steps))


class Checkpoint(EveryNEpochs):
    """`ep{N}.pth` (N = epochs completed) in `folder` every `every` epochs and at the end, with `meta`
    (`checkpoint.run_meta`). The last trained epoch is also kept in memory, so that a run
    stopped between checkpoints (time limit, SIGTERM, Ctrl-C) still saves it: `save_last()`."""
    order = Recorder.order + 1

    def __init__(self, folder: Path, every: int, meta: dict):
        super().__init__(every)
        self.folder, self.meta = Path(folder), meta
        self.last = self.saved = None  # (epoch, serialised checkpoint) of the last trained epoch; epoch on disk
        self.failed = None  # why the last write failed (a full disk): the run stops

    def after_epoch(self):
        if self.trained:
            if not all(p.isfinite().all() for p in self.model.parameters()):  # never a NaN checkpoint
                self.agreed_stop.request("diverged", f"the weights became NaN or infinite in epoch {self.epoch + 1}")
                return
            self.last = (self.epoch + 1, snapshot(self.learn, self.epoch + 1, self.meta))
        super().after_epoch()

    def act(self, done: int):
        if self.save_last() is None:  # no training without its checkpoints
            self.agreed_stop.request("disk", self.failed)

    def after_fit(self):
        self.save_last()

    def save_last(self) -> Path | None:
        """Write the last trained epoch's checkpoint unless it is on disk already; returns its path, or
        None when there is none or it cannot be written (`failed` says why)."""
        if self.last is None:
            return None
        done, data = self.last
        path = epoch_path(self.folder, done)
        if self.saved != done:
            try:
                write_atomic(path, data)
            except OSError as e:
                self.failed = f"{path} could not be written ({e.strerror or e})"
                return None
            self.saved = done
        return path


class RestoreScaler(Callback):
    """On resume: the fp16 loss scale the checkpoint was saved with, put back just before the first
    trained epoch (after fastai's MixedPrecision has made its loss scaler)."""

    def __init__(self, state: dict | None):
        self.state = state

    def before_train(self):
        if self.state is not None and getattr(self.learn, "scaler", None) is not None:
            self.learn.scaler.load_state_dict(self.state)
        self.state = None


class AttentionMaps(EveryNEpochs):
    """`n` fixed twin pairs of `split` (one image of a person, one of their twin) drawn after validation
    (`explain.pair_rows`: rollout heatmaps, GLCA tokens, the verdict at the epoch's threshold and what
    decided it); saved as `folder/ep{N}.png` and logged to W&B."""
    order = Checkpoint.order + 1

    def __init__(self, split: Split, cache: torch.Tensor, folder: Path, every: int, n: int, seed: int):
        super().__init__(every)
        rng = np.random.default_rng(seed)
        self.pairs = [(int(rng.choice(split.images_of(a))), int(rng.choice(split.images_of(b))))
                      for a, b in (split.twin_pairs[k] for k in rng.permutation(len(split.twin_pairs))[:n])]
        self.split, self.cache, self.folder = split, cache, Path(folder)

    def act(self, done: int):
        rows = pair_rows(bare(self.model), self.split, self.cache, self.pairs, self.valid_report["eer_threshold"])
        path = self.folder / f"ep{done}.png"
        plot_pairs(rows, path, title=f"twin pairs, epoch {done} (outer: rollout + GLCA tokens; inner: what decided)")
        log_figure("attention_maps", path, commit=False)


class EpochReport(EveryNEpochs):
    """One line per trained epoch, and the same figures in W&B: losses, metrics, branch losses, the epoch's
    time (validation, maps and checkpoint included), pairs/s of all processes, this process's peak GPU
    memory, when the run will end. Before an epoch that would end past `deadline` (a time.time() value)
    the main process stops the run for all (`Checkpoint` saves the last epoch; `stopped` says so)."""
    order = ProgressCallback.order + 1  # after everything else an epoch does

    def __init__(self, deadline: float | None):
        super().__init__(every=1)
        self.deadline, self.times, self.stopped = deadline, [], False

    def before_epoch(self):
        if self.deadline is not None and share(bool(self.times) and time.time() + max(self.times) > self.deadline):
            self.stopped = True
            raise CancelFitException()
        super().before_epoch()
        self.start = time.time()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def before_train(self):
        self.train_start = time.time()

    def after_train(self):
        super().after_train()
        self.pairs_per_s = self.n_iter * self.plan.bs / self.plan.accum / (time.time() - self.train_start)

    def act(self, done: int):
        took = time.time() - self.start
        self.times.append(took)
        left = (self.n_epoch - done) * sum(self.times) / len(self.times)
        stats = {"epoch_s": took, "pairs_per_s": self.pairs_per_s, "hours_to_end": left / 3600}
        if torch.cuda.is_available():
            stats["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30  # what runs out
        names = self.recorder.metric_names[1:-1]  # without "epoch" and "time"
        values = {n: v for n, v in zip(names, self.recorder.log[1:]) if isinstance(v, (int, float))}  # not "#na#"
        line = (f"epoch {done}/{self.n_epoch} lr {self.opt.hypers[-1]['lr']:.6e} "
                + " ".join(f"{n} {v:.4f}" for n, v in values.items())
                + " | " + " ".join(f"{k} {v:.4f}" for k, v in self.learn.branch_logger.means().items())
                + f" | {span(took)}, {self.pairs_per_s:.1f} pairs/s")
        if "peak_reserved_gib" in stats:
            line += f", peak GPU {stats['peak_reserved_gib']:.2f} GiB reserved"
        line += f" | ends in {span(left)}"
        if self.deadline is not None:
            line += f" (time limit in {span(self.deadline - time.time())})"
        print(line, flush=True)
        if wandb.run is not None:
            wandb.run.log({f"epoch/{k}": v for k, v in stats.items()}, commit=False)
