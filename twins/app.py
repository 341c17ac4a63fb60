"""Training: the Learner for a run; fresh or resumed training up to the test report; the learning
rate finder."""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from fastai.callback.progress import ProgressCallback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from fastcore.basics import noop

from .batch import MARGIN, MAX_FACTOR, describe, largest_fitting, plan, reshare, training_step
from .callbacks import AttentionMaps, BranchLogger, Checkpoint, EpochReport, RestoreRunState, TimmWeightDecay, span
from .checkpoint import check_compatible, epoch_path, restore
from .config import device
from .data import RedrawPairs, TwinData, pair_dataloaders, prepare_data
from .distributed import Distributed, gather, is_main, launch_command, on_main, world
from .errors import CheckpointError
from .evaluate import evaluate
from .loss import DCALLoss
from .metrics import TwinsMetric
from .model import DCAL, check_cuda_arch
from .runs import claim_for_fresh, claim_for_resume, locked, new_run_id, write_run_json
from .tracking import Wandb, log_figure, start_wandb

def choose_batch(cfg: dict, model: DCAL, n_classes: int) -> None:
    """`--bs auto`: on CUDA, search the largest batch that fits (in every process; the smallest of
    them counts) and set cfg's bs, accum, lr and processes from it; on the CPU the recipe's batch in
    each process."""
    n = world()
    if not torch.cuda.is_available():
        print(f"Batch: the recipe's {cfg['bs']} pairs in each process (no GPU to measure)"
              + (f"; lr scaled linearly from {cfg['lr']:.3g} at {cfg['bs']} pairs" if n > 1 else ""))
        cfg.update(bs=cfg["bs"] * n, lr=cfg["lr"] * n, accum=1, processes=n)
        return
    start = MAX_FACTOR * cfg["bs"]
    print(f"Batch: searching the largest that fits on {torch.cuda.get_device_name()}, from {start} pairs down")
    t = time.time()
    fits = min(gather(largest_fitting(training_step(model, n_classes, cfg["size"], device()), start)))
    torch.cuda.empty_cache()
    chosen = plan(fits, cfg["bs"], cfg["lr"], n)
    print(f"Batch: {fits} pairs fit{' on each GPU' if n > 1 else ''} (search {span(time.time() - t)}), "
          f"{MARGIN:.0%} kept free" + (f"; lr scaled linearly from {cfg['lr']:.3g} at {cfg['bs']} pairs"
                                       if chosen["lr"] != cfg["lr"] else ""))
    cfg.update(chosen)


def make_learner(cfg: dict, data: TwinData, model: DCAL) -> Learner:
    """The Learner of a run, with its batch split as `cfg` says: `bs` pairs per optimiser step over
    `processes` processes (this must be how many run), `accum` micro-batches in each."""
    dc = model.data_config
    share = cfg["bs"] // cfg["processes"]
    dls = pair_dataloaders(data.train, data.valid, data.caches["train"], data.caches.get("valid"), data.classes,
                           bs=share // cfg["accum"], size=cfg["size"], mean=dc["mean"], std=dc["std"],
                           seed=cfg["seed"], device=device())
    metrics = [TwinsMetric(k, data.valid.person, data.valid.twin_pairs) for k in ("eer", "auc")] if data.valid else []
    cbs = [TimmWeightDecay(), BranchLogger(), RedrawPairs()]
    if cfg["accum"] > 1:
        cbs.append(GradientAccumulation(n_acc=share))  # counts this process's pairs: one step per `share`
    if world() > 1:
        cbs.append(Distributed())
    learn = Learner(dls, model, loss_func=DCALLoss(), opt_func=partial(Adam, eps=1e-6), lr=cfg["lr"], wd=cfg["wd"],
                    metrics=metrics, cbs=cbs, path=".", model_dir=cfg["out"])
    if not sys.stdout.isatty():  # a log file (Kaggle, nohup) gets EpochReport's line, not progress bars
        learn.remove_cb(ProgressCallback)
        learn.logger = noop
    if torch.cuda.is_available():
        learn.to_fp16()
    return learn


def prepare(cfg: dict, ckpt: dict | None = None, source: str | None = None) -> TwinData:
    """Everything a run can check before the slow work: the GPU, the checkpoint against the flags,
    the JSON files, every image path, and the training ids against the checkpoint's."""
    check_cuda_arch()
    if ckpt is not None and ckpt["epoch"] >= cfg["epochs"]:
        raise CheckpointError(f"checkpoint {source} is at epoch {ckpt['epoch']}, already the last of --epochs "
                              f"{cfg['epochs']}; pass a larger --epochs to train further")
    set_seed(cfg["seed"])  # python, numpy and torch: fastai's shuffling draws from python's random
    data = prepare_data(cfg)
    if ckpt is not None:
        check_compatible(ckpt, cfg, list(data.classes), f"checkpoint {source}")
    return data


def build(cfg: dict, data: TwinData, ckpt: dict | None = None, source: str | None = None) -> Learner:
    """The Learner of a run: images decoded, the model (pretrained, or with the checkpoint's weights
    and optimizer state), the batch chosen for this GPU when fresh with `bs_auto`, a resumed run's
    steps shared by the processes that run now."""
    data.decode(cfg["size"])
    model = DCAL.from_config(cfg, len(data.classes), pretrained=cfg["pretrained"] and ckpt is None)
    if ckpt is None and cfg["bs_auto"]:
        choose_batch(cfg, model, len(data.classes))
    if ckpt is not None and cfg["processes"] != world():
        print(f"The run was trained by {cfg['processes']} process(es); {world()} continue it with the same steps")
        cfg.update(reshare(cfg, world()))
    print(f"Batch: {describe(cfg)}")
    learn = make_learner(cfg, data, model)
    if ckpt is not None:
        restore(learn, ckpt, source)
        print(f"Resuming from {source}: epoch {ckpt['epoch']} of {cfg['epochs']} done")
    return learn


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a notebook stopped, a job killed) stops training like Ctrl-C: with a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: dict, ckpt: dict | None = None, source: str | None = None, deadline: float | None = None,
          overwrite: bool = False) -> dict | None:
    """Fresh training, or (with `ckpt`, read from `source`) its continuation, in `cfg["out"]` (one run
    per folder, locked while it runs). Returns the test report, or None when the run stopped before
    `deadline` (a time.time() value) with a checkpoint to resume. Ctrl-C or SIGTERM: the last trained
    epoch is saved, the resume command printed, and KeyboardInterrupt raised."""
    data = prepare(cfg, ckpt, source)
    out = Path(cfg["out"])
    with ExitStack() as held, sigterm_as_interrupt():
        def claim() -> str:  # the main process writes, so it alone holds the folder
            held.enter_context(locked(out))
            if ckpt is None:
                claim_for_fresh(out, overwrite)
                return new_run_id()
            claim_for_resume(out, cfg["run_id"], ckpt["epoch"])
            return cfg["run_id"]
        cfg["run_id"] = on_main(claim)
        learn = build(cfg, data, ckpt, source)
        if is_main():
            write_run_json(out, cfg)
        print(f"Run {cfg['run_id']} in {out}/" + (f", {world()} processes" if world() > 1 else ""))
        return fit(cfg, data, learn, ckpt, source, deadline)


def fit(cfg: dict, data: TwinData, learn: Learner, ckpt: dict | None, source: str | None,
        deadline: float | None) -> dict | None:
    """Train to the end (then the test report) or to a stop. Every process trains; the main process
    alone writes checkpoints, maps and the report, and logs to W&B."""
    out = Path(cfg["out"])
    report = EpochReport(deadline)
    cbs = [report, RestoreRunState(ckpt.get("run_state") if ckpt else None)]
    run = saver = None
    if is_main():
        run = start_wandb(cfg, ckpt.get("wandb_id") if ckpt else None)
        saver = Checkpoint(out, cfg["save_every"], {"config": cfg, "classes": list(data.classes),
                                                    "wandb_id": run.id if run else None})
        cbs.append(saver)
        if run is not None:
            cbs.append(Wandb(log=None, log_preds=False, log_model=False))
        if cfg["glca"]:
            has_valid = data.valid is not None
            cbs.append(AttentionMaps(data.valid if has_valid else data.train,
                                     data.caches["valid" if has_valid else "train"], out / "maps", cfg["map_every"],
                                     n=4, seed=cfg["seed"]))
    try:
        learn.fit_one_cycle(cfg["epochs"], cfg["lr"], cbs=cbs, start_epoch=ckpt["epoch"] if ckpt else 0)
    except KeyboardInterrupt as e:
        # nothing trained since the resume: its checkpoint is still the last
        path = (saver.save_last() if saver else None) or source
        why = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
        print(f"\nStopped by {why} during epoch {learn.epoch + 1}. " + (
            f"Checkpoint of the last completed epoch: {path}; continue with:\n  {launch_command(f'--resume {path}')}"
            if path else "No epoch was completed: nothing to resume."), flush=True)
        if run is not None:
            run.finish(exit_code=1)
        raise
    if report.stopped:
        path = epoch_path(out, learn.epoch)
        print(f"Stopped after epoch {learn.epoch} of {cfg['epochs']}: the next epoch would end past the time "
              f"limit. Checkpoint {path}; continue with:\n  {launch_command(f'--resume {path}')}")
        if run is not None:
            run.finish()
        return None
    result = evaluate(learn.model, data, out)
    t = result["test"]
    print(f"Test (twins-only, {t['n_genuine']} genuine / {t['n_impostor']} twin-impostor pairs): "
          f"EER {100 * t['eer']:.2f}%  AUC {t['auc']:.4f}  accuracy {100 * t['accuracy']:.2f}% at threshold "
          f"{t['threshold']:.3f} from {t['threshold_source']}; report in {out / 'test_report.json'}")
    if run is not None:
        run.log({f"test/{k}": v for k, v in t.items() if isinstance(v, (int, float))}, commit=False)
        log_figure("test/roc", out / "roc.png")
        run.finish()
    return result


def find_lr(cfg: dict) -> float:
    """fastai's learning-rate finder on this model and data (no training is kept): the plot goes to
    `out/lr_find.png`; returns the suggested peak learning rate (fastai's `valley`)."""
    recipe_bs, recipe_lr = cfg["bs"], cfg["lr"]
    learn = build(cfg, prepare(cfg))
    found = learn.lr_find(show_plot=False).valley
    learn.recorder.plot_lr_find()
    path = Path(cfg["out"]) / "lr_find.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.gcf().savefig(path, dpi=110)
    plt.close("all")
    suggestion = found * recipe_bs / cfg["bs"]  # --lr is the peak at the recipe's batch (auto may raise the batch)
    print(f"lr_find at {cfg['bs']} pairs per step: valley {found:.3g}, i.e. --lr {suggestion:.3g} at the recipe's "
          f"{recipe_bs} pairs (the recipe's: {recipe_lr:.3g}); plot {path}.\n"
          f"Train with the same flags and --lr {suggestion:.3g}, e.g. python train.py --fresh --lr {suggestion:.3g}")
    return suggestion
