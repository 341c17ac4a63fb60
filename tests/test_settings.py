"""What the user chose stays as chosen: settings frozen once, the plan derived apart, both stored apart."""
import ast
import dataclasses

import pytest

import train
from helpers import ROOT, TINY, tiny_settings
from twins.checkpoint import load_checkpoint, run_meta
from twins.errors import CheckpointError
from twins.plan import Plan
from twins.run import build, prepare
from twins.settings import RESUMABLE, Settings, fresh_settings, resumed_settings

PRODUCTION = sorted((ROOT / "twins").glob("*.py")) + [ROOT / f for f in ("train.py", "export.py", "interpret.py")]
HOLDERS = {"s", "settings", "saved", "plan"}  # the names settings and plans go by


def test_settings_and_plan_are_frozen_and_no_code_writes_to_them():
    for value in (Settings(), Plan("r", 16, 1, 1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.bs = 1
    for path in PRODUCTION:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                if isinstance(t, ast.Attribute):
                    owner = t.value
                    name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                    assert name not in HOLDERS, f"{path.name}:{node.lineno} writes into {name}.{t.attr}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr != "__setattr__", f"{path.name}:{node.lineno} sets an attribute around frozen"
            assert not (isinstance(node, ast.Name) and node.id == "cfg"), f"{path.name}:{node.lineno}: a cfg dict"


def test_a_resume_takes_the_run_s_settings_and_only_the_flags_it_may(capsys):
    saved = fresh_settings({"lr": 1e-3, "epochs": 7, "size": 32}, demo=True)
    flags = dict.fromkeys(dataclasses.asdict(saved))  # nothing given
    assert resumed_settings(saved, flags, "ep5.pth") == saved
    moved = resumed_settings(saved, {**flags, "out": "elsewhere", "data_root": "/kaggle/input/x", "lr": 1e-3}, "ep5.pth")
    assert moved == dataclasses.replace(saved, out="elsewhere", data_root="/kaggle/input/x")
    assert resumed_settings(saved, {**flags, "epochs": 9}, "ep5.pth").epochs == 9
    assert "re-planned over 9" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=r"would change: --bs 4 \(the run's: 16\); --lr 0.01 \(the run's: 0.001\)"):
        resumed_settings(saved, {**flags, "lr": 1e-2, "bs": 4}, "ep5.pth")
    with pytest.raises(CheckpointError, match=r"^ep5.pth continues a run that these flags would change: --size 48 \(the run's: 32\)"):
        resumed_settings(saved, {**flags, "size": 48}, "ep5.pth")
    assert {"lr", "wd", "seed", "valid_pct", "bs", "drop_path"}.isdisjoint(RESUMABLE)


def test_the_checkpoint_holds_the_user_s_settings_and_the_plan_apart(fresh_run):
    work, data, _ = fresh_run
    ckpt = load_checkpoint(work / "models" / "ep7.pth")
    args = train.parse_args(["--fresh", "--epochs", "7", *TINY, *data])
    chosen = fresh_settings({k: v for k, v in vars(args).items() if k not in train.MODES}, demo=False)
    assert ckpt["settings"] == dataclasses.asdict(chosen)  # exactly as chosen: nothing derived written back
    plan = Plan(**ckpt["plan"])
    assert (plan.bs, plan.accum, plan.processes) == (8, 1, 1) and len(plan.run_id) == 8
    assert set(ckpt["settings"]).isdisjoint({"run_id", "accum", "processes"})


def test_what_the_program_derives_stays_in_the_plan(tiny_demo):
    s = tiny_settings(tiny_demo, bs=4)
    learn = build(s, prepare(s), run_id="r")
    assert learn.settings is s and s.bs == 4
    assert learn.plan == Plan("r", bs=4, accum=1, processes=1)
    meta = run_meta(learn, [], None)
    assert meta["settings"] == dataclasses.asdict(s) and meta["plan"] == dataclasses.asdict(learn.plan)
