import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is first imported: before any twins import

import pytest  # noqa: E402

from helpers import TINY, jpeg, run, write_layout  # noqa: E402
from twins.demo import make_demo  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")  # nothing may try the network


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small generated set in the user's layout: (json folder, image root)."""
    out = tmp_path_factory.mktemp("demo")
    json_dir = make_demo(out, n_train_families=8, n_test_families=3, images_per_person=(3, 5), size=64, seed=1)
    return json_dir, out / "images"


@pytest.fixture(scope="session")
def fresh_run(tiny_demo, tmp_path_factory):
    """One fresh 7-epoch training run of train.py: (work folder, data flags, completed process)."""
    json_dir, images = tiny_demo
    work = tmp_path_factory.mktemp("run")
    data = ["--data", str(json_dir), "--data-root", str(images)]
    p = run(["--fresh", "--epochs", "7", *TINY, *data], work)
    return work, data, p


@pytest.fixture
def small_layout(tmp_path):
    """Two twin pairs in train, one in test, images under a foreign absolute prefix:
    (json folder, image root, train info, test info)."""
    root = tmp_path / "imgs"
    prefix = "/home/someone/Work/Dataset/ND_TWIN"

    def info(ids):
        out = {}
        for i in ids:
            out[i] = []
            for k in range(3):
                jpeg(root / i / f"{i}d{k}.jpg", value=int(i) % 200 + k)
                out[i].append(f"{prefix}/{i}/{i}d{k}.jpg")
        return out
    tr, te = info(["90003", "90004", "90056", "90059"]), info(["91001", "91002"])
    folder = write_layout(tmp_path / "json", tr, [["90003", "90004"], ["90056", "90059"]], te, [["91001", "91002"]])
    return folder, root, tr, te
