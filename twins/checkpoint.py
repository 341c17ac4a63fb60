"""The run folder and what a run writes there, so that nothing is lost and no run overwrites or
mixes with another: checkpoints (`ep{N}.pth`: settings, plan with the run's id, weights, optimizer
and loss-scale state, the W&B run, so that a resumed run is the run it continues), the atomic write,
the read with its checks, and one run per folder (`claimed`)."""
from __future__ import annotations

import fcntl
import io
import os
import re
import secrets
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.torch_core import to_device

from .distributed import bare
from .errors import CheckpointError
from .model import DCAL, device
from .settings import Settings

REQUIRED = ("model", "opt", "epoch", "settings", "plan", "classes", "threshold")
FORMAT = 3  # what a checkpoint holds: raised whenever that changes, so that an older one is named, never misread
# What a run leaves in its folder (train.py, export.py, interpret.py); --lr-find's plot is no run.
RUN_FILES = ("ep*.pth", "test_report.json", "roc.png", "maps", "twins.pkl", "interpret")
LOCK = ".lock"


def checkpoint_path(path: str | Path) -> Path:
    """`models/ep20` and `models/ep20.pth` both name `models/ep20.pth`; a folder names its newest `ep*.pth`."""
    p = Path(path)
    if p.is_dir():
        return newest_checkpoint(p)
    return p if p.suffix == ".pth" else p.with_name(p.name + ".pth")


def epoch_path(folder: str | Path, epoch: int) -> Path:
    return Path(folder) / f"ep{epoch}.pth"


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch an `ep{N}.pth` file holds, from its name; None for any other name (`ep2_backup1.pth`)."""
    m = re.fullmatch(r"ep(\d+)\.pth", path.name)
    return int(m[1]) if m else None


def checkpoints(folder: str | Path) -> list[Path]:
    """The `ep{N}.pth` files of a folder, by epoch."""
    return sorted((p for p in Path(folder).glob("ep*.pth") if checkpoint_epoch(p) is not None), key=checkpoint_epoch)


def newest_checkpoint(folder: str | Path) -> Path:
    found = checkpoints(folder)
    if not found:
        raise CheckpointError(f"no checkpoint ep<N>.pth in {folder}/; train first (python train.py --fresh)")
    return found[-1]


def write_atomic(path: Path, data: bytes) -> None:
    """`data` to a temporary name of this process's own, then renamed: a crash or a second process
    never leaves a half-written or mixed file (leftovers are removed by `claimed`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_meta(learn: Learner, classes: list[str], wandb_id: str | None) -> dict:
    """What a checkpoint holds besides the tensors: the settings and the plan (apart), the training
    ids, the W&B run it logs to."""
    return {"settings": asdict(learn.settings), "plan": asdict(learn.plan), "classes": classes, "wandb_id": wandb_id}


def snapshot(learn: Learner, epoch: int, meta: dict) -> bytes:
    """The Learner as it is now, serialised (later steps do not change it): model (without DDP's wrapper),
    optimizer, epochs done, the fp16 loss scale (every random draw comes from the seed: `data.PairDL`),
    the epoch's validation threshold (export needs no data) and `meta`. Only tensors and plain values, so
    that it loads with `weights_only=True` (fastai keeps its hyper-parameters as numpy floats in an `L`)."""
    opt = learn.opt.state_dict()
    opt = {"state": opt["state"], "hypers": [{k: float(v) for k, v in h.items()} for h in opt["hypers"]]}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "model": bare(learn.model).state_dict(), "opt": opt, "epoch": epoch,
                "scaler": scaler.state_dict() if (scaler := getattr(learn, "scaler", None)) else None,
                "threshold": learn.valid_report["eer_threshold"], **meta}, buf)
    return buf.getvalue()


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by train.py, or CheckpointError saying what is wrong."""
    p = checkpoint_path(path)
    if not p.is_file():
        near = checkpoints(p.parent) if p.parent.is_dir() else []
        what = (f"checkpoint {p}" if Path(path).suffix == ".pth" or checkpoint_epoch(p) is not None
                else f"folder {path}/ or checkpoint {p}")  # `--resume models` with no models/
        raise CheckpointError(f"{what} does not exist" + (f"; found: {', '.join(map(str, near))}" if near else ""))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)  # a pickled object could run code
    except Exception as e:  # weights_only refuses a pickled object, which could run code
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CheckpointError(f"checkpoint {p} cannot be read (" + (
            f"it holds an object, {found[1]}, whose loading could run code)" if found else
            f"not a checkpoint, or an incomplete copy: {type(e).__name__})")) from None
    missing = set(REQUIRED) - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if isinstance(ckpt, dict) and ("config" in ckpt or not missing and ckpt.get("format") != FORMAT):
        raise CheckpointError(f"{p} was written by an earlier version of twins, which this one cannot resume "
                              "or export; train it again with python train.py --fresh")
    if missing:
        raise CheckpointError(f"{p} is not a twins checkpoint (missing {', '.join(sorted(missing))})")
    ckpt["settings"].pop("grad_ckpt", None)  # a setting until format 3's last release, without effect on the run
    if not all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point()):
        raise CheckpointError(f"{p} holds NaN or infinite weights (its run diverged); use an earlier checkpoint")
    return ckpt


def check_classes(ckpt: dict, classes: list[str], source: str) -> None:
    """The data gives the training ids the checkpoint's classifier was trained on, or CheckpointError."""
    if ckpt["classes"] != classes:
        extra, gone = sorted(set(classes) - set(ckpt["classes"])), sorted(set(ckpt["classes"]) - set(classes))
        raise CheckpointError(f"{source} was trained on other training ids than this data gives "
                              f"(new here: {extra[:5]}{'...' if len(extra) > 5 else ''}; missing here: "
                              f"{gone[:5]}{'...' if len(gone) > 5 else ''}; same --data and --valid-pct/--seed?)")


def load_weights(model: DCAL, ckpt: dict, source: str | Path) -> None:
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {source} does not fit the model its settings describe: {e}") from None


def model_from_checkpoint(path: str | Path, dev: torch.device | None = None) -> tuple[DCAL, Settings, dict]:
    """(model in eval mode with the checkpoint's weights, on `dev` (default: the GPU when there is one),
    the run's settings, the whole checkpoint)."""
    ckpt = load_checkpoint(path)
    s = Settings(**ckpt["settings"])
    model = DCAL.from_settings(s, len(ckpt["classes"]), pretrained=False)
    load_weights(model, ckpt, checkpoint_path(path))
    return model.to(dev or device()).eval(), s, ckpt


def restore(learn: Learner, ckpt: dict, source: str | Path) -> None:
    """Model weights and optimizer state from `ckpt`, on the Learner's device."""
    load_weights(learn.model, ckpt, source)
    learn.model.to(device())
    learn.create_opt()
    learn.opt.load_state_dict(to_device(ckpt["opt"], device()))


@contextmanager
def claimed(folder: Path, epoch: int | None):
    """`folder` held for one run while inside: an OS lock (released when the process ends, however it
    ends), so a second run there is refused. A fresh run (`epoch` None) needs a folder without another
    run's files (it never deletes one); a resume from `epoch` never writes over a later checkpoint.
    Leftovers of a killed write are removed."""
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK, "w")
    except OSError as e:  # a file on the way, a read-only place, a full disk
        raise CheckpointError(f"--out {folder}/ cannot be written ({e.strerror or e}): pass another --out") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"{folder}/ is being written by another run: wait for it, or pass another "
                                  "--out") from None
        try:
            found = sorted({p for pattern in RUN_FILES for p in folder.glob(pattern)}) if epoch is None else []
            if found:
                raise CheckpointError(
                    f"{folder}/ holds another run ({', '.join(p.name for p in found[:6])}); a fresh run never "
                    f"overwrites one: pass --out NEW_FOLDER, or delete it first (rm -r {folder})"
                    + (f", or continue it: python train.py --resume {folder}" if checkpoints(folder) else ""))
            later = [p.name for p in checkpoints(folder) if epoch is not None and checkpoint_epoch(p) > epoch]
            if later:
                raise CheckpointError(f"{folder}/ already holds later checkpoints ({', '.join(later)}); resuming "
                                      f"from epoch {epoch} there would overwrite them. Resume from the newest "
                                      f"(--resume {folder}), or into another folder with --out")
            for p in folder.glob(".*.tmp"):
                p.unlink()
            yield
        finally:
            (folder / LOCK).unlink(missing_ok=True)
            if created and not any(folder.iterdir()):  # a run that wrote nothing leaves no folder
                folder.rmdir()
