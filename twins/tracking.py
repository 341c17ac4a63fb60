"""Weights & Biases, for training only: starting the run (online, offline or off), fastai's callback,
and logging a figure. Inference never imports this module, so `verify()` needs no wandb."""
from __future__ import annotations

import os
import socket
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import wandb
from fastai.callback.wandb import WandbCallback


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


def wandb_mode() -> tuple[str, str]:
    """(mode, why), decided before `wandb.init`, which would wait minutes for a server it cannot reach:
    WANDB_MODE when set; else online with WANDB_API_KEY; offline without either, or without the server."""
    asked = os.environ.get("WANDB_MODE")
    if asked and asked != "online":
        return asked, f"WANDB_MODE={asked}"
    why = f"WANDB_MODE={asked}" if asked else "WANDB_API_KEY"
    if not asked and not os.environ.get("WANDB_API_KEY"):
        return "offline", "no WANDB_API_KEY"
    server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    u = urlparse(server)
    try:  # a TCP connection within 5 s
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=5).close()
    except OSError:
        return "offline", f"{why} is set but {server} cannot be reached (no network?)"
    return "online", why


def start_wandb(s, plan, resume_id: str | None):
    """Start W&B for a run with these settings and plan (off with `s.wandb` False), saying which mode
    and why; its config is both. Never fatal: W&B trouble is printed and training goes on without it."""
    mode, why = wandb_mode() if s.wandb else ("disabled", "--no-wandb")
    if mode == "disabled":
        print(f"W&B: off ({why})")
        return None
    where = "online" if mode == "online" else "offline to ./wandb (upload later with `wandb sync wandb/offline-run-*`)"
    print(f"W&B: logging {where} ({why})")
    try:
        return wandb.init(project=s.wandb_project, entity=s.wandb_entity, config={**asdict(s), **asdict(plan)},
                          mode=mode, id=resume_id, resume="allow" if resume_id else None)
    except Exception as e:  # W&B trouble must never stop training
        print(f"W&B: could not start ({type(e).__name__}: {e}); training without it")
        return None
