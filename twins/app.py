"""Training: the Learner for a run, and fresh or resumed training up to the test report."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed

from .callbacks import AttentionMaps, BranchLogger, Checkpoint, TimmWeightDecay
from .checkpoint import check_compatible, restore
from .config import device
from .data import RedrawPairs, TwinData, pair_dataloaders, prepare_data
from .errors import CheckpointError
from .evaluate import evaluate
from .loss import DCALLoss
from .metrics import TwinsMetric
from .model import DCAL, check_cuda_arch
from .tracking import Wandb, log_figure, start_wandb

SAVE_EVERY = 5  # epochs between checkpoints (and the last epoch)


def make_learner(cfg: dict, data: TwinData, model: DCAL) -> Learner:
    dc = model.data_config
    dls = pair_dataloaders(data.train, data.valid, data.caches["train"], data.caches.get("valid"), data.classes,
                           bs=cfg["bs"], size=cfg["size"], mean=dc["mean"], std=dc["std"], seed=cfg["seed"],
                           device=device())
    metrics = [TwinsMetric(k, data.valid.person, data.valid.twin_pairs) for k in ("eer", "auc")] if data.valid else []
    learn = Learner(dls, model, loss_func=DCALLoss(), opt_func=partial(Adam, eps=1e-6), lr=cfg["lr"], wd=cfg["wd"],
                    metrics=metrics, cbs=[TimmWeightDecay(), BranchLogger(), RedrawPairs()], path=".",
                    model_dir=cfg["out"])
    if torch.cuda.is_available():
        learn.to_fp16()
    return learn


def train(cfg: dict, ckpt: dict | None = None, source: str | None = None) -> dict:
    """Fresh training, or (with `ckpt`, read from `source`) its continuation; returns the test report."""
    check_cuda_arch()
    set_seed(cfg["seed"])  # python, numpy and torch: fastai's shuffling draws from python's random
    data = prepare_data(cfg)
    start = 0
    if ckpt is not None:
        check_compatible(ckpt, cfg, list(data.classes), f"checkpoint {source}")
        start = ckpt["epoch"]
        if start >= cfg["epochs"]:
            raise CheckpointError(f"checkpoint {source} is at epoch {start}, already the last of --epochs "
                                  f"{cfg['epochs']}; pass a larger --epochs to train further")
    model = DCAL.from_config(cfg, len(data.classes), pretrained=cfg["pretrained"] and ckpt is None)
    learn = make_learner(cfg, data, model)
    if ckpt is not None:
        restore(learn, ckpt, source)
        print(f"Resuming from {source}: epoch {start} of {cfg['epochs']} done")
    run = start_wandb(cfg, ckpt.get("wandb_id") if ckpt else None)
    out = Path(cfg["out"])
    cbs = [Checkpoint(out, SAVE_EVERY, {"config": cfg, "classes": list(data.classes),
                                        "wandb_id": run.id if run else None})]
    if run is not None:
        cbs.append(Wandb(log=None, log_preds=False, log_model=False))
    if cfg["glca"]:
        has_valid = data.valid is not None
        cbs.append(AttentionMaps(data.valid if has_valid else data.train, data.caches["valid" if has_valid else "train"],
                                 out / "maps", cfg["map_every"], n=4, seed=cfg["seed"]))
    learn.fit_one_cycle(cfg["epochs"], cfg["lr"], cbs=cbs, start_epoch=start)
    report = evaluate(learn.model, data, out)
    t = report["test"]
    print(f"Test (twins-only, {t['n_genuine']} genuine / {t['n_impostor']} twin-impostor pairs): "
          f"EER {100 * t['eer']:.2f}%  AUC {t['auc']:.4f}  accuracy {100 * t['accuracy']:.2f}% at threshold "
          f"{t['threshold']:.3f} from {t['threshold_source']}; report in {out / 'test_report.json'}")
    if run is not None:
        run.log({f"test/{k}": v for k, v in t.items() if isinstance(v, (int, float))}, commit=False)
        log_figure("test/roc", out / "roc.png")
        run.finish()
    return report
