import os
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
