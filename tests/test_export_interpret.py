"""export.py and interpret.py as the user runs them, on the model trained by the session's train.py run."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
import interpret
from helpers import ROOT, run
from twins.model import embed_images
from twins.data import load_faces, load_dataset
from twins.checkpoint import model_from_checkpoint
from twins.loss import DCALLoss


def checkpoint_scores(work, json_dir, images, n=6):
    """Scores of a few test pairs straight from the checkpoint (no export involved)."""
    model, s, _ = model_from_checkpoint(work / "models" / "ep7.pth")
    test = load_dataset(json_dir, images)["test"]
    paths = [test.paths[i] for i in range(0, 2 * n)]
    emb = embed_images(model, load_faces(paths, s.size))
    return paths, [float(emb[2 * i] @ emb[2 * i + 1]) for i in range(n)], model, s, test


def test_export_then_load_learner_in_a_fresh_process_scores_like_the_checkpoint(fresh_run, tiny_demo):
    work, _, _ = fresh_run
    p = run(["--ckpt", "models/ep7", "--out", "models/twins.pkl"], work, script="export.py")
    assert "Exported models/ep7.pth (run " in p.stdout and ", epoch 7) to models/twins.pkl" in p.stdout
    assert (work / "models" / "twins.pkl").is_file() and not list((work / "models").glob("*.tmp"))
    paths, expected, _, _, _ = checkpoint_scores(work, *tiny_demo)
    code = (
        "import json, sys\n"
        "sys.modules['wandb'] = None  # as if wandb were not installed: inference must not need it\n"
        "from fastai.learner import load_learner\n"
        "from PIL import Image\n"
        "from twins.inference import explain, verify\n"
        "learn = load_learner('models/twins.pkl')\n"
        "paths = json.loads(sys.argv[1])\n"
        "res = [verify(learn, paths[i], paths[i + 1]) for i in range(0, len(paths), 2)]\n"
        "res.append(verify(learn, Image.open(paths[0]), Image.open(paths[1])))\n"
        "why = explain(learn, paths[0], paths[1])\n"
        "assert abs(why['score'] - res[0]['score']) < 1e-5 and tuple(why['map_a'].shape) == (4, 4), why\n"
        "assert why['same'] == res[0]['same'] and tuple(why['map_b'].shape) == (4, 4)\n"
        "assert not {'twins.tracking', 'twins.callbacks', 'fastai.callback.wandb'} & set(sys.modules)\n"
        "print(json.dumps(res))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps([str(p) for p in paths])], cwd=work,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for r, e in zip(res, expected):
        assert abs(r["score"] - e) < 1e-5
        assert r["same"] == (r["score"] >= r["threshold"])
    assert abs(res[-1]["score"] - expected[0]) < 1e-5  # PIL images score like paths
    report = json.loads((work / "models" / "test_report.json").read_text())
    assert res[0]["threshold"] == report["valid"]["eer_threshold"]  # the last epoch's validation chose it


def test_export_writes_beside_its_checkpoint_never_over_another_run_s_learner(fresh_run, tmp_path, monkeypatch):
    work, _, _ = fresh_run
    monkeypatch.chdir(work)
    mine = work / "models" / "twins.pkl"
    before = mine.read_bytes() if mine.exists() else None
    (tmp_path / "other").mkdir()
    shutil.copy(work / "models" / "ep5.pth", tmp_path / "other" / "ep5.pth")  # another run's checkpoint
    export.main(["--ckpt", str(tmp_path / "other" / "ep5")])
    assert (tmp_path / "other" / "twins.pkl").stat().st_size > 0
    assert (mine.read_bytes() if mine.exists() else None) == before


def test_export_of_a_missing_or_foreign_checkpoint_fails_clearly(fresh_run, tmp_path, monkeypatch):
    work, _, _ = fresh_run
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit, match="^Checkpoint error: checkpoint models/ep3.pth does not exist"):
        export.main(["--ckpt", "models/ep3"])
    torch.save({"model": {}, "something": 1}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match="^Checkpoint error: .*other.pth is not a twins checkpoint"):
        export.main(["--ckpt", str(tmp_path / "other.pth")])
    ckpt = torch.load(work / "models" / "ep7.pth", weights_only=True)
    for older in ({k: v for k, v in ckpt.items() if k != "format"}, {**ckpt, "format": ckpt["format"] - 1},
                  {"config": {}, "model": ckpt["model"]}):  # a checkpoint of an earlier twins, or of the first one
        torch.save(older, tmp_path / "older.pth")
        with pytest.raises(SystemExit, match=r"^Checkpoint error: .*older.pth was written by an earlier version of "
                                             r"twins, which this one cannot resume or export"):
            export.main(["--ckpt", str(tmp_path / "older.pth")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^Checkpoint error: no checkpoint ep<N>.pth in models/"):
        export.main([])


def test_interpret_lists_the_true_top_losses_and_draws_them(fresh_run, tiny_demo):
    work, _, _ = fresh_run
    run(["--ckpt", "models/ep7", "-k", "3", "--out", "interp"], work, script="interpret.py")
    for name in ("top_impostor.png", "top_genuine.png"):
        assert (work / "interp" / name).stat().st_size > 5000, name
    listing = json.loads((work / "interp" / "top_losses.json").read_text())
    _, _, model, s, test = checkpoint_scores(work, *tiny_demo)
    # independently: every twin-impostor pair through the model's own forward and the loss, reduction='none'
    cache = load_faces(test.paths, s.size)
    norm = lambda x: x.float() / 255  # the model normalises
    imp = [(a, b) for p_, q in test.twin_pairs for a in test.images_of(p_) for b in test.images_of(q)]
    ia, ib = torch.tensor([a for a, _ in imp]), torch.tensor([b for _, b in imp])
    with torch.no_grad():
        out = model.eval()(norm(cache[ia]), norm(cache[ib]))
        unknown = torch.full((len(imp),), -1)
        losses = DCALLoss(reduction="none")(out, torch.zeros(len(imp)), unknown, unknown).numpy()
        scores = (out["emb_a"] * out["emb_b"]).sum(-1).numpy()
    top = np.argsort(-losses, kind="stable")[:3]
    expected = [(str(test.paths[imp[i][0]]), str(test.paths[imp[i][1]])) for i in top]
    got = [(r["image_a"], r["image_b"]) for r in listing["impostor"]]
    assert got == expected
    assert np.allclose([r["score"] for r in listing["impostor"]], scores[top], atol=1e-5)
    assert np.allclose([r["loss"] for r in listing["impostor"]], losses[top], atol=1e-4)
    # the worst impostors are the ones scored most alike
    assert min(r["score"] for r in listing["impostor"]) >= np.sort(scores)[-10]


def test_interpret_one_given_pair(fresh_run, tiny_demo):
    work, _, _ = fresh_run
    paths, expected, _, _, _ = checkpoint_scores(work, *tiny_demo, n=1)
    p = run(["--ckpt", "models/ep7", "--pair", str(paths[0]), str(paths[1]), "--out", "one"], work,
            script="interpret.py")
    assert f"cos {expected[0]:.4f}" in p.stdout
    assert (work / "one" / "pair.png").stat().st_size > 5000


def test_interpret_errors_are_one_line_messages(fresh_run, tiny_demo, tmp_path, monkeypatch):
    work, _, _ = fresh_run
    _, images = tiny_demo
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit, match=r"^Data error: 1 of 2 images cannot be decoded \(1: nope.jpg \(No such file or directory\)\)"):
        interpret.main(["--ckpt", "models/ep7", "--pair", "nope.jpg", str(next(images.rglob("*.jpg")))])
    moved = tmp_path / "moved"  # the images are no longer where training found them
    moved.mkdir()
    with pytest.raises(SystemExit, match=f"^Data error: .*images not found under --data-root {moved}"):
        interpret.main(["--ckpt", "models/ep7", "--data-root", str(moved)])
