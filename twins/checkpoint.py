"""The checkpoint format, in one place: where checkpoints live (`ep{N}.pth`), the atomic write, the
read with its checks, compatibility with a run, and the model, optimizer and loss-scale state they
restore (so that a resumed run is the run it continues)."""
from __future__ import annotations

import io
import os
import re
import secrets
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.torch_core import to_device

from .config import MODEL_KEYS, device
from .distributed import bare
from .errors import CheckpointError
from .model import DCAL

REQUIRED = ("model", "opt", "epoch", "config", "classes")


def checkpoint_path(path: str | Path) -> Path:
    """`models/ep20` and `models/ep20.pth` both name `models/ep20.pth`; a folder names its newest `ep*.pth`."""
    p = Path(path)
    if p.is_dir():
        return newest_checkpoint(p)
    return p if p.suffix == ".pth" else p.with_name(p.name + ".pth")


def epoch_path(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"ep{epoch}.pth"


def checkpoint_epoch(path: Path) -> int:
    """The epoch an `ep{N}.pth` file holds, from its name."""
    return int(re.sub(r"\D", "", path.stem) or 0)


def newest_checkpoint(folder: str | Path) -> Path:
    found = sorted(Path(folder).glob("ep*.pth"), key=checkpoint_epoch)
    if not found:
        raise CheckpointError(f"no checkpoint ep*.pth in {folder}/; train first (python train.py --fresh) "
                              "or pass --ckpt")
    return found[-1]


def write_atomic(path: Path, data: bytes) -> None:
    """`data` to a temporary name of this process's own, then renamed: a crash or a second process
    never leaves a half-written or mixed file (leftovers: `clean_leftovers`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files that a killed write left in `folder` (call with the folder's lock held)."""
    found = [p for p in folder.glob(".*.tmp")] + list(folder.glob("*.pth.tmp"))
    for p in found:
        p.unlink(missing_ok=True)
    return found


def run_state(learn: Learner) -> dict:
    """What the next epoch continues from besides the weights and optimizer: the fp16 loss scale.
    (Every random draw of an epoch comes from the seed and the epoch: `data.RedrawPairs`.)"""
    return {"scaler": learn.scaler.state_dict()} if getattr(learn, "scaler", None) is not None else {}


def restore_run_state(learn: Learner, state: dict) -> None:
    if "scaler" in state and getattr(learn, "scaler", None) is not None:
        learn.scaler.load_state_dict(state["scaler"])


def snapshot(learn: Learner, epoch: int, meta: dict) -> bytes:
    """The checkpoint of the Learner as it is now, serialised (a copy: later training steps do not
    change it): model (without DDP's wrapper), optimizer, epochs completed, run state and `meta`
    (config, training ids, W&B run id)."""
    buf = io.BytesIO()
    torch.save({"model": bare(learn.model).state_dict(), "opt": learn.opt.state_dict(), "epoch": epoch,
                "run_state": run_state(learn), **meta}, buf)
    return buf.getvalue()


def save_checkpoint(path: Path, learn: Learner, epoch: int, meta: dict) -> None:
    write_atomic(path, snapshot(learn, epoch, meta))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by train.py, or CheckpointError saying what is wrong."""
    p = checkpoint_path(path)
    if not p.is_file():
        near = sorted(p.parent.glob("ep*.pth")) if p.parent.is_dir() else []
        raise CheckpointError(f"checkpoint {p} does not exist" + (f"; found: {', '.join(map(str, near))}" if near else ""))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)  # fastai's optimizer state is not weights-only
    except Exception as e:
        raise CheckpointError(f"checkpoint {p} cannot be read ({type(e).__name__}: {e})") from None
    missing = set(REQUIRED) - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise CheckpointError(f"{p} is not a twins checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def check_compatible(ckpt: dict, cfg: dict, classes: list[str], source: str) -> None:
    """The run described by `cfg` and `classes` can take this checkpoint's weights, or CheckpointError."""
    diffs = [f"{k}: checkpoint {ckpt['config'][k]!r} vs {cfg[k]!r}" for k in MODEL_KEYS if ckpt["config"][k] != cfg[k]]
    if diffs:
        raise CheckpointError(f"{source} does not match this run ({'; '.join(diffs)})")
    if ckpt["classes"] != classes:
        extra, gone = sorted(set(classes) - set(ckpt["classes"])), sorted(set(ckpt["classes"]) - set(classes))
        raise CheckpointError(f"{source} was trained on other training ids than this data gives "
                              f"(new here: {extra[:5]}{'...' if len(extra) > 5 else ''}; missing here: "
                              f"{gone[:5]}{'...' if len(gone) > 5 else ''}; same --data and --valid-pct/--seed?)")


def load_weights(model: DCAL, ckpt: dict, source: str | Path) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {source} does not fit the model its config describes: {e}") from None


def model_from_checkpoint(path: str | Path, dev: torch.device | None = None) -> tuple[DCAL, dict, dict]:
    """(model in eval mode with the checkpoint's weights, on `dev` (default: the GPU when there is one),
    the run's config, the whole checkpoint)."""
    ckpt = load_checkpoint(path)
    model = DCAL.from_config(ckpt["config"], len(ckpt["classes"]), pretrained=False)
    load_weights(model, ckpt, checkpoint_path(path))
    return model.to(dev or device()).eval(), ckpt["config"], ckpt


def restore(learn: Learner, ckpt: dict, source: str | Path) -> None:
    """Model weights and optimizer state from `ckpt`, on the Learner's device."""
    load_weights(learn.model, ckpt, source)
    learn.model.to(device())
    learn.create_opt()
    learn.opt.load_state_dict(to_device(ckpt["opt"], device()))
