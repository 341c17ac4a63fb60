"""One run trained by several processes: two CPU processes talking over gloo stand in for the two GPUs
of a T4 x2 (NCCL there); `accelerate launch` starts them exactly as README's Kaggle cell does."""
import json
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import TINY, lrs, run, tiny_settings
from twins.run import build, prepare
from twins.checkpoint import load_checkpoint, model_from_checkpoint
from twins.data import prepare_data, sample_pairs, shard
from twins.evaluate import embed_images, evaluate

SEED = 40  # its validation split has 19 images: the last batch of two processes needs padding


@pytest.mark.parametrize("n, bs, world", [(50, 4, 2), (19, 4, 2), (53, 3, 3), (7, 4, 2), (16, 8, 1)])
def test_the_shard_rule_takes_each_anchor_once_and_gathers_in_order(n, bs, world):
    order = list(np.random.default_rng(n).permutation(n))
    train = [shard(order, bs, r, world, drop_last=True) for r in range(world)]
    step = world * bs
    assert all(len(t) == len(train[0]) and len(t) % bs == 0 for t in train)
    for k in range(0, len(train[0]), bs):  # step k: the processes' batches together are the next slice of the order
        assert sum((t[k:k + bs] for t in train), []) == order[k * world:(k + bs) * world]
    assert sorted(sum(train, [])) == sorted(order[:n - n % step])  # only the incomplete last step is dropped
    valid = [shard(order, bs, r, world, drop_last=False) for r in range(world)]
    assert len({len(v) for v in valid}) == 1  # equal shapes: what all_gather needs
    gathered = [i for k in range(0, len(valid[0]), bs) for v in valid for i in v[k:k + bs]]
    assert gathered[:n] == order and len(gathered) - n < world  # image order, then at most world-1 repeats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, s, folder: str):
    """One of two processes: its pairs, random draws and anchors in two epochs, its validation
    figures, the validation embeddings."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from twins.distributed import start
    start()
    sys.stdout = open(os.devnull, "w")
    learn = build(s, prepare(s))
    assert learn.plan.bs == 8 and learn.plan.processes == 2
    dl, seen = learn.dls.train, {}
    create = dl.create_batch
    for epoch in range(2):
        anchors = []
        dl.create_batch = lambda b, anchors=anchors: (anchors.extend(int(i) for i in b), create(b))[1]
        learn.epoch = epoch
        learn.redraw_pairs.before_train()  # what fastai calls before each training epoch
        seen[epoch] = {"partner": dl.dataset.partner.clone(), "draw": torch.rand(4), "anchors": anchors}
        assert sum(1 for _ in dl) == len(dl)
    valid = [float(v) for v in learn.validate()]
    emb = embed_images(learn.model, learn.dls.valid.dataset.cache)
    torch.save({"epochs": seen, "valid": valid, "emb": emb, "model": learn.model.state_dict()},
               f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_train_each_anchor_once_and_gather_validation_in_image_order(tiny_demo, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), tiny_settings(tiny_demo, seed=SEED, bs=4), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ranks = [r["epochs"] for r in results]
    single = tiny_settings(tiny_demo, seed=SEED)
    one = build(single, prepare(single))
    one.model.load_state_dict(results[0]["model"])
    n = len(one.dls.train.dataset)
    for epoch in range(2):
        partner, same = sample_pairs(one.dls.train.dataset.split, np.random.default_rng([SEED, epoch]))
        for r in ranks:  # every process trains on one process's pairs: the same 50/50 split
            assert torch.equal(r[epoch]["partner"], torch.from_numpy(partner))
        assert same.sum() in (n // 2, n - n // 2)
        mine = [r[epoch]["anchors"] for r in ranks]
        assert len(mine[0]) == len(mine[1]) and not set(mine[0]) & set(mine[1])
        assert len(set(mine[0] + mine[1])) == n - n % 8  # every anchor once; only the incomplete last step dropped
        one.epoch = epoch
        one.redraw_pairs.before_train()
        assert torch.equal(ranks[0][epoch]["draw"], torch.rand(4))  # augmentation: process 0 draws as one process
        assert not torch.equal(ranks[0][epoch]["draw"], ranks[1][epoch]["draw"])  # and the others independently
    assert ranks[0][0]["anchors"] != ranks[0][1]["anchors"]  # a new order each epoch
    # validation: 19 images, the last two-process batch padded; gathered, they give one process's figures
    assert len(one.dls.valid.dataset) == 19
    assert results[0]["valid"] == results[1]["valid"]
    assert results[0]["valid"][1:] == pytest.approx([float(v) for v in one.validate()][1:], abs=1e-6)
    assert torch.allclose(results[0]["emb"], embed_images(one.model, one.dls.valid.dataset.cache), atol=1e-5)


def test_one_process_on_several_gpus_says_how_to_use_them_all(monkeypatch, capsys):
    import train
    assert train.gpu_note(["--fresh"], 1) is None
    note = train.gpu_note(["--fresh", "--epochs", "5"], 2)
    assert "Training on 1 of the 2 GPUs" in note
    assert "accelerate launch --multi_gpu --num_processes 2 train.py --fresh --epochs 5" in note
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched with both: nothing to say
    assert train.gpu_note(["--fresh"], 2) is None
    with pytest.raises(SystemExit):
        train.parse_args(["--fresh", "--lr-find"])
    assert "--lr-find runs in one process" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_process_run(tiny_demo, tmp_path_factory):
    json_dir, images = tiny_demo
    work = tmp_path_factory.mktemp("two")
    data = ["--data", str(json_dir), "--data-root", str(images)]
    i = TINY.index("--bs")
    flags = TINY[:i] + ["--bs", "4"] + TINY[i + 2:] + ["--seed", str(SEED)]  # per process: 8 pairs per step
    return work, data, flags, run(["--fresh", "--epochs", "3", "--save-every", "1", *flags, *data], work, processes=2)


def test_a_two_process_run_writes_once_and_its_metrics_are_one_process_s(two_process_run, tmp_path):
    work, data, _, p = two_process_run
    out = p.stdout
    assert out.count("Run ") == 1 and "2 processes" in out  # one process prints
    assert "Batch: 8 pairs per optimiser step (2 processes x 4), peak lr 0.001" in out
    models = work / "models"
    names = sorted(f.name for f in models.iterdir())
    assert [n for n in names if not n.startswith("summary.")] == ["ep1.pth", "ep2.pth", "ep3.pth", "maps", "roc.png",
                                                                   "run.json", "test_report.json"]  # no lock, no temporary
    assert ("summary.png" in names) == ("summary.json" in names) and out.count("Pair-map summary") == 1  # the writer's
    assert len(list((work / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per process
    ckpt = load_checkpoint(models / "ep3.pth")
    assert ckpt["plan"]["processes"] == 2 and ckpt["plan"]["bs"] == 8 and ckpt["settings"]["bs"] == 4
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the model's own keys, not DDP's
    # the same weights evaluated by one process: the same report, and the last epoch's gathered valid EER
    model, s, _ = model_from_checkpoint(models / "ep3.pth")
    data_one = prepare_data(s)
    data_one.decode(s.size)
    one = evaluate(model, data_one, tmp_path)
    two = json.loads((models / "test_report.json").read_text())
    for split in ("test", "valid"):
        for k in ("eer", "auc", "eer_threshold"):
            assert two[split][k] == pytest.approx(one[split][k], abs=1e-6), (split, k)
    last = [line for line in out.splitlines() if line.startswith("epoch 3/3")][0]
    assert float(last.split("valid_eer ")[1].split()[0]) == pytest.approx(one["valid"]["eer"], abs=1e-4)


def test_a_stopped_and_resumed_two_process_run_is_the_uninterrupted_one(two_process_run, tmp_path):
    """Bit for bit on the CPU: each process's random draws come from (seed, epoch, process)."""
    work, data, flags, _ = two_process_run
    stop = run(["--fresh", "--epochs", "3", "--save-every", "1", *flags, *data, "--time-limit", "0"], tmp_path,
               processes=2)
    assert "continue with:\n  accelerate launch --multi_gpu --num_processes 2 train.py --resume models/ep1.pth" in stop.stdout
    run(["--resume", "models"], tmp_path, processes=2)
    full, resumed = (load_checkpoint(d / "models" / "ep3.pth") for d in (work, tmp_path))
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    reports = [json.loads((d / "models" / "test_report.json").read_text()) for d in (work, tmp_path)]
    assert reports[0] == reports[1]


def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_steps(two_process_run, tmp_path):
    work, data, _, p = two_process_run
    r = run(["--resume", str(work / "models" / "ep2.pth"), "--out", str(tmp_path / "one"), *data], tmp_path)
    assert "trained by 2 process(es); 1 continue it with the same steps" in r.stdout
    assert "Batch: 8 pairs per optimiser step (2 micro-batches of 4), peak lr 0.001" in r.stdout
    one, two = (load_checkpoint(f / "ep3.pth") for f in (tmp_path / "one", work / "models"))
    assert one["plan"]["processes"] == 1 and one["plan"]["accum"] == 2
    steps = [max(int(s["step"]) for s in c["opt"]["state"] if "step" in s) for c in (one, two)]
    assert steps[0] == steps[1] > 0  # as many optimiser steps as the run would have taken in two processes
    assert 0 < lrs(r.stdout)[3] < lrs(p.stdout)[2]  # the one-cycle schedule continued, not restarted


def test_a_one_process_checkpoint_resumes_in_two_processes(fresh_run, tmp_path):
    work, data, p = fresh_run
    r = run(["--resume", str(work / "models" / "ep5.pth"), "--out", str(tmp_path / "two"), *data], tmp_path,
            processes=2)
    assert "trained by 1 process(es); 2 continue it with the same steps" in r.stdout
    assert "Batch: 8 pairs per optimiser step (2 processes x 4), peak lr 0.001" in r.stdout
    assert [lrs(r.stdout)[e] for e in (6, 7)] == pytest.approx([lrs(p.stdout)[e] for e in (6, 7)], rel=1e-6)
    steps = [max(int(s["step"]) for s in load_checkpoint(f)["opt"]["state"] if "step" in s)
             for f in (tmp_path / "two" / "ep7.pth", work / "models" / "ep7.pth")]
    assert steps[0] == steps[1]
    assert json.loads((tmp_path / "two" / "test_report.json").read_text())["test"]["n_genuine"] > 0
