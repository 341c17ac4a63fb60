"""What the user chose for a run: a recipe (Kaggle's, or the demo's) under the flags, frozen once;
and what a resumed run may change of its settings. What the program derives from them on a machine
is the run's `Plan` (twins/plan.py), kept apart."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Callable

from .errors import CheckpointError

WANDB_ENTITY = "hunchoquavodb-hanoi-university-of-science-and-technology"
# Kaggle ends a session at 12 h, and a "Save & Run All" version that runs past it keeps no output:
# stop (with a checkpoint) before an epoch would end past this from the command's start, leaving time
# for the cells before it and the test report.
KAGGLE_TIME_LIMIT_H = 11.5


@dataclass(frozen=True)
class Settings:
    """A run's settings. The defaults are the Kaggle recipe (PLAN.md, decisions); how a machine splits
    its steps is the run's `Plan`, never a setting."""
    data: str = "data_json"
    data_root: str | None = None
    valid_pct: float = 0.1
    seed: int = 42
    arch: str = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    size: int = 448
    patch_size: int | None = None  # None: the arch's own
    pretrained: bool = True
    weights: str | None = None
    top_r: float = 0.1
    glca: bool = True
    pwca: bool = True
    epochs: int = 40
    bs: int = 16  # pairs per optimiser step, all processes together: the recipe's, on any machine
    lr: float = 1e-4  # the peak learning rate of that step
    wd: float = 0.05
    drop_path: float = 0.1
    out: str = "models"
    save_every: int = 5
    map_every: int = 5
    wandb: bool = True
    wandb_project: str = "twins-dcal"
    wandb_entity: str = WANDB_ENTITY


# The CPU demo recipe: a small ViT from scratch on the set `--demo` generates in DEMO_DIR, a few minutes on 2 cores.
DEMO_DIR = "demo"
DEMO = dict(arch="test_vit", size=64, patch_size=8, pretrained=False, epochs=30, lr=2e-3, drop_path=0.0, top_r=0.2,
            data=f"{DEMO_DIR}/data_json", data_root=f"{DEMO_DIR}/images")
# What a resumed run may change: where data and output are, logging, and a longer schedule. Anything
# else (the model, the optimisation) would make it another run than the one it continues.
RESUMABLE = ("data", "data_root", "out", "save_every", "map_every", "wandb", "wandb_project", "wandb_entity", "epochs")


def fresh_settings(flags: dict, demo: bool = False) -> Settings:
    """The recipe (the demo's with `demo`) under the flags the user gave (those not None)."""
    return Settings(**{**(DEMO if demo else {}), **{k: v for k, v in flags.items() if v is not None}})


def resumed_settings(saved: Settings, flags: dict, source: str) -> Settings:
    """The settings of a resumed run: the run's own, with the flags it may take (RESUMABLE); a longer
    --epochs is allowed and said out loud (the schedule is re-planned)."""
    given = {k: v for k, v in flags.items() if v is not None and v != getattr(saved, k)}
    changed = [f"--{k.replace('_', '-')} {v} (the run's: {getattr(saved, k)})" for k, v in given.items()
               if k not in RESUMABLE]
    if changed:
        raise CheckpointError(f"{source} continues a run that these flags would change: {'; '.join(changed)}. "
                              "Start a fresh run for that (--fresh --out NEW_FOLDER)")
    epochs = given.get("epochs")
    if epochs is not None and epochs < saved.epochs:
        raise CheckpointError(f"--epochs {epochs} is shorter than the run's {saved.epochs}: the one-cycle "
                              "schedule of the run would change under it; resume without --epochs")
    if epochs is not None:
        print(f"--epochs {epochs}: the one-cycle schedule of {saved.epochs} epochs is re-planned over {epochs} (the "
              "learning rate jumps up at the first resumed epoch, then decays more slowly): no longer the run it continues")
    return replace(saved, **given)


def ranged(cast: Callable, ok: Callable, what: str) -> Callable:
    """An argparse type: `cast(text)` when `ok` of it, else argparse's one-line error saying `what` it takes."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


COUNT = ranged(int, lambda v: v >= 1, "a whole number of at least 1")
