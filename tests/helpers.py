"""What the tests share besides fixtures: the tiny recipe and real subprocess runs of the user's commands."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from fastai.callback.core import Callback, CancelFitException
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_JSON = ROOT.parent / "shared" / "nd_twin_json"

TINY = ["--arch", "test_vit", "--size", "32", "--patch-size", "8", "--no-pretrained", "--bs", "8", "--lr", "1e-3",
        "--top-r", "0.25", "--valid-pct", "0.25", "--map-every", "3"]


def run(args, cwd, mode="offline", check=True, script="train.py", processes=1, accelerate=False, env=None):
    """A real subprocess run of one of the user's commands. With `processes` > 1: the user's `python
    train.py` on a machine that reports that many GPUs (`fake_gpus.py`), or with `accelerate`, README's
    former `accelerate launch --multi_gpu` (both: CPU processes over gloo)."""
    env = {**os.environ, "WANDB_MODE": mode, "WANDB_SILENT": "true", **(env or {})}
    env.pop("WANDB_API_KEY", None)
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"  # a thread per process on the CI's 2 cores
    command = [sys.executable, str(ROOT / script)]
    if accelerate:
        command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / script)]
    elif processes > 1:
        assert processes == 2 and script == "train.py"
        command = [sys.executable, str(ROOT / "tests" / "fake_gpus.py")]
    p = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def lrs(stdout: str) -> dict:
    """Epoch -> learning rate, from the per-epoch lines train.py prints."""
    return {int(e): float(lr) for e, lr in re.findall(r"^epoch (\d+)/\d+ lr (\S+) ", stdout, re.M)}


def tiny_settings(tiny_demo, **overrides):
    """The settings of the tiny recipe on the tiny demo set, as train.py would make them."""
    from twins.settings import fresh_settings
    json_dir, images = tiny_demo
    flags = dict(arch="test_vit", size=32, patch_size=8, pretrained=False, bs=8, lr=1e-3, top_r=0.25, valid_pct=0.25,
                 map_every=3, data=str(json_dir), data_root=str(images), wandb=False)
    return fresh_settings({**flags, **overrides}, demo=True)


def write_layout(folder: Path, train_info, train_pairs, test_info, test_pairs) -> Path:
    """The four JSON files of the user's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in (("train_dataset_infor", train_info), ("train_twin_pairs", train_pairs),
                      ("test_dataset_infor", test_info), ("test_twin_pairs", test_pairs)):
        (folder / f"{name}.json").write_text(json.dumps(obj))
    return folder


def jpeg(path: Path, value: int = 128, size: int = 24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, value // 2)).save(path)


class OneStep(Callback):
    """Ends a fit after its first training step (no validation)."""
    def after_batch(self):
        if self.training:
            raise CancelFitException()
