"""No run is ever lost, mixed or silently wrong: run folders, the lock, atomic writes, stops by
signal, exact resume, every image checked, and the W&B mode decided at once."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import interpret
import train
from helpers import ROOT, TINY, run
from twins.checkpoint import load_checkpoint, write_atomic
from twins.data import load_dataset, load_faces
from twins.errors import DataError
from twins.plan import Plan
from twins.settings import Settings
from twins.tracking import start_wandb


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_run(src: Path, dest: Path, keep=None) -> Path:
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and (keep is None or f.name in keep):
            shutil.copy(f, dest / f.name)
    return dest


def test_fresh_never_overwrites_a_run(fresh_run, tmp_path, monkeypatch, capsys):
    work, data, _ = fresh_run
    before = {f.name: digest(f) for f in (work / "models").glob("*") if f.is_file()}
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit, match=r"^Checkpoint error: models/ holds another run \(.*ep5.pth.*\); a fresh run "
                                         r"never overwrites one: pass --out NEW_FOLDER, or delete it first \(rm -r "
                                         r"models\), or continue it: python train.py --resume models$"):
        train.main(["--fresh", "--epochs", "1", *TINY, *data, "--no-wandb"])
    assert {f.name: digest(f) for f in (work / "models").glob("*") if f.is_file()} == before
    assert "Caching" not in capsys.readouterr().out  # refused before any image was decoded


def test_resume_writes_beside_its_checkpoint_and_never_over_a_later_one(fresh_run, tmp_path, monkeypatch):
    work, _, _ = fresh_run
    monkeypatch.chdir(tmp_path)
    backup = copy_run(work / "models", tmp_path / "backup")  # cp -a models backup
    with pytest.raises(SystemExit, match=r"backup/ already holds later checkpoints \(ep7.pth\); resuming from epoch 5"):
        train.main(["--resume", "backup/ep5", "--no-wandb"])
    with pytest.raises(SystemExit, match=r"would change: --lr 0.05 \(the run's: 0.001\)"):
        train.main(["--resume", "backup/ep5", "--lr", "0.05", "--no-wandb"])
    with pytest.raises(SystemExit, match="--epochs 6 is shorter than the run's 7"):
        train.main(["--resume", "backup/ep5", "--epochs", "6", "--no-wandb"])
    (backup / "ep7.pth").unlink()
    original = {f.name: digest(f) for f in (work / "models").glob("*.pth")}
    train.main(["--resume", "backup/ep5", "--no-wandb"])
    assert (backup / "ep7.pth").is_file()  # beside the checkpoint it continues ...
    assert {f.name: digest(f) for f in (work / "models").glob("*.pth")} == original  # ... never in the original


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(fresh_run, tmp_path, monkeypatch, capsys):
    work, data, _ = fresh_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open('models/.lock', 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit, match=r"^Checkpoint error: models/ is being written by another run: wait for "
                                             r"it, or pass another --out$"):
            train.main(["--fresh", "--epochs", "1", *TINY, *data, "--no-wandb"])
    finally:
        holder.kill()  # however a run ends, the OS releases its lock
        holder.wait()
    (tmp_path / "models" / ".ep1.pth.4242.beef.tmp").write_bytes(b"half a checkpoint")  # a killed write
    train.main(["--fresh", "--epochs", "1", *TINY, *data, "--no-wandb"])
    assert sorted(f.name for f in (tmp_path / "models").iterdir() if f.name.startswith(".")) == []


def test_concurrent_atomic_writes_never_collide(tmp_path):
    path = tmp_path / "ep5.pth"
    payloads = [bytes([i]) * 50_000 for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda b: write_atomic(path, b), payloads))  # raises if two writes shared a temporary
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["ep5.pth"]


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_a_stop_by_signal_saves_the_last_completed_epoch_and_says_how_to_resume(tiny_demo, tmp_path, sig, name):
    json_dir, images = tiny_demo
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--fresh", "--epochs", "300", *TINY, "--data",
                          str(json_dir), "--data-root", str(images)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("epoch 3/300"):
            break
    p.send_signal(sig)
    rest, _ = p.communicate(timeout=120)
    out = "".join(lines) + rest
    assert p.returncode == 130, out[-2000:]
    assert f"Stopped by {name} during epoch" in out and "Traceback" not in out
    resume = [line.split("--resume ")[1].strip() for line in out.splitlines() if "python train.py --resume" in line]
    assert resume, out[-2000:]
    ckpt = load_checkpoint(tmp_path / resume[0])
    assert ckpt["epoch"] >= 3 and ckpt["epoch"] == int(Path(resume[0]).stem[2:])
    assert not (tmp_path / "models" / ".lock").exists()


def test_an_interrupted_and_resumed_run_is_the_uninterrupted_run(fresh_run, tmp_path):
    """Bit for bit on the CPU: shuffling, augmentation, drop-path and pairs continue where they stopped."""
    work, data, _ = fresh_run
    run(["--fresh", "--epochs", "7", *TINY, *data, "--time-limit", "0"], tmp_path, mode="disabled")
    assert sorted(f.name for f in (tmp_path / "models").glob("ep*.pth")) == ["ep1.pth"]
    run(["--resume", "models"], tmp_path, mode="disabled")
    full, resumed = (torch.load(d / "models" / "ep7.pth", weights_only=False) for d in (work, tmp_path))
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    reports = [json.loads((d / "models" / "test_report.json").read_text()) for d in (work, tmp_path)]
    assert reports[0] == reports[1]


def bad_images(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (120, 80, 60)).save(folder / "good.jpg")
    whole = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "folder.jpg").mkdir(exist_ok=True)
    return {"truncated.jpg": "truncated", "empty.jpg": "not an image, or an empty file", "text.jpg": "not an image",
            "folder.jpg": "Is a directory"}


def test_every_bad_image_is_named_in_one_message_before_training(small_layout, tmp_path, monkeypatch):
    folder, root, tr, _ = small_layout
    bad = bad_images(tmp_path / "bad")
    for name, pid in zip(bad, ("90003", "90004", "90056", "90059")):  # four people get one broken photo each
        target = root / pid / f"{pid}d0.jpg"
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        src = tmp_path / "bad" / name
        shutil.copytree(src, target) if src.is_dir() else shutil.copy(src, target)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(["--fresh", *TINY, "--bs", "2", "--data", str(folder), "--data-root", str(root), "--no-wandb"])
    msg = str(stop.value.code)  # training and validation images, in one message
    assert msg.startswith("Data error: 4 of ") and msg.count(" images cannot be decoded") == 1, msg
    for pid, why in zip(("90003", "90004", "90056", "90059"), bad.values()):
        assert f"{pid}d0.jpg ({why}" in msg
    assert not (tmp_path / "models").exists()


def test_16_bit_and_other_modes_decode_to_the_right_pixels(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "g8.png")
    Image.new("RGBA", (64, 64), (10, 200, 30, 128)).save(tmp_path / "rgba.png")
    got = load_faces([tmp_path / "g16.png", tmp_path / "g8.png", tmp_path / "rgba.png"], 64).int()
    assert (got[0] - got[1]).abs().max() <= 1  # 16-bit scaled to 8 bits, not clipped to white
    assert got[0].float().mean() == pytest.approx(127, abs=3)
    assert got[2][:, 0, 0].tolist() == [10, 200, 30]
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match=r"float.tif \(a 32-bit float image"):
        load_faces([tmp_path / "float.tif"], 64)


def test_json_with_bom_and_windows_paths_load(small_layout, tmp_path):
    folder, root, tr, te = small_layout
    win = {pid: [p.replace("/home/someone/Work/Dataset/ND_TWIN/", "D:\\ND_TWIN\\").replace("/", "\\") for p in ps]
           for pid, ps in tr.items()}
    (folder / "train_dataset_infor.json").write_text(json.dumps(win), encoding="utf-8-sig")
    splits = load_dataset(folder, root)
    assert splits["train"].paths[0] == root / "90003" / "90003d0.jpg"


def test_interpret_says_which_model_and_names_bad_files(fresh_run, tiny_demo, tmp_path, monkeypatch, capsys):
    work, _, _ = fresh_run
    _, images = tiny_demo
    monkeypatch.chdir(work)
    good = str(next(images.rglob("*.jpg")))
    bad_images(tmp_path)
    with pytest.raises(SystemExit, match=r"^Data error: 1 of 2 images cannot be decoded .*truncated.jpg \(truncated: an incomplete copy\?\)"):
        interpret.main(["--ckpt", "models/ep5", "--pair", good, str(tmp_path / "truncated.jpg"), "--out", str(tmp_path)])
    assert re.search(r"^Model: run \w+, epoch 5, models/ep5.pth$", capsys.readouterr().out, re.M)


def test_wandb_mode_is_decided_at_once_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s, plan = Settings(wandb_project="p", wandb_entity="e"), Plan("r", 16, 1, 1)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: the network is down
    t = time.time()
    r = start_wandb(s, plan, None)
    try:
        assert time.time() - t < 30
        assert r is not None and r.settings.mode == "offline"
    finally:
        r.finish()
    out = capsys.readouterr().out
    assert "W&B: logging offline to ./wandb" in out and "http://127.0.0.1:9 cannot be reached" in out
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert start_wandb(s, plan, None) is None and "W&B: off (WANDB_MODE=disabled)" in capsys.readouterr().out


def test_a_checkpoint_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "ep5.pth"
    write_atomic(path, b"the complete previous checkpoint")

    def crash(*_):
        raise OSError("disk full")
    monkeypatch.setattr("twins.checkpoint.os.replace", crash)  # the process dies between writing and renaming
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"half of a new one")
    assert path.read_bytes() == b"the complete previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["ep5.pth"]
