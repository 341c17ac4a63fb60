import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")  # nothing may try the network
warnings.filterwarnings("ignore", category=FutureWarning)

SHARED_JSON = ROOT.parent / "shared" / "nd_twin_json"


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small generated set in the user's layout: (json folder, image root)."""
    from twins.demo import make_demo
    out = tmp_path_factory.mktemp("demo")
    json_dir = make_demo(out, n_train_families=8, n_test_families=3, images_per_person=(3, 5), size=64, seed=1)
    return json_dir, out / "images"


TINY = ["--arch", "test_vit", "--size", "32", "--patch-size", "8", "--no-pretrained", "--bs", "8", "--lr", "1e-3",
        "--top-r", "0.25", "--valid-pct", "0.25", "--map-every", "3"]


def run(args, cwd, mode="offline", check=True, script="train.py"):
    """A real subprocess run of one of the user's commands."""
    env = {**os.environ, "WANDB_MODE": mode, "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    p = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=900)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def lrs(stdout: str) -> dict:
    return {int(e): float(lr) for e, lr in re.findall(r"^epoch (\d+) lr (\S+) ", stdout, re.M)}


@pytest.fixture(scope="session")
def fresh_run(tiny_demo, tmp_path_factory):
    """One fresh 7-epoch training run of train.py: (work folder, data flags, completed process)."""
    json_dir, images = tiny_demo
    work = tmp_path_factory.mktemp("run")
    data = ["--data", str(json_dir), "--data-root", str(images)]
    p = run(["--fresh", "--epochs", "7", *TINY, *data], work)
    return work, data, p
