"""train.py as the user runs it: real subprocesses on a small generated set, W&B offline."""
import hashlib
import json

import pytest

import train
from helpers import TINY, OneStep, lrs, run, tiny_settings
from twins.run import build, prepare
from twins.checkpoint import load_checkpoint, newest_checkpoint
from twins.errors import CheckpointError, DataError, TwinsError


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_run_writes_checkpoints_maps_and_report(fresh_run):
    work, _, p = fresh_run
    models = work / "models"
    assert sorted(f.name for f in models.glob("ep*.pth")) == ["ep5.pth", "ep7.pth"]
    assert not list(models.glob("*.tmp"))
    assert sorted(f.name for f in (models / "maps").glob("*.png")) == ["ep3.png", "ep6.png", "ep7.png"]
    report = json.loads((models / "test_report.json").read_text())
    t = report["test"]
    assert 0 <= t["eer"] <= 1 and 0 <= t["auc"] <= 1 and 0 <= t["accuracy"] <= 1
    assert report["valid"]["eer_threshold"] == t["threshold"] == load_checkpoint(models / "ep7.pth")["threshold"]
    assert (models / "roc.png").stat().st_size > 1000
    assert "W&B: logging offline to ./wandb" in p.stdout and "(WANDB_MODE=offline)" in p.stdout
    assert "Settings: " in p.stdout and "Test (twins-only" in p.stdout


def test_offline_wandb_run_holds_history(fresh_run):
    work, _, _ = fresh_run
    runs = list((work / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    for key in (b"train_loss", b"valid_eer", b"branch/loss_glca", b"branch/w_pwca", b"test/eer"):
        assert key in blob, key


def test_resume_continues_the_schedule_and_keeps_old_checkpoints(fresh_run):
    work, data, p_full = fresh_run
    models = work / "models"
    before = {f.name: digest(f) for f in models.glob("ep*.pth")}
    resume_dir = work / "resumed"
    resume_dir.mkdir()
    (resume_dir / "models").mkdir()
    (resume_dir / "models" / "ep5.pth").write_bytes((models / "ep5.pth").read_bytes())
    p = run(["--resume", "models/ep5"], resume_dir)
    assert "Resuming from models/ep5.pth: epoch 5 of 7 done" in p.stdout
    full, resumed = lrs(p_full.stdout), lrs(p.stdout)
    assert sorted(resumed) == [6, 7]  # only the remaining epochs train
    for e in (6, 7):
        assert resumed[e] == pytest.approx(full[e], rel=1e-6)
    assert digest(resume_dir / "models" / "ep5.pth") == before["ep5.pth"]  # never re-saved
    assert (resume_dir / "models" / "ep7.pth").is_file()
    assert {f.name: digest(f) for f in models.glob("ep*.pth")} == before
    # the same W&B run continues
    ids = {d.name.rsplit("-", 1)[-1] for d in (work / "wandb").glob("offline-run-*")}
    ids2 = {d.name.rsplit("-", 1)[-1] for d in (resume_dir / "wandb").glob("offline-run-*")}
    assert ids == ids2


def test_bad_resume_path_and_mismatched_checkpoint(fresh_run, monkeypatch):
    work, data, _ = fresh_run
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit, match=r"^Checkpoint error: checkpoint models/ep99.pth does not exist; "
                                         r"found: models/ep5.pth"):
        train.main(["--resume", "models/ep99"])
    with pytest.raises(SystemExit, match=r"^Checkpoint error: .*would change: --size 48 \(the run's: 32\)"):
        train.main(["--resume", "models/ep5", "--size", "48", "--no-wandb"])
    with pytest.raises(SystemExit, match=r"^Checkpoint error: .*would change: --valid-pct 0.5 \(the run's: 0.25\)"):
        train.main(["--resume", "models/ep5", "--valid-pct", "0.5", "--no-wandb"])
    with pytest.raises(SystemExit, match="^Checkpoint error: checkpoint models/ep7.pth is at epoch 7, already the last"):
        train.main(["--resume", "models/ep7", "--no-wandb"])
    (work / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="^Checkpoint error: checkpoint junk.pth cannot be read"):
        train.main(["--resume", "junk.pth"])
    assert sorted(f.name for f in (work / "models").glob("ep*.pth")) == ["ep5.pth", "ep7.pth"]


def test_library_raises_errors_that_the_cli_turns_into_one_line(fresh_run, tmp_path):
    work, _, _ = fresh_run
    with pytest.raises(CheckpointError, match="does not exist"):  # a notebook gets an exception, not an exit
        load_checkpoint(work / "models" / "ep99")
    with pytest.raises(CheckpointError, match="no checkpoint ep"):
        newest_checkpoint(tmp_path)
    assert issubclass(DataError, TwinsError) and issubclass(CheckpointError, TwinsError)


def test_bad_data_stops_before_training(tmp_path, tiny_demo, monkeypatch):
    json_dir, _ = tiny_demo
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^Data error: .*images not found as written; pass --data-root"):
        train.main(["--fresh", *TINY, "--data", str(json_dir), "--no-wandb"])
    assert not (tmp_path / "models").exists()


def test_no_weight_decay_on_norms_biases_position_class_token_and_loss_parameters(tiny_demo):
    s = tiny_settings(tiny_demo)
    learn = build(s, prepare(s))
    learn.fit(1, 1e-3, cbs=OneStep())  # one real step: the optimizer's groups in use
    decayed = {n for n, p in learn.model.named_parameters() if learn.opt.state[p].get("do_wd", True)}
    for name in ("vit.pos_embed", "vit.cls_token", "vit.blocks.0.norm1.weight", "vit.blocks.0.attn.qkv.bias",
                 "vit.norm.bias", "glca_norm.weight", "log_vars", "pair_logit"):
        assert name not in decayed, name
    for name in ("vit.blocks.0.attn.qkv.weight", "vit.blocks.1.mlp.fc1.weight", "glca_block.attn.proj.weight",
                 "sa_head.weight", "vit.patch_embed.proj.weight"):
        assert name in decayed, name
