"""One run trained by several processes: two CPU processes talking over gloo stand in for the two GPUs
of a T4 x2 (NCCL there). The user's `python train.py` starts them itself on a machine that reports two
GPUs (tests/fake_gpus.py: the GPU count is all it fakes); `accelerate launch` still works."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from fastai.callback.core import Callback

from helpers import ROOT, TINY, lrs, run, tiny_settings
from twins.plan import Plan
from twins.run import build, evaluate, make_learner, prepare
from twins.checkpoint import load_checkpoint, model_from_checkpoint
from twins.model import DCAL, embed_images
from twins.data import prepare_data, shard
from twins.metrics import protocol_scores, verification_report

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


def loader_batches(learn, epochs=2) -> dict:
    """Each training batch of two epochs: its anchors and the first random draws after it is made."""
    dl, seen = learn.dls.train, {}
    create = dl.create_batch
    for epoch in range(epochs):
        batches = seen[epoch] = []
        def record(b, batches=batches):
            made = create(b)
            batches.append(([int(i) for i in b], torch.rand(3)))
            return made
        dl.create_batch = record
        learn.epoch = epoch
        learn.redraw_pairs.before_train()  # what fastai calls before each training epoch
        assert sum(1 for _ in dl) == len(dl) == len(batches)
    dl.create_batch = create
    return seen


def _worker(rank: int, world: int, port: int, s, folder: str):
    """One of two processes: its training batches (anchors, random draws), its validation figures, the
    validation embeddings; and how often DDP all-reduces in one epoch of two micro-batches per step."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from twins.distributed import start
    start()
    sys.stdout = open(os.devnull, "w")
    data = prepare(s)
    learn = build(s, data)
    assert learn.plan == Plan(learn.plan.run_id, 8, 1, 2)  # 4 pairs each
    seen = loader_batches(learn)
    valid = [float(v) for v in learn.validate()]
    emb = embed_images(learn.model, learn.dls.valid.dataset.cache)
    torch.save({"batches": seen, "valid": valid, "emb": emb, "model": learn.model.state_dict()},
               f"{folder}/rank{rank}.pt")
    accum = make_learner(s, Plan("r", 8, 2, 2), data, DCAL.from_settings(s, len(data.classes)))
    reductions = []
    accum.add_cb(CountReductions(reductions))
    accum.fit(1, 1e-3)
    torch.save({"reductions": reductions, "batches": len(accum.dls.train)}, f"{folder}/accum{rank}.pt")
    torch.distributed.destroy_process_group()


class CountReductions(Callback):
    """Records the micro-batch of each gradient all-reduce DDP makes (a call per bucket), through its
    communication hook."""
    order = 100

    def __init__(self, calls: list):
        self.calls = calls

    def before_train(self):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        def counted(state, bucket):
            self.calls.append(self.iter)  # the micro-batch whose backward pass all-reduces
            return allreduce_hook(state, bucket)
        if not getattr(self, "hooked", False):
            self.model.register_comm_hook(None, counted)
            self.hooked = True


def test_two_processes_share_each_step_as_one_process_with_micro_batches_and_gather_in_image_order(tiny_demo,
                                                                                                  tmp_path):
    s = tiny_settings(tiny_demo, seed=SEED)
    mp.spawn(_worker, args=(2, _free_port(), s, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    data = prepare(s)
    data.decode(s.size)
    one = make_learner(s, Plan("r", 8, 2, 1), data, DCAL.from_settings(s, len(data.classes)))
    one.model.load_state_dict(results[0]["model"])
    single = loader_batches(one)
    n = len(one.dls.train.dataset)
    for epoch in range(2):
        ranks = [r["batches"][epoch] for r in results]
        assert len(ranks[0]) == len(ranks[1]) == len(single[epoch]) // 2 == n // 8
        for k in range(len(ranks[0])):  # step k: process r takes slot r, as one process takes micro-batch r
            for r in range(2):
                anchors, draws = ranks[r][k]
                assert anchors == single[epoch][2 * k + r][0] and torch.equal(draws, single[epoch][2 * k + r][1])
        everyone = [i for r in ranks for a, _ in r for i in a]
        assert len(everyone) == len(set(everyone)) == n - n % 8  # every anchor once; the incomplete step dropped
    assert results[0]["batches"][0][0][0] != results[0]["batches"][1][0][0]  # a new order each epoch
    # validation: 19 images, the last two-process batch padded; gathered, they give one process's figures
    assert len(one.dls.valid.dataset) == 19
    assert results[0]["valid"] == results[1]["valid"]
    assert results[0]["valid"][1:] == pytest.approx([float(v) for v in one.validate()][1:], abs=1e-6)
    assert torch.allclose(results[0]["emb"], embed_images(one.model, one.dls.valid.dataset.cache), atol=1e-5)
    # two micro-batches per step: DDP all-reduces each bucket once per step, not once per micro-batch
    for r in range(2):
        accum = torch.load(tmp_path / f"accum{r}.pt", weights_only=False)
        assert sorted(set(accum["reductions"])) == list(range(1, accum["batches"], 2))  # each step's second alone


@pytest.fixture(scope="module")
def two_process_run(tiny_demo, tmp_path_factory):
    json_dir, images = tiny_demo
    work = tmp_path_factory.mktemp("two")
    data = ["--data", str(json_dir), "--data-root", str(images)]
    flags = [*TINY, "--seed", str(SEED)]  # 8 pairs per step: 4 in each process
    return work, data, flags, run(["--fresh", "--epochs", "3", "--save-every", "1", *flags, *data], work, processes=2)


def test_the_user_s_command_trains_on_both_gpus_writes_once_and_its_metrics_are_one_process_s(two_process_run,
                                                                                                tmp_path):
    work, data, flags, p = two_process_run
    out = p.stdout
    assert out.startswith("2 GPUs: 2 processes of this command, one per GPU")
    assert out.count("Run ") == 1 and "2 processes" in out  # one process prints
    assert "Batch: 8 pairs per optimiser step (2 processes x 4)\n" in out
    models = work / "models"
    names = sorted(f.name for f in models.iterdir())
    assert names == ["ep1.pth", "ep2.pth", "ep3.pth", "maps", "roc.png", "test_report.json"]  # no lock, no temporary
    assert out.count("Test (twins-only") == 1  # the writer's
    assert len(list((work / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per process
    ckpt = load_checkpoint(models / "ep3.pth")
    assert ckpt["plan"]["processes"] == 2 and ckpt["plan"]["bs"] == 8 and ckpt["settings"]["bs"] == 8
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the model's own keys, not DDP's
    # the same weights evaluated by one process: the same report, and the last epoch's gathered valid EER
    model, s, _ = model_from_checkpoint(models / "ep3.pth")
    data_one = prepare_data(s)
    data_one.decode(s.size)
    emb = embed_images(model, data_one.caches["valid"])
    one = evaluate(model, data_one, tmp_path, verification_report(*protocol_scores(
        emb, data_one.valid.person, data_one.valid.twin_pairs)[:2]))
    two = json.loads((models / "test_report.json").read_text())
    for split in ("test", "valid"):
        for k in ("eer", "auc", "eer_threshold"):
            assert two[split][k] == pytest.approx(one[split][k], abs=1e-6), (split, k)
    last = [line for line in out.splitlines() if line.startswith("epoch 3/3")][0]
    assert float(last.split("valid_eer ")[1].split()[0]) == pytest.approx(one["valid"]["eer"], abs=1e-4)
    # one process, the same settings: the same steps at the same learning rate
    single = run(["--fresh", "--epochs", "3", *flags, *data, "--no-wandb"], tmp_path)
    assert "Batch: 8 pairs per optimiser step\n" in single.stdout
    assert lrs(single.stdout) == lrs(out)


def test_a_two_process_run_stopped_and_resumed_in_one_process_is_the_uninterrupted_run(two_process_run, tmp_path):
    """Bit for bit on the CPU (one thread each, as the two processes): each micro-batch's random draws
    come from (seed, epoch, step, slot), and the step's mean gradient is the same sum."""
    work, data, flags, _ = two_process_run
    stop = run(["--fresh", "--epochs", "3", "--save-every", "1", *flags, *data, "--time-limit", "0"], tmp_path,
               processes=2)
    assert "continue with:\n  python train.py --resume models/ep1.pth" in stop.stdout
    r = run(["--resume", "models"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert "trained by 2 process(es); 1 continue it with the same steps" in r.stdout
    assert "Batch: 8 pairs per optimiser step (2 micro-batches of 4)" in r.stdout
    full, resumed = (load_checkpoint(d / "models" / "ep3.pth") for d in (work, tmp_path))
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k
    reports = [json.loads((d / "models" / "test_report.json").read_text()) for d in (work, tmp_path)]
    assert reports[0]["test"] == pytest.approx(reports[1]["test"], abs=1e-6)


def test_a_one_process_checkpoint_resumes_in_two_processes_under_accelerate_launch(fresh_run, tmp_path):
    work, data, p = fresh_run
    r = run(["--resume", str(work / "models" / "ep5.pth"), "--out", str(tmp_path / "two"), *data], tmp_path,
            processes=2, accelerate=True)
    assert "trained by 1 process(es); 2 continue it with the same steps" in r.stdout
    assert "Batch: 8 pairs per optimiser step (2 processes x 4)" in r.stdout
    assert [lrs(r.stdout)[e] for e in (6, 7)] == pytest.approx([lrs(p.stdout)[e] for e in (6, 7)], rel=1e-6)
    steps = [max(int(s["step"]) for s in load_checkpoint(f)["opt"]["state"] if "step" in s)
             for f in (tmp_path / "two" / "ep7.pth", work / "models" / "ep7.pth")]
    assert steps[0] == steps[1]
    assert json.loads((tmp_path / "two" / "test_report.json").read_text())["test"]["n_genuine"] > 0


def test_a_nan_in_one_process_stops_both_at_the_same_step_with_the_main_process_s_message(tiny_demo, tmp_path):
    json_dir, images = tiny_demo
    p = run(["--fresh", "--epochs", "6", "--save-every", "1", *TINY, "--data", str(json_dir), "--data-root",
             str(images)], tmp_path, processes=2, check=False, env={"NAN_FROM_STEP": "8"})  # epoch 2 of process 2
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert "Training stopped: the training loss became nan in process 2 of 2 in epoch 2 (step 2)" in p.stderr
    assert "The last checkpoint, all finite: models/ep1.pth" in p.stderr
    assert p.stderr.count("Training stopped") == 1 and "Traceback" not in p.stderr + p.stdout  # no collective failed
    assert sorted(f.name for f in (tmp_path / "models").glob("ep*.pth")) == ["ep1.pth"]


def test_sigterm_to_the_user_s_command_stops_every_process_with_a_checkpoint_and_the_resume_command(tiny_demo,
                                                                                                   tmp_path):
    json_dir, images = tiny_demo
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_gpus.py"), "--fresh", "--epochs", "300", *TINY,
                          "--data", str(json_dir), "--data-root", str(images)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("epoch 2/300"):
            break
    p.send_signal(signal.SIGTERM)  # to the launching process alone, as a notebook's stop sends it
    rest, _ = p.communicate(timeout=120)
    out = "".join(lines) + rest
    assert p.returncode == 130, out[-3000:]
    assert out.count("Stopped by SIGTERM during epoch") == 1 and "Traceback" not in out
    resume = [line.split("--resume ")[1].strip() for line in out.splitlines() if "python train.py --resume" in line]
    ckpt = load_checkpoint(tmp_path / resume[0])
    assert ckpt["epoch"] >= 2 and ckpt["plan"]["processes"] == 2
    assert not (tmp_path / "models" / ".lock").exists()
