"""Training callbacks: weight-decay groups, branch-loss logging, checkpoints, attention-map capture,
and the W&B set-up."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.wandb import WandbCallback

WANDB_ENTITY = "hunchoquavodb-hanoi-university-of-science-and-technology"


def wandb_run():
    """The active W&B run, or None (W&B not started, disabled, or not importable)."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


class TimmWeightDecay(Callback):
    """No weight decay on biases, norms, position embedding, class token, and the loss's own
    parameters (uncertainty weights, pair-logit scale/bias), as timm and DeiT train ViTs."""
    order = 0

    def before_fit(self):
        skip = self.model.no_weight_decay()
        for name, p in self.model.named_parameters():
            if p.ndim <= 1 or name in skip:
                self.opt.state[p]["do_wd"] = False


class BranchLogger(Callback):
    """Each branch loss and uncertainty weight: to W&B every batch, and a line per epoch on screen."""
    order, run_valid = 50, False

    def before_epoch(self):
        self.sums, self.count = {}, 0

    def after_batch(self):
        last = self.learn.loss_func.last
        last = dict(zip(last, torch.stack(list(last.values())).tolist()))  # one device sync, not six
        for k, v in last.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if (run := wandb_run()) is not None:
            run.log({f"branch/{k}": v for k, v in last.items()}, commit=False)

    def after_epoch(self):
        if self.count:
            print(f"epoch {self.epoch + 1} lr {self.opt.hypers[-1]['lr']:.6e} train branches: "
                  + "  ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items()))


class Wandb(WandbCallback):
    """fastai's WandbCallback without its config gathering: with fastcore 2.2 that step calls
    `init_args` on plain numbers and raises. The run's config is given to `wandb.init` instead."""

    def before_fit(self):
        self.learn.gather_args = dict  # an instance attribute shadowing Learner.gather_args: returns {}
        try:
            super().before_fit()
        finally:
            del self.learn.gather_args


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpoint(Callback):
    """`ep{N}.pth` (N = epochs completed) after every `every` epochs and at the end: model, optimizer,
    epoch, the run's config, the training classes and the W&B run id. Epochs skipped on resume never
    save (fastai's SkipToEpoch still fires after_epoch for them)."""
    order = 61  # after the Recorder

    def __init__(self, folder: Path, every: int, meta: dict):
        self.folder, self.every, self.meta = Path(folder), every, meta

    def before_epoch(self):
        self.trained = False

    def after_train(self):
        self.trained = True

    def after_epoch(self):
        done = self.epoch + 1
        if self.trained and (done % self.every == 0 or done == self.n_epoch):
            save_atomic({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "epoch": done,
                         **self.meta}, self.folder / f"ep{done}.pth")


class AttentionMaps(Callback):
    """After validation every `every` epochs (and at the end): rollout heatmaps with the GLCA-selected
    patches for fixed twin pairs, saved as PNG under `folder` and logged to W&B."""
    order, run_train = 62, False

    def __init__(self, images: torch.Tensor, captions: list[tuple[str, str]], folder: Path, every: int):
        self.images, self.captions, self.folder, self.every = images, captions, Path(folder), every

    def before_epoch(self):
        self.trained = False

    def after_train(self):
        self.trained = True

    def after_epoch(self):
        done = self.epoch + 1
        if not self.trained or not self.model.use_glca or (done % self.every and done != self.n_epoch):
            return
        from .app import encode_all  # here, not at the top: app imports this module
        from .viz import maps_of, plot_pairs
        enc = encode_all(self.model, self.images)
        emb, n = self.model.embedding(enc), len(self.captions)
        imgs = self.images.permute(0, 2, 3, 1).numpy() / 255
        rows = []
        for i in range(n):
            (heat_a, mask_a), (heat_b, mask_b) = maps_of(self.model, enc, i), maps_of(self.model, enc, n + i)
            rows.append(dict(img_a=imgs[i], img_b=imgs[n + i], heat_a=heat_a, heat_b=heat_b, mask_a=mask_a,
                             mask_b=mask_b, caption_a=self.captions[i][0],
                             caption_b=f"{self.captions[i][1]}  cos {float(emb[i] @ emb[n + i]):.3f}"))
        path = self.folder / f"ep{done}.png"
        plot_pairs(rows, path, title=f"twin pairs, epoch {done}: rollout + GLCA tokens")
        if (run := wandb_run()) is not None:
            import wandb
            run.log({"attention_maps": wandb.Image(str(path))}, commit=False)


def start_wandb(config: dict, project: str, entity: str, enabled: bool, resume_id: str | None):
    """Start W&B: online with WANDB_API_KEY, else offline (said once); never fatal."""
    if not enabled:
        print("W&B: off (--no-wandb)")
        return None
    try:
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode == "offline":
            print("W&B: no WANDB_API_KEY, logging offline to ./wandb (upload later with `wandb sync`)")
        return wandb.init(project=project, entity=entity, config=config, mode=mode, id=resume_id,
                          resume="allow" if resume_id else None)
    except Exception as e:  # W&B trouble must never stop training
        print(f"W&B: could not start ({type(e).__name__}: {e}); training without it")
        return None


def twin_sample(split, n: int, seed: int) -> list[tuple[int, int]]:
    """`n` fixed (image, twin's image) index pairs from distinct twin pairs of `split`."""
    rng = np.random.default_rng(seed)
    picks = []
    for k in rng.permutation(len(split.twin_pairs))[:n]:
        a, b = split.twin_pairs[k]
        picks.append((int(rng.choice(split.images_of(a))), int(rng.choice(split.images_of(b)))))
    return picks
