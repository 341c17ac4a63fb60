"""Where a run writes, so that no run overwrites or mixes with another: one run per output folder
(`run.json` names it), a lock against a second process, and the rules for fresh and resumed runs."""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import checkpoint_epoch, clean_leftovers
from .errors import CheckpointError

# What a run leaves in its folder (train.py, export.py, interpret.py); --lr-find's plot is no run.
RUN_FILES = ("ep*.pth", "run.json", "test_report.json", "roc.png", "maps", "twins.pkl", "interpret")
LOCK = ".lock"


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def run_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in RUN_FILES for p in folder.glob(pattern)})


def folder_run_id(folder: Path) -> str | None:
    try:
        return json.loads((folder / "run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def claim_for_fresh(folder: Path, overwrite: bool) -> None:
    """A fresh run needs a folder without another run in it; `overwrite` deletes that run first."""
    found = run_files(folder) if folder.is_dir() else []
    if not found:
        return
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    if not overwrite:
        raise CheckpointError(f"{folder}/ holds another run ({names}); a fresh run never overwrites one: pass "
                              "--out NEW_FOLDER, or add --overwrite to delete it first (an unfinished run continues "
                              f"with python train.py --resume {folder})")
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    print(f"--overwrite: deleted the previous run in {folder}/ ({names})")


def claim_for_resume(folder: Path, run_id: str | None, epoch: int) -> None:
    """A resumed run writes only into a folder of its own run (or an empty one), and never over a
    checkpoint later than the one it continues (that would be another lineage)."""
    if not folder.is_dir():
        return
    other = folder_run_id(folder)
    if other is not None and other != run_id and run_files(folder):
        raise CheckpointError(f"{folder}/ holds another run ({other}); resume into a new folder with --out")
    later = sorted(p.name for p in folder.glob("ep*.pth") if checkpoint_epoch(p) > epoch)
    if later:
        raise CheckpointError(f"{folder}/ already holds later checkpoints ({', '.join(later)}); resuming from "
                              f"epoch {epoch} there would overwrite them. Resume from the newest "
                              f"(--resume {folder}), or branch off into a new folder with --out")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def locked(folder: Path):
    """Hold `folder/.lock` (this process's id) while a run writes there; a second process is refused
    with a message. A lock left by a process that no longer runs is taken over."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise CheckpointError(f"{folder}/ is being written by another process (pid {pid}, since "
                                      f"{time.ctime(lock.stat().st_mtime)}); wait for it, or use --out "
                                      "another folder") from None
            lock.unlink(missing_ok=True)  # stale: its process has ended
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        left = clean_leftovers(folder)
        if left:
            print(f"Removed {len(left)} temporary file(s) a stopped write left in {folder}/")
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):  # a run that stopped before writing anything leaves no folder
            folder.rmdir()


def write_run_json(folder: Path, cfg: dict) -> None:
    (folder / "run.json").write_text(json.dumps({"run_id": cfg["run_id"], "config": cfg}, indent=1, default=str))
