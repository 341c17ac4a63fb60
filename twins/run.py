"""A training run, top to bottom: check (GPU, checkpoint, data) -> claim the run folder -> build the
Learner (model, the plan for this machine) -> fit -> stop with a checkpoint (time limit, Ctrl-C,
SIGTERM) or evaluate on the test twins. `--lr-find` takes the same first steps and ends after the build."""
from __future__ import annotations

import json
import signal
import sys
import threading
import uuid
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from fastcore.basics import noop
from sklearn.metrics import roc_curve

from .callbacks import (AgreedStop, AttentionMaps, BranchLogger, Checkpoint, EpochReport, RestoreScaler,
                        StepAccumulation, TimmWeightDecay)
from .checkpoint import check_classes, claimed, epoch_path, restore, run_meta
from .data import RedrawPairs, TwinData, pair_dataloaders, prepare_data
from .distributed import Distributed, is_main, on_main, share
from .errors import CheckpointError, DataError, DivergedError
from .loss import DCALLoss
from .metrics import TwinsMetric, protocol_scores, verification_report
from .model import DCAL, check_cuda_arch, device, embed_images
from .plan import Plan, make_plan
from .settings import Settings
from .tracking import Wandb, log_figure, start_wandb
from .viz import plot_roc


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


def train(s: Settings, ckpt: dict | None = None, source: str | None = None,
          deadline: float | None = None) -> dict | None:
    """Fresh training, or (with `ckpt`, read from `source`) its continuation, in `s.out` (one run per
    folder, locked while it runs). Returns the test report, or None when it stopped with a checkpoint to
    resume (`deadline`, a time.time() value; Ctrl-C and SIGTERM raise KeyboardInterrupt after that)."""
    data = prepare(s, ckpt, source)
    with ExitStack() as held, on_signals(interrupt):
        def claim():  # the main process alone writes
            held.enter_context(claimed(Path(s.out), ckpt["epoch"] if ckpt else None))
        on_main(claim)
        learn = build(s, data, ckpt, source, ckpt["plan"]["run_id"] if ckpt else uuid.uuid4().hex[:8])
        n = learn.plan.processes
        print(f"Run {learn.plan.run_id} in {s.out}/" + (f", {n} processes" if n > 1 else ""))
        return fit(learn, data, ckpt, source, deadline)


def fit(learn: Learner, data: TwinData, ckpt: dict | None, source: str | None, deadline: float | None) -> dict | None:
    """Train to the end (then the test report) or to a stop every process agrees on (a signal, a non-finite
    loss, a checkpoint not written, the time limit). Every process trains; the main one alone writes,
    logs to W&B, tests and says why a run stopped (the others return None)."""
    s, out = learn.settings, Path(learn.settings.out)
    report, agreed = EpochReport(deadline), learn.agreed_stop
    cbs = [report, RestoreScaler(ckpt["scaler"] if ckpt else None)]
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
        if not is_main():  # the main process alone tests and reports
            return None
        if kind is None and not report.stopped:
            status = None
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
    if run is not None:
        run.log({f"test/{k}": v for k, v in t.items() if isinstance(v, (int, float))}, commit=False)
        log_figure("test/roc", out / "roc.png", commit=False)
        run.finish()
    return result


def evaluate(model: DCAL, data: TwinData, out: Path, valid: dict) -> dict:
    """Test on the twins-only protocol, at the threshold the last validation chose (`valid`: its report;
    the EER threshold of the validation twins, never the test's). Writes `test_report.json` and
    `roc.png` to `out`; returns the report."""
    scores, genuine, _ = protocol_scores(embed_images(model, data.caches["test"]), data.test.person,
                                         data.test.twin_pairs)
    test = verification_report(scores, genuine, valid["eer_threshold"])
    test["accuracy_at_test_eer_threshold"] = verification_report(scores, genuine)["accuracy"]  # best-on-test, reference only
    report = {"test": test, "valid": valid}
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_report.json").write_text(json.dumps(report, indent=2))
    far, tar, _ = roc_curve(genuine, scores)
    plot_roc(far, tar, test, out / "roc.png")
    return report


def resume_hint(path) -> str:
    return f"{path}; continue with:\n  python train.py --resume {path}"


def find_lr(s: Settings) -> float:
    """fastai's learning-rate finder on this model and data, in one process (no training is kept): its
    suggested peak learning rate (`valley`) for the run's `bs` pairs per step."""
    learn = build(s, prepare(s))
    found = learn.lr_find(show_plot=False).valley
    print(f"lr_find, {learn.plan}: valley {found:.3g} (the recipe's --lr: {Settings.lr:.3g}). Train with the same "
          f"flags and --lr {found:.3g}, e.g. python train.py --fresh --lr {found:.3g}")
    return found
