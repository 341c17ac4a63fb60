"""Weights & Biases, for training only: starting the run (online, offline or off), fastai's callback,
and logging a figure. Inference never imports this module, so `verify()` needs no wandb."""
from __future__ import annotations

import os
from pathlib import Path

import wandb
from fastai.callback.wandb import WandbCallback


def wandb_run():
    """The active W&B run, or None."""
    return wandb.run


def log_figure(key: str, path: Path, commit: bool | None = None) -> None:
    """A PNG written by the project, to the active W&B run (nothing without one)."""
    if wandb.run is not None:
        wandb.run.log({key: wandb.Image(str(path))}, commit=commit)


class Wandb(WandbCallback):
    """fastai's WandbCallback without its config gathering: with fastcore 2.2 that step calls
    `init_args` on plain numbers and raises (fastai issue 4173). The run's config is given to
    `wandb.init` instead."""

    def before_fit(self):
        self.learn.gather_args = dict  # an instance attribute shadowing Learner.gather_args: returns {}
        try:
            super().before_fit()
        finally:
            del self.learn.gather_args


def start_wandb(config: dict, resume_id: str | None):
    """Start W&B for a run configured by `config`: online with WANDB_API_KEY, else offline (said
    once); off with `wandb=False`. Never fatal."""
    if not config["wandb"]:
        print("W&B: off (--no-wandb)")
        return None
    try:
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode == "offline":
            print("W&B: no WANDB_API_KEY, logging offline to ./wandb (upload later with `wandb sync`)")
        return wandb.init(project=config["wandb_project"], entity=config["wandb_entity"], config=config, mode=mode,
                          id=resume_id, resume="allow" if resume_id else None)
    except Exception as e:  # W&B trouble must never stop training
        print(f"W&B: could not start ({type(e).__name__}: {e}); training without it")
        return None
