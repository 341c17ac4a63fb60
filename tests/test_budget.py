"""Fitting the GPU and the session: the batch search, gradient accumulation, the time limit, the
preflight check, the learning-rate finder, and the exact Kaggle recipe on the CPU."""
import shutil

import pytest
import torch
from fastai.callback.core import Callback

import train
from helpers import TINY, lrs, run, tiny_settings
from twins.plan import Plan, from_fits, largest_fitting, reshare, training_step
from twins.errors import CheckpointError
from twins.model import DCAL, encode_all
from twins.run import StepTimer, build, make_learner, prepare
from twins.settings import Settings


def test_batch_search_takes_the_largest_batch_below_the_out_of_memory_limit():
    model = DCAL("test_vit", 5, 32, pretrained=False, top_r=0.25, patch_size=8)
    real = training_step(model, 5, 32, torch.device("cpu"))
    tried, ran = [], []

    def step(bs):  # a real training step that runs out of memory above 11 pairs, like a GPU would
        tried.append(bs)
        if bs > 11:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real(bs)
        ran.append(bs)

    assert largest_fitting(step, 32) == 11
    assert tried == sorted(tried, reverse=True) and tried[0] == 32 and ran == [11]

    def broken(bs):  # any other error is the user's to see, not a reason to shrink the batch
        raise ValueError("not a memory problem")
    with pytest.raises(ValueError, match="not a memory problem"):
        largest_fitting(broken, 8)


@pytest.mark.parametrize("fits, processes, expected", [
    (40, 1, {"bs": 36, "accum": 1, "lr": 1e-4 * 36 / 16}),  # memory to spare: a larger batch, lr scaled with it
    (18, 1, {"bs": 16, "accum": 1, "lr": 1e-4}),  # 16 after the margin: the recipe
    (12, 1, {"bs": 16, "accum": 2, "lr": 1e-4}),  # 10 after the margin: two micro-batches of 8
    (7, 1, {"bs": 16, "accum": 4, "lr": 1e-4}),  # 6: micro-batches must divide the recipe's batch
    (1, 1, {"bs": 16, "accum": 16, "lr": 1e-4}),
    (12, 2, {"bs": 20, "accum": 1, "lr": 1e-4 * 20 / 16}),  # two GPUs of 10: 20 pairs per step
    (7, 2, {"bs": 16, "accum": 2, "lr": 1e-4}),  # two GPUs of 6: 8 each, in micro-batches of 4
    (1, 2, {"bs": 16, "accum": 8, "lr": 1e-4}),
    (4, 3, {"bs": 18, "accum": 2, "lr": 1e-4 * 18 / 16}),  # 16 cannot be shared by 3: 6 each, micro-batches of 3
])
def test_plan_keeps_the_recipe_or_scales_the_learning_rate(fits, processes, expected):
    got = from_fits(fits, 16, 1e-4, processes, "r")
    assert (got.bs, got.accum, got.processes, got.run_id) == (expected["bs"], expected["accum"], processes, "r")
    assert got.lr == pytest.approx(expected["lr"])
    share = got.bs // processes
    assert share * processes == got.bs and share % got.accum == 0
    assert got.micro_bs == share // got.accum <= max(1, int(fits * 0.9))  # every micro-batch fits


@pytest.mark.parametrize("run, processes, accum", [
    ({"bs": 32, "accum": 1, "processes": 2}, 1, 2),  # two GPUs of 16 resumed on one: 2 micro-batches of 16
    ({"bs": 16, "accum": 2, "processes": 1}, 2, 1),  # one GPU in 2 x 8 resumed on two: 8 each
    ({"bs": 16, "accum": 4, "processes": 1}, 2, 2),  # micro-batches of 4 stay 4
    ({"bs": 20, "accum": 1, "processes": 2}, 4, 1),
])
def test_a_resumed_run_keeps_its_steps_on_another_number_of_processes(run, processes, accum):
    saved = Plan("r", **run, lr=1e-3)
    got = reshare(saved, processes)
    assert got == Plan("r", run["bs"], accum, processes, 1e-3)  # the same steps, lr and run
    assert got.micro_bs <= saved.micro_bs


def test_a_step_that_processes_cannot_share_equally_is_refused():
    with pytest.raises(CheckpointError, match=r"18 pairs, which 4 processes cannot share equally; resume it with "
                                              r"1 or 2 or 3 or 6 process"):
        reshare(Plan("r", 18, 1, 3, 1e-3), 4)


class CountSteps(Callback):
    def before_fit(self):
        self.steps = self.batches = 0

    def after_step(self):
        self.steps += 1

    def after_batch(self):
        self.batches += self.training


def test_gradient_accumulation_steps_once_per_recipe_batch(tiny_demo):
    s = tiny_settings(tiny_demo)
    data = prepare(s)
    data.decode(s.size)
    learn = make_learner(s, Plan("r", bs=8, accum=2, processes=1, lr=1e-3), data, DCAL.from_settings(s, len(data.classes)))
    assert learn.dls.train.bs == 4
    counter = CountSteps()
    learn.fit(1, 1e-3, cbs=counter)
    assert counter.batches == len(learn.dls.train) and counter.steps == counter.batches // 2


def test_kaggle_recipe_trains_a_step_and_evaluates_on_the_cpu(tiny_demo):
    """ViT-S/16 at 448 with GLCA and PWCA, as on Kaggle (random init: nothing can be downloaded here)."""
    json_dir, images = tiny_demo
    s = Settings(pretrained=False, bs=1, data=str(json_dir), data_root=str(images), wandb=False)
    data = prepare(s)
    learn = build(s, data)
    assert learn.model.vit.patch_embed.grid_size == (28, 28) and learn.model.n_select == 78
    before = learn.model.glca_block.attn.qkv.weight.detach().clone()
    learn.fit(1, s.lr, cbs=StepTimer(1, stop_after_valid=False))  # one training step, no validation
    assert not torch.equal(before, learn.model.glca_block.attn.qkv.weight)
    enc = encode_all(learn.model, data.caches["test"][:2])
    emb = learn.model.embedding(enc)
    assert emb.shape == (2, 2 * 384) and torch.isfinite(emb).all()


def test_time_limit_stops_with_a_checkpoint_that_resumes_like_any_other(fresh_run, tmp_path):
    _, data, p_full = fresh_run
    p = run(["--fresh", "--epochs", "7", *TINY, *data, "--time-limit", "0"], tmp_path, mode="disabled")
    assert "Stopped after epoch 1 of 7" in p.stdout and "python train.py --resume models/ep1.pth" in p.stdout
    assert sorted(f.name for f in (tmp_path / "models").glob("*")) == ["ep1.pth", "run.json"]
    # the next session: the output of the last one is read-only input, new files go to --out
    prev = tmp_path / "input" / "previous"
    shutil.copytree(tmp_path / "models", prev)
    before = {f.name: f.read_bytes() for f in prev.iterdir()}
    p = run(["--resume", str(prev), "--out", "models2"], tmp_path, mode="disabled")
    assert f"Resuming from {prev / 'ep1.pth'}: epoch 1 of 7 done" in p.stdout
    full, resumed = lrs(p_full.stdout), lrs(p.stdout)
    assert sorted(resumed) == [2, 3, 4, 5, 6, 7]
    for e in resumed:
        assert resumed[e] == pytest.approx(full[e], rel=1e-6)
    assert {f.name: f.read_bytes() for f in prev.iterdir()} == before
    assert {"ep5.pth", "ep7.pth", "test_report.json"} <= {f.name for f in (tmp_path / "models2").iterdir()}
    assert "\r" not in p.stdout and "█" not in p.stdout  # a log file gets lines, not progress bars


def test_check_runs_every_step_and_projects_the_run(tiny_demo, tmp_path, monkeypatch, capsys):
    json_dir, images = tiny_demo
    monkeypatch.chdir(tmp_path)
    args = ["--fresh", "--check", *TINY, "--data", str(json_dir), "--data-root", str(images), "--no-wandb"]
    with pytest.raises(SystemExit) as stop:
        train.main([*args, "--bs", "auto", "--epochs", "40"])
    out = capsys.readouterr().out
    assert stop.value.code == 0, out
    for line in ("Batch: the recipe's 16 pairs in each process (no GPU to measure)",
                 "Batch: 16 pairs per optimiser step, peak lr 0.001", "Check data and model: ",
                 "Check training steps: ", "pairs/s", "Check checkpoint: written", "read back and resumed",
                 "Check passed.", "for 40 epochs", "Fits a Kaggle session"):
        assert line in out, line
    assert not (tmp_path / "models").exists()  # a check leaves no checkpoint that could pass for a run
    with pytest.raises(SystemExit) as stop:  # pretrained weights that cannot be downloaded fail the check
        train.main([a for a in args if a != "--no-pretrained"] + ["--arch", "vit_small_patch16_224", "--patch-size", "16"])
    assert stop.value.code == 1
    assert "Check FAILED at 'data and model'" in capsys.readouterr().out


def test_lr_find_saves_the_plot_and_suggests_a_learning_rate(tiny_demo, tmp_path, monkeypatch, capsys):
    json_dir, images = tiny_demo
    monkeypatch.chdir(tmp_path)
    train.main(["--fresh", "--lr-find", *TINY, "--data", str(json_dir), "--data-root", str(images), "--no-wandb"])
    out = capsys.readouterr().out
    assert (tmp_path / "models" / "lr_find.png").stat().st_size > 5000
    assert "lr_find at 8 pairs per step: valley" in out and "--lr" in out
    assert not list((tmp_path / "models").glob("*.pth"))  # no training kept
