"""Recipes and defaults: the one place where a run's settings and their default values live."""
from __future__ import annotations

import torch

from .errors import CheckpointError

WANDB_ENTITY = "hunchoquavodb-hanoi-university-of-science-and-technology"

# The Kaggle recipe (P100 or T4, 16 GB): see PLAN.md "Input size" for the figures behind it. `bs` and `lr`
# go together: `--bs auto` (the default) keeps them when memory is short (gradient accumulation) and
# scales `lr` with the batch when it is raised to fill the GPU (twins/batch.py).
KAGGLE = dict(arch="vit_small_patch16_224.augreg_in21k_ft_in1k", size=448, patch_size=None, pretrained=True,
              epochs=40, bs=16, lr=1e-4, wd=0.05, drop_path=0.1, top_r=0.1)
# The CPU demo recipe: a small ViT from scratch on the generated set, a few minutes on 2 cores.
DEMO = dict(arch="test_vit", size=64, patch_size=8, pretrained=False, epochs=30, bs=16, lr=2e-3, wd=0.05,
            drop_path=0.0, top_r=0.2)
# Everything else a run is configured by.
DEFAULTS = dict(data="data_json", data_root=None, demo=False, valid_pct=0.1, seed=42, out="models", map_every=5,
                wandb_project="twins-dcal", wandb_entity=WANDB_ENTITY, wandb=True, glca=True, pwca=True,
                bs_auto=True, accum=1, processes=1, grad_ckpt=False, save_every=5, run_id=None, weights=None)
# Kaggle ends a session at 12 h, and a "Save & Run All" version that runs past it keeps no output:
# stop (with a checkpoint) before an epoch that would end past this, leaving time for the test report.
KAGGLE_TIME_LIMIT_H = 11.5
# What makes a checkpoint's weights fit a model: these must match on --resume.
MODEL_KEYS = ("arch", "size", "patch_size", "glca", "pwca", "top_r")
# What makes the optimisation the one the checkpoint's run planned: refused on --resume (except a
# longer --epochs, said out loud), so that a resumed run is the run it continues.
SCHEDULE_KEYS = ("lr", "wd", "bs", "accum", "drop_path", "seed", "valid_pct")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_config(flags: dict, base: dict) -> dict:
    """The run's configuration: `base` (a recipe, or the checkpoint's config on resume) over the
    defaults, with the flags the user gave (those not None) on top."""
    return {**DEFAULTS, **base, **{k: v for k, v in flags.items() if v is not None}}


def resume_config(ckpt_cfg: dict, flags: dict, source: str) -> dict:
    """The configuration of a resumed run: the checkpoint's, with only the flags that leave its
    optimisation unchanged (data location, output, logging, memory). A changed schedule flag is
    refused; a longer --epochs is allowed and said out loud (the one-cycle schedule is re-planned)."""
    base = {**DEFAULTS, **ckpt_cfg}
    changed = [f"--{k.replace('_', '-')} {flags[k]} (the run's: {base[k]})" for k in SCHEDULE_KEYS
               if flags.get(k) is not None and flags[k] != base[k]]
    if changed:
        raise CheckpointError(f"{source} continues a run whose optimisation these flags would change: "
                              f"{'; '.join(changed)}. Start a fresh run for that (--fresh --out NEW_FOLDER)")
    epochs = flags.get("epochs")
    if epochs is not None and epochs < base["epochs"]:
        raise CheckpointError(f"--epochs {epochs} is shorter than the run's {base['epochs']}: the one-cycle "
                              "schedule of the run would change under it; resume without --epochs")
    if epochs is not None and epochs > base["epochs"]:
        print(f"--epochs {epochs}: the one-cycle schedule planned over {base['epochs']} epochs is re-planned over "
              f"{epochs}: from here on the learning rate follows the longer schedule (a jump up at the first "
              "resumed epoch, then a slower decay), so this is no longer the run it continues")
    return resolve_config({k: v for k, v in flags.items() if k not in SCHEDULE_KEYS}, base)
