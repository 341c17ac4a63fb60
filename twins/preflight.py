"""`python train.py --fresh --check`: a few minutes on the user's GPU that prove the run will work
and say how long it will take, before hours are spent on it."""
from __future__ import annotations

import platform
import tempfile
import time

import fastai
import timm
import torch
from fastai.callback.core import Callback, CancelFitException, CancelTrainException

from .app import build, make_learner, prepare
from .batch import describe
from .callbacks import span
from .checkpoint import epoch_path, load_checkpoint, restore, save_checkpoint
from .config import KAGGLE_TIME_LIMIT_H
from .distributed import world
from .model import DCAL

TIMED_STEPS = 20  # training steps timed, after WARM_UP untimed ones
WARM_UP = 2


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Times training steps WARM_UP+1 .. `steps` and the validation pass, then (with `stop`) ends the fit."""
    order = 100

    def __init__(self, steps: int, stop_after_valid: bool = True):
        self.steps, self.stop_after_valid = steps, stop_after_valid

    def before_batch(self):
        if self.training and self.iter == WARM_UP:
            sync()
            self.t0 = time.time()

    def after_batch(self):
        if self.training and self.iter + 1 >= self.steps:
            sync()
            self.step_s = (time.time() - self.t0) / (self.steps - WARM_UP) if self.steps > WARM_UP else None
            raise CancelTrainException()

    def before_validate(self):
        if not self.stop_after_valid:
            raise CancelFitException()
        self.v0 = time.time()

    def after_validate(self):
        sync()
        self.valid_s = time.time() - self.v0


def _gpu() -> str:
    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    major, minor = torch.cuda.get_device_capability()
    mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor}, {mem:.1f} GiB)"


def preflight(cfg: dict, time_limit_h: float | None) -> bool:
    """Every step of a real run, briefly: data, model (pretrained weights), batch, timed training
    steps, a validation pass, a checkpoint written, read back and resumed. Prints each step and a
    summary with the projected time; returns whether every step passed."""
    print(f"Check: {_gpu()}; torch {torch.__version__}, fastai {fastai.__version__}, timm {timm.__version__}")
    state = {}

    def data_and_model():
        state["data"] = prepare(cfg)  # the JSON, every image path
        state["learn"] = build(cfg, state["data"])  # every image decoded, the model, the batch
        return (f"{len(state['data'].train.paths)} training images, model {cfg['arch']} at {cfg['size']} px"
                + (" with pretrained weights" if cfg["pretrained"] else ""))

    def train_steps():
        learn = state["learn"]
        timer = StepTimer(min(TIMED_STEPS + WARM_UP, len(learn.dls.train)))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        learn.fit(1, cfg["lr"], cbs=timer)
        state["timer"] = timer
        micro = learn.dls.train.bs
        state["pairs_per_s"] = micro * world() / timer.step_s if timer.step_s else None  # all processes
        state["peak"] = ((torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
                         if torch.cuda.is_available() else None)
        speed = f"{state['pairs_per_s']:.1f} pairs/s" if state["pairs_per_s"] else "too few batches to time"
        each = f" in each of {world()} processes" if world() > 1 else ""
        return (f"{timer.steps} steps of {micro} pairs{each} ({max(timer.steps - WARM_UP, 0)} timed): {speed}"
                + (", peak GPU memory {:.2f} GiB ({:.2f} reserved)".format(*state["peak"]) if state["peak"] else "")
                + f"; validation pass {span(timer.valid_s)}")

    def checkpoint_round_trip():
        data, learn = state["data"], state["learn"]
        with tempfile.TemporaryDirectory() as tmp:
            path = epoch_path(tmp, 1)
            t = time.time()
            save_checkpoint(path, learn, 1, {"config": cfg, "classes": list(data.classes), "wandb_id": None})
            state["save_s"] = time.time() - t
            ckpt = load_checkpoint(path)
        fresh = make_learner(cfg, data, DCAL.from_config(cfg, len(data.classes), pretrained=False))
        restore(fresh, ckpt, path)
        fresh.fit(1, cfg["lr"], cbs=StepTimer(1, stop_after_valid=False))
        return f"written ({span(state['save_s'])}), read back and resumed for one step"

    steps = [("data and model", data_and_model), ("training steps", train_steps),
             ("checkpoint", checkpoint_round_trip)]
    for name, step in steps:
        try:
            print(f"Check {name}: {step()}")
        except Exception as e:  # the check reports the failing step, whatever it is
            print(f"Check FAILED at '{name}': {type(e).__name__}: {e}")
            return False
    summary(cfg, state, time_limit_h)
    return True


def summary(cfg: dict, state: dict, time_limit_h: float | None) -> None:
    learn, timer = state["learn"], state["timer"]
    gpus = f"{world()} x " if world() > 1 else ""
    print(f"Check passed. {gpus}{_gpu()}, {describe(cfg)}")
    if not state["pairs_per_s"]:
        return
    n_ckpt = cfg["epochs"] // cfg["save_every"] + 1
    epoch_s = len(learn.dls.train) * learn.dls.train.bs * world() / state["pairs_per_s"] + timer.valid_s
    total_h = (cfg["epochs"] * epoch_s + n_ckpt * state["save_s"]) / 3600
    print(f"Projected: {span(epoch_s)} per epoch (training + validation), {span(3600 * total_h)} for "
          f"{cfg['epochs']} epochs")
    limit = time_limit_h if time_limit_h is not None else KAGGLE_TIME_LIMIT_H
    label = f"the time limit ({limit} h)" if time_limit_h is not None else f"a Kaggle session ({limit} h of 12)"
    if total_h <= limit:
        print(f"Fits {label}.")
        return
    fit_epochs = int(limit * 3600 // epoch_s)
    print(f"Does NOT fit {label}. Options: --epochs {fit_epochs} (fits); a smaller --size "
          f"(336 needs about half the compute of 448)"
          + ("; --grad-ckpt (memory limits this GPU to micro-batches: with it, larger ones fit)" if cfg["accum"] > 1 else "")
          + "; or keep the epochs and continue in a second session (the run stops with a checkpoint before "
          "the limit; docs/kaggle.md).")
