"""Fitting the GPU and the session: the batch search, gradient accumulation, the time limit, the
preflight check, the learning-rate finder, and the exact Kaggle recipe on the CPU."""
import shutil

import pytest
import torch
from fastai.callback.core import Callback

import train
from helpers import TINY, OneStep, lrs, run, tiny_settings
from twins.plan import Plan, largest_fitting, make_plan, split, training_step
from twins.errors import TwinsError
from twins.model import DCAL, encode_all
from twins.run import build, make_learner, prepare
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


@pytest.mark.parametrize("fits, processes, accum", [
    (40, 1, 1),  # memory to spare: the step in one forward pass, never a larger step
    (16, 1, 1),
    (10, 1, 2),  # two micro-batches of 8
    (6, 1, 4),  # micro-batches must divide the step
    (1, 1, 16),
    (40, 2, 1),  # two GPUs: 8 pairs each
    (6, 2, 2),  # 8 each, in micro-batches of 4
    (1, 2, 8),
    (3, 4, 2),  # 4 each, in micro-batches of 2
])
def test_a_plan_splits_the_recipe_s_step_whatever_the_memory_and_processes(fits, processes, accum):
    got = split("r", 16, processes, fits)
    assert got == Plan("r", 16, accum, processes)  # 16 pairs per step on every machine
    assert got.micro_bs * accum * processes == 16 and got.micro_bs <= fits


@pytest.mark.parametrize("run, processes, accum", [
    ({"bs": 32, "accum": 1, "processes": 2}, 1, 2),  # two GPUs of 16 resumed on one: 2 micro-batches of 16
    ({"bs": 16, "accum": 2, "processes": 1}, 2, 1),  # one GPU in 2 x 8 resumed on two: 8 each
    ({"bs": 16, "accum": 4, "processes": 1}, 2, 2),  # micro-batches of 4 stay 4
    ({"bs": 20, "accum": 1, "processes": 2}, 4, 1),
])
def test_a_resumed_run_keeps_its_steps_on_another_number_of_processes(run, processes, accum, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    saved = Plan("r", **run)
    got = make_plan(Settings(bs=7), None, 5, "r", saved)
    assert got == Plan("r", run["bs"], accum, processes)  # the run's steps, not the settings' bs
    assert got.micro_bs <= saved.micro_bs


def test_a_step_that_processes_cannot_share_equally_is_refused(monkeypatch):
    with pytest.raises(TwinsError, match=r"18 pairs per step cannot be shared equally by 4 processes: use 1 or 2 or "
                                         r"3 or 6 GPU\(s\)"):
        split("r", 18, 4, 18)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(TwinsError, match=r"16 pairs per step cannot be shared equally by 3 processes"):
        make_plan(Settings(), None, 5, "r")


def test_a_gpu_that_fits_no_pair_says_what_to_change():
    def step(bs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(TwinsError, match=r"not even one training pair fits in this GPU's memory: pass a smaller --size"):
        largest_fitting(step, 4)


class CountSteps(Callback):
    def before_fit(self):
        self.steps, self.batches, self.lrs = [], [], []

    def before_epoch(self):
        self.steps.append(0)
        self.batches.append(0)

    def after_step(self):
        self.steps[-1] += 1
        self.lrs.append(self.opt.hypers[-1]["lr"])

    def after_batch(self):
        self.batches[-1] += self.training


def test_accumulation_steps_once_per_step_never_across_epochs_at_the_step_s_learning_rate(tiny_demo):
    s = tiny_settings(tiny_demo)  # 8 pairs per step
    data = prepare(s)
    data.decode(s.size)
    counts = {}
    for accum in (1, 2, 4):
        learn = make_learner(s, Plan("r", bs=8, accum=accum, processes=1), data, DCAL.from_settings(s, len(data.classes)))
        assert learn.dls.train.bs == 8 // accum
        counts[accum] = CountSteps()
        learn.fit_one_cycle(2, 1e-3, cbs=counts[accum])
    steps = len(data.train.paths) // 8  # 53 images: 6 steps an epoch, the incomplete 7th dropped
    for accum, c in counts.items():
        assert c.steps == [steps, steps] and c.batches == [steps * accum] * 2, accum
        assert c.lrs == counts[1].lrs  # the one-cycle schedule by step, whatever the micro-batches
    assert len(set(counts[1].lrs)) == 2 * steps


def test_kaggle_recipe_trains_a_step_and_evaluates_on_the_cpu(tiny_demo):
    """ViT-S/16 at 448 with GLCA and PWCA, as on Kaggle (random init: nothing can be downloaded here)."""
    json_dir, images = tiny_demo
    s = Settings(pretrained=False, bs=1, data=str(json_dir), data_root=str(images), wandb=False)
    data = prepare(s)
    learn = build(s, data)
    assert learn.model.vit.patch_embed.grid_size == (28, 28) and learn.model.n_select == 78
    before = learn.model.glca_block.attn.qkv.weight.detach().clone()
    learn.fit(1, s.lr, cbs=OneStep())  # one training step, no validation
    assert not torch.equal(before, learn.model.glca_block.attn.qkv.weight)
    enc = encode_all(learn.model, data.caches["test"][:2])
    emb = learn.model.embedding(enc)
    assert emb.shape == (2, 2 * 384) and torch.isfinite(emb).all()


def test_time_limit_stops_with_a_checkpoint_that_resumes_like_any_other(fresh_run, tmp_path):
    _, data, p_full = fresh_run
    p = run(["--fresh", "--epochs", "7", *TINY, *data, "--time-limit", "0"], tmp_path, mode="disabled")
    assert "Stopped after epoch 1 of 7" in p.stdout and "python train.py --resume models/ep1.pth" in p.stdout
    assert sorted(f.name for f in (tmp_path / "models").glob("*")) == ["ep1.pth"]
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


def test_lr_find_suggests_a_learning_rate_and_trains_nothing(tiny_demo, tmp_path, monkeypatch, capsys):
    json_dir, images = tiny_demo
    monkeypatch.chdir(tmp_path)
    train.main(["--fresh", "--lr-find", *TINY, "--data", str(json_dir), "--data-root", str(images), "--no-wandb"])
    out = capsys.readouterr().out
    assert "lr_find, 8 pairs per optimiser step: valley" in out
    valley = float(out.split("valley ")[1].split()[0])
    assert f"python train.py --fresh --lr {valley:.3g}" in out  # the lr of the run's own step, not rescaled
    assert not list((tmp_path / "models").glob("*.pth"))  # no training kept
