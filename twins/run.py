"""A training run, top to bottom: check (GPU, checkpoint, data) -> claim the run folder -> build the
Learner (model, the plan for this machine) -> fit -> stop with a checkpoint (time limit, Ctrl-C,
SIGTERM) or evaluate on the test twins. `--check` is that run on a step budget in a scratch folder;
`--lr-find` takes the same first steps and ends after the build."""
from __future__ import annotations

import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import fastai
import matplotlib.pyplot as plt
import timm
import torch
from fastai.callback.core import Callback, CancelTrainException
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from fastcore.basics import noop

from .callbacks import (AgreedStop, AttentionMaps, BranchLogger, Checkpoint, EpochReport, RestoreScaler,
                        StepAccumulation, TimmWeightDecay, span)
from .checkpoint import check_classes, claimed, epoch_path, load_checkpoint, new_run_id, restore, run_meta
from .data import RedrawPairs, TwinData, pair_dataloaders, prepare_data
from .distributed import Distributed, is_main, on_main, share, world
from .errors import CheckpointError, DataError, DivergedError
from .evaluate import evaluate
from .explain import KINDS, SUMMARY_PAIRS, pair_maps, write_summary
from .loss import DCALLoss
from .metrics import TwinsMetric
from .model import DCAL, check_cuda_arch, device
from .plan import Plan, make_plan
from .settings import KAGGLE_TIME_LIMIT_H, Settings
from .tracking import Wandb, log_figure, start_wandb

SUMMARY_SHARE = 0.05  # at the end of training the pair-map summary may take this share of the training time


def prepare(s: Settings, ckpt: dict | None = None, source: str | None = None) -> TwinData:
    """Everything a run can check before the slow work: the GPU, the checkpoint's epoch, the JSON
    files, every image path, and the training ids against the checkpoint's."""
    check_cuda_arch()
    if ckpt is not None and ckpt["epoch"] >= s.epochs:
        raise CheckpointError(f"checkpoint {source} is at epoch {ckpt['epoch']}, already the last of --epochs "
                              f"{s.epochs}; pass a larger --epochs to train further")
    set_seed(s.seed)  # python, numpy and torch: fastai's shuffling draws from python's random
    data = prepare_data(s)
    if s.bs > len(data.train.paths):
        raise DataError(f"--bs {s.bs}: more pairs per step than the {len(data.train.paths)} training images (each "
                        "anchors one pair per epoch); pass a smaller --bs")
    if ckpt is not None:
        check_classes(ckpt, list(data.classes), f"checkpoint {source}")
    return data


def make_learner(s: Settings, plan: Plan, data: TwinData, model: DCAL) -> Learner:
    """The Learner of a run, its batch split as `plan` says (as many processes must run); the
    settings and the plan live on it (`learn.settings`, `learn.plan`), where callbacks read them."""
    dls = pair_dataloaders(data.train, data.valid, data.caches["train"], data.caches["valid"], data.classes,
                           bs=plan.micro_bs, accum=plan.accum, size=s.size, seed=s.seed, device=device())
    metrics = [TwinsMetric(k, data.valid.person, data.valid.twin_pairs) for k in ("eer", "auc")]
    cbs = [TimmWeightDecay(), BranchLogger(), RedrawPairs(), AgreedStop(), StepAccumulation()]
    if plan.processes > 1:
        cbs.append(Distributed())
    learn = Learner(dls, model, loss_func=DCALLoss(), opt_func=partial(Adam, eps=1e-6), lr=s.lr, wd=s.wd,
                    metrics=metrics, cbs=cbs, path=".", model_dir=s.out)
    if len(dls.train) == 0:  # every process's share of a step larger than its share of the images
        raise DataError(f"{plan} leaves no full step in the {len(data.train.paths)} training images; pass a smaller --bs")
    learn.settings, learn.plan = s, plan
    if not sys.stdout.isatty():  # a log file (Kaggle, nohup) gets EpochReport's line, not progress bars
        learn.remove_cb(ProgressCallback)
        learn.logger = noop
    if torch.cuda.is_available():
        learn.to_fp16()
    return learn


def build(s: Settings, data: TwinData, ckpt: dict | None = None, source: str | None = None,
          run_id: str = "") -> Learner:
    """Images decoded, the model (pretrained, or the checkpoint's weights and optimizer state), the
    plan (a resumed run's own), the Learner."""
    model = DCAL.from_settings(s, len(data.classes), pretrained=s.pretrained and ckpt is None)  # before the decoding
    data.decode(s.size)
    plan = make_plan(s, model, len(data.classes), run_id, Plan(**ckpt["plan"]) if ckpt else None)
    print(f"Batch: {plan}")
    learn = make_learner(s, plan, data, model)
    if ckpt is not None:
        restore(learn, ckpt, source)
        print(f"Resuming from {source}: epoch {ckpt['epoch']} of {s.epochs} done")
    return learn


@contextmanager
def on_signals(handler: Callable[[str], None]):
    """`handler(name)` on SIGTERM (a notebook stopped, a job killed, the launcher), SIGINT (Ctrl-C) and
    SIGHUP (a closed terminal) while inside; the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: handler(signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def interrupt(name: str):
    raise KeyboardInterrupt(name)


def train(s: Settings, ckpt: dict | None = None, source: str | None = None, deadline: float | None = None,
          overwrite: bool = False, extra: list | None = None) -> dict | None:
    """Fresh training, or (with `ckpt`, read from `source`) its continuation, in `s.out` (one run per
    folder, locked while it runs). Returns the test report, or None when the run stopped before
    `deadline` (a time.time() value) with a checkpoint to resume. Ctrl-C or SIGTERM: the last trained
    epoch is saved, the resume command printed, and KeyboardInterrupt raised."""
    data = prepare(s, ckpt, source)
    with ExitStack() as held, on_signals(interrupt):
        def claim():  # the main process alone writes
            held.enter_context(claimed(Path(s.out), ckpt["epoch"] if ckpt else None, overwrite))
        on_main(claim)
        learn = build(s, data, ckpt, source, ckpt["plan"]["run_id"] if ckpt else new_run_id())
        n = learn.plan.processes
        print(f"Run {learn.plan.run_id} in {s.out}/" + (f", {n} processes" if n > 1 else ""))
        return fit(learn, data, ckpt, source, deadline, extra or [])


def fit(learn: Learner, data: TwinData, ckpt: dict | None, source: str | None, deadline: float | None,
        extra: list) -> dict | None:
    """Train to the end (then the test report) or to a stop that every process agrees on (a signal, a
    non-finite loss, a checkpoint not written, the time limit). Every process trains; the main process
    alone writes checkpoints, maps and the report, logs to W&B, and says why a run stopped (the others
    then return None quietly)."""
    s, out = learn.settings, Path(learn.settings.out)
    report, agreed = EpochReport(deadline), learn.agreed_stop
    cbs = [report, RestoreScaler(ckpt["scaler"] if ckpt else None), *extra]
    run = saver = None
    if is_main():
        run = start_wandb(s, learn.plan, ckpt.get("wandb_id") if ckpt else None)
        saver = Checkpoint(out, s.save_every, run_meta(learn, list(data.classes), run.id if run else None))
        cbs.append(saver)
        if run is not None:
            cbs.append(Wandb(log=None, log_preds=False, log_model=False))
        cbs.append(AttentionMaps(data.valid, data.caches["valid"], out / "maps", s.map_every, n=4, seed=s.seed))
    status = 1  # W&B's exit code, unless the run goes on to its report
    try:
        with on_signals(lambda name: agreed.request("signal", name)):  # a second signal cannot cut the save short
            try:
                learn.fit_one_cycle(s.epochs, s.lr, cbs=cbs, start_epoch=ckpt["epoch"] if ckpt else 0)
            except Exception:  # a crash here or in another process: keep what was trained
                if saver is not None and (path := saver.save_last()) is not None:
                    print(f"The last completed epoch is saved: {resume_hint(path)}", flush=True)
                raise
            kind, why = share(learn.stop or agreed.reason) or (None, None)  # the writer's last word
            path = (saver.save_last() if saver else None) or (epoch_path(out, saver.saved) if saver and saver.saved
                                                              else source)
        if kind is None and not report.stopped:
            status = None
        elif not is_main():
            return None
        elif kind == "signal":
            print(f"\nStopped by {'Ctrl-C' if why == 'SIGINT' else why} during epoch {learn.epoch + 1}. " + (
                f"Checkpoint of the last completed epoch: {resume_hint(path)}" if path
                else "No epoch was completed: nothing to resume."), flush=True)
            raise KeyboardInterrupt(why)
        elif kind == "disk":
            raise CheckpointError(f"{why}: free space on the disk, or pass another --out. " + (
                f"The last checkpoint written: {resume_hint(path)}" if path else "No checkpoint was written"))
        elif kind == "diverged":
            raise DivergedError(f"{why}: the learning rate is too high for this run. Start a fresh run with a lower "
                                f"--lr (this run's: {s.lr:.3g}). " + (f"The last checkpoint, all finite: {path}"
                                                                      if path else "No epoch was saved"))
        else:
            print(f"Stopped after epoch {learn.epoch} of {s.epochs}: the next epoch would end past the time limit. "
                  f"Checkpoint {resume_hint(path)}")
            status = 0
            return None
    finally:
        if run is not None and status is not None:
            run.finish(exit_code=status)
    result = evaluate(learn.model, data, out, learn.valid_report)
    t = result["test"]
    print(f"Test (twins-only, {t['n_genuine']} genuine / {t['n_impostor']} twin-impostor pairs): "
          f"EER {100 * t['eer']:.2f}%  AUC {t['auc']:.4f}  accuracy {100 * t['accuracy']:.2f}% at threshold "
          f"{t['threshold']:.3f} (the validation twins' EER threshold); report in {out / 'test_report.json'}")
    if is_main():
        summarise(learn.model, data, t["threshold"], s.seed, out, sum(report.times))
    if run is not None:
        run.log({f"test/{k}": v for k, v in t.items() if isinstance(v, (int, float))}, commit=False)
        log_figure("test/roc", out / "roc.png", commit=False)
        if (out / "summary.png").is_file():
            log_figure("test/pair_map_summary", out / "summary.png", commit=False)
        run.finish()
    return result


def resume_hint(path) -> str:
    return f"{path}; continue with:\n  python train.py --resume {path}"


def summarise(model: DCAL, data: TwinData, threshold: float, seed: int, out: Path, train_s: float) -> None:
    """The pair-map summary of the test twins (`explain.write_summary`) in `out/summary.*`, with as many
    pairs of each kind (up to SUMMARY_PAIRS) as SUMMARY_SHARE of the training time allows, at the cost
    of one pair's maps measured here; skipped, with a word, when not even one of each kind fits."""
    cache = data.caches["test"]
    t = time.time()
    pair_maps(model, cache[:2])
    per_pair = time.time() - t
    n = min(SUMMARY_PAIRS, int(SUMMARY_SHARE * train_s / per_pair / len(KINDS)))
    if n < 1:
        print(f"Pair-map summary skipped: {per_pair:.2f} s per pair, {len(KINDS)} pairs would take more than "
              f"{SUMMARY_SHARE:.0%} of the training time ({span(train_s)}); python interpret.py --summary writes it")
        return
    if n < SUMMARY_PAIRS:
        print(f"Test twins: {n} pairs of each kind for their pair maps ({SUMMARY_SHARE:.0%} of the training time "
              "allows no more)")
    write_summary(model, data.test, cache, threshold, n, seed, out / "summary", "test")


def find_lr(s: Settings) -> float:
    """fastai's learning-rate finder on this model and data, in one process (no training is kept): the
    plot goes to `out/lr_find.png`; returns the suggested peak learning rate (fastai's `valley`) for the
    run's `bs` pairs per step."""
    learn = build(s, prepare(s))
    found = learn.lr_find(show_plot=False).valley
    learn.recorder.plot_lr_find()
    path = Path(s.out) / "lr_find.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.gcf().savefig(path, dpi=110)
    plt.close("all")
    gpus = torch.cuda.device_count()
    print(f"lr_find on {machine()}" + (f" (1 of {gpus} GPUs)" if gpus > 1 else "") + f", {learn.plan}: valley "
          f"{found:.3g} (the recipe's --lr: {Settings.lr:.3g}); plot {path}.\n"
          f"Train with the same flags and --lr {found:.3g}, e.g. python train.py --fresh --lr {found:.3g}")
    return found


CHECK_STEPS, WARM_UP = 20, 2  # --check: optimiser steps timed, after WARM_UP untimed ones


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepBudget(Callback):
    """Ends each training epoch after `steps` optimiser steps, timing those after WARM_UP and the
    validation pass (`--check`: a run on a budget)."""
    order = 100
    step_s = valid_s = None

    def __init__(self, steps: int):
        self.steps = steps

    def after_batch(self):
        if not self.training or (self.iter + 1) % self.plan.accum:
            return
        sync()
        done = (self.iter + 1) // self.plan.accum
        if done == WARM_UP:
            self.t0 = time.time()
        if done >= self.steps:
            self.step_s = (time.time() - self.t0) / (done - WARM_UP) if done > WARM_UP else None
            self.steps_per_epoch = self.n_iter // self.plan.accum
            raise CancelTrainException()

    def before_validate(self):
        self.v0 = time.time()

    def after_validate(self):
        sync()
        self.valid_s = time.time() - self.v0


def machine() -> str:
    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    major, minor = torch.cuda.get_device_capability()
    mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor}, {mem:.1f} GiB)"


def check(s: Settings, time_limit_h: float | None) -> None:
    """`--check`: the run itself on a budget, in a scratch folder (the user's --out untouched): data,
    model with its weights, plan, CHECK_STEPS timed steps, validation, a checkpoint, the test report;
    then one step resumed from that checkpoint. Ends with the projected time of the whole run; any
    failure is the run's own error."""
    print(f"Check: {world()} x {machine()}; torch {torch.__version__}, fastai {fastai.__version__}, timm "
          f"{timm.__version__}")
    folder = Path(on_main(lambda: tempfile.mkdtemp(prefix="twins-check-")))
    budget = StepBudget(CHECK_STEPS + WARM_UP)
    try:
        short = replace(s, out=str(folder), epochs=1, wandb=False)
        train(short, extra=[budget])
        ckpt = load_checkpoint(epoch_path(folder, 1))
        train(replace(short, epochs=2), ckpt, str(epoch_path(folder, 1)), extra=[StepBudget(1)])
    finally:
        if is_main():
            shutil.rmtree(folder, ignore_errors=True)
    if budget.step_s is None:
        print("Check passed; too few steps in an epoch to time")
        return
    epoch_s = budget.steps_per_epoch * budget.step_s + budget.valid_s
    total_h = s.epochs * epoch_s / 3600
    print(f"Check passed: {s.bs / budget.step_s:.1f} pairs/s; projected {span(epoch_s)} per epoch (training + "
          f"validation), {span(3600 * total_h)} for {s.epochs} epochs")
    limit = time_limit_h if time_limit_h is not None else KAGGLE_TIME_LIMIT_H
    label = f"the time limit ({limit} h)" if time_limit_h is not None else f"a Kaggle session ({limit} h of 12)"
    if total_h <= limit:
        print(f"Fits {label}.")
        return
    print(f"Does NOT fit {label}. Options: --epochs {int(limit * 3600 // epoch_s)} (fits); a smaller --size (336 "
          "needs about half the compute of 448); --grad-ckpt where micro-batches are small; or keep the epochs and "
          "continue in a second session (the run stops with a checkpoint before the limit; docs/kaggle.md).")
