"""Nothing silently wrong: data read exactly as written, numbers that make no sense refused before any
work, a diverging run stopped with its last finite checkpoint, a full disk or an unwritable --out said
in one line (issue 23). Real files, real train.py / export.py / interpret.py calls."""
import errno
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import export
import interpret
import train
from helpers import TINY, jpeg, run, write_layout
from twins.checkpoint import checkpoint_epoch, load_checkpoint, newest_checkpoint
from twins.data import load_dataset, load_face
from twins.errors import DataError, TwinsError
from twins.model import DCAL
from twins.tracking import wandb_mode


def test_json_is_read_as_written_or_refused(small_layout):
    folder, root, tr, te = small_layout
    info = folder / "train_dataset_infor.json"
    first = json.dumps(tr["90003"][:1])
    info.write_text(info.read_text()[:-1] + f', "90003": {first}}}')  # the id again: json would keep only this list
    with pytest.raises(DataError, match=r"train_dataset_infor.json: ids listed more than once as keys \(1: 90003\)"):
        load_dataset(folder, root)
    write_layout(folder, tr, [["90003", "90004"], ["90056", "90059"], ["90004", "90003"]], te, [["91001", "91002"]])
    with pytest.raises(DataError, match=r"train_twin_pairs.json: twin pairs listed more than once \(1: \('90003', "
                                        r"'90004'\)\)"):
        load_dataset(folder, root)


def test_two_entries_that_are_one_file_are_refused(small_layout):
    folder, root, tr, te = small_layout
    elsewhere = tr["90003"][0].replace("/home/someone/Work/Dataset/ND_TWIN", "/mnt/copy/ND_TWIN")
    tr["90004"][0] = elsewhere  # another person's entry, written differently, resolves to 90003's photo
    write_layout(folder, tr, [["90003", "90004"], ["90056", "90059"]], te, [["91001", "91002"]])
    with pytest.raises(DataError, match=r"different entries that are the same image file .*90003d0.jpg and "
                                        r"/mnt/copy/ND_TWIN/90003/90003d0.jpg"):
        load_dataset(folder, root)


def test_a_photo_stored_on_its_side_is_used_upright(tmp_path):
    face = np.zeros((40, 60, 3), np.uint8)
    face[:, :20] = 255
    sideways = Image.fromarray(face)
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    sideways.save(tmp_path / "side.jpg", exif=exif)
    Image.fromarray(face).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "up.jpg")
    up = load_face(tmp_path / "up.jpg", 32).astype(int)
    assert np.abs(load_face(tmp_path / "side.jpg", 32) - up).mean() < 2
    assert np.abs(load_face(Image.open(tmp_path / "side.jpg"), 32) - up).mean() < 2  # verify()'s PIL input too
    assert np.abs(load_face(Image.fromarray(face), 32) - up).mean() > 40  # as stored, it would differ


@pytest.mark.parametrize("flag, value, says", [
    ("--epochs", "0", "a whole number of at least 1"), ("--epochs", "-1", "a whole number of at least 1"),
    ("--lr", "-1e-3", "a learning rate above 0"), ("--lr", "0", "a learning rate above 0"),
    ("--top-r", "0", "a share above 0, at most 1"), ("--top-r", "1.5", "a share above 0, at most 1"),
    ("--save-every", "0", "at least 1"), ("--map-every", "0", "at least 1"), ("--size", "0", "at least 1"),
    ("--drop-path", "1.5", "a share from 0 to below 1"), ("--valid-pct", "1", "a share above 0 and below 1"), ("--valid-pct", "0", "a share above 0 and below 1"),
    ("--wd", "-0.1", "a weight decay of at least 0"), ("--bs", "0", "at least 1"),
    ("--time-limit", "-2", "hours, at least 0"), ("--epochs", "many", "a whole number"),
])
def test_numbers_that_make_no_sense_are_refused_at_parse_time(flag, value, says, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--fresh", f"{flag}={value}"])  # "--lr -1" alone: argparse takes -1 for a flag
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"argument {flag}: expected" in err and says in err and repr(value) in err


def test_numbers_that_depend_on_the_model_or_the_data_are_refused_before_decoding(tiny_demo, tmp_path, monkeypatch,
                                                                                  capsys):
    json_dir, images = tiny_demo
    monkeypatch.chdir(tmp_path)
    data = ["--data", str(json_dir), "--data-root", str(images), "--no-wandb"]
    with pytest.raises(SystemExit, match=r"^Error: --size 30 is not a multiple of the patch size 8 of test_vit: "
                                         r"take --size 24 or 32"):
        train.main(["--fresh", *TINY, "--size", "30", *data])
    with pytest.raises(SystemExit, match=r"^Data error: --bs 500: more pairs per step than the \d+ training images"):
        train.main(["--fresh", *TINY, "--bs", "500", *data])
    assert "Caching" not in capsys.readouterr().out and not (tmp_path / "models").exists()
    with pytest.raises(SystemExit):
        interpret.main(["-k", "0"])


def test_a_diverging_run_stops_with_its_last_finite_checkpoint_and_export_refuses_a_nan_one(tiny_demo, tmp_path,
                                                                                           monkeypatch):
    json_dir, images = tiny_demo
    monkeypatch.chdir(tmp_path)
    args = ["--fresh", "--epochs", "4", "--save-every", "1", *TINY, "--lr", "50", "--data", str(json_dir),
            "--data-root", str(images), "--no-wandb"]
    with pytest.raises(SystemExit, match=r"^Training stopped: the training loss became nan in epoch (\d) \(step \d+\): "
                                         r"the learning rate is too high for this run\. Start a fresh run with a "
                                         r"lower --lr \(this run's: 50\)\. (The last checkpoint, all finite: "
                                         r"models/ep\d\.pth|No epoch was saved)$") as stop:
        train.main(args)
    saved = sorted((tmp_path / "models").glob("ep*.pth"))
    assert not (tmp_path / "models" / "test_report.json").exists()
    assert [p.name for p in saved] == [f"ep{e}.pth" for e in range(1, len(saved) + 1)]
    for p in saved:
        load_checkpoint(p)  # every one finite: it loads
    if saved:
        assert f"models/{saved[-1].name}" in str(stop.value)
        ckpt = torch.load(saved[-1], weights_only=False)
        ckpt["model"]["sa_head.weight"][0, 0] = float("nan")
        torch.save(ckpt, tmp_path / "models" / "ep9.pth")
        with pytest.raises(SystemExit, match=r"^Checkpoint error: models/ep9.pth holds NaN or infinite weights"):
            export.main(["--ckpt", "models/ep9"])


def test_only_exact_epoch_names_are_checkpoints(fresh_run, tmp_path):
    work, _, _ = fresh_run
    shutil.copy(work / "models" / "ep5.pth", tmp_path / "ep2.pth")
    shutil.copy(work / "models" / "ep7.pth", tmp_path / "ep2_backup1.pth")  # not epoch 21
    assert checkpoint_epoch(tmp_path / "ep2_backup1.pth") is None and checkpoint_epoch(tmp_path / "ep12.pth") == 12
    assert newest_checkpoint(tmp_path) == tmp_path / "ep2.pth"


def test_interpret_refuses_data_that_no_longer_holds_the_run_s_training_ids(fresh_run, tmp_path, monkeypatch):
    work, _, _ = fresh_run
    json_dir = tmp_path / "edited"
    shutil.copytree(load_checkpoint(work / "models" / "ep7")["settings"]["data"], json_dir)
    info, pairs = (json.loads((json_dir / f"train_{n}.json").read_text()) for n in ("dataset_infor", "twin_pairs"))
    gone = pairs.pop(0)  # one family removed since training
    for pid in gone:
        info.pop(pid)
    (json_dir / "train_dataset_infor.json").write_text(json.dumps(info))
    (json_dir / "train_twin_pairs.json").write_text(json.dumps(pairs))
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit, match=r"^Checkpoint error: this model was trained on other training ids than this "
                                         r"data gives"):
        interpret.main(["--ckpt", "models/ep7", "--split", "valid", "--data", str(json_dir), "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.png"))


def test_an_out_that_cannot_hold_a_run_is_one_line(fresh_run, tmp_path, monkeypatch):
    _, data, _ = fresh_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"^Checkpoint error: --out afile/ cannot be written \(File exists\): pass another --out"):
        train.main(["--fresh", *TINY, *data, "--no-wandb", "--out", "afile"])
    with pytest.raises(SystemExit, match=r"^Checkpoint error: --out afile/sub/ cannot be written \(Not a directory\)"):
        train.main(["--fresh", *TINY, *data, "--no-wandb", "--out", "afile/sub"])


def test_a_full_disk_stops_the_run_naming_the_last_checkpoint_written(fresh_run, tmp_path, monkeypatch):
    import twins.callbacks
    _, data, _ = fresh_run
    monkeypatch.chdir(tmp_path)
    write = twins.callbacks.write_atomic

    def full_after_the_first(path, blob):
        if path.name != "ep1.pth":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, blob)
    monkeypatch.setattr(twins.callbacks, "write_atomic", full_after_the_first)
    with pytest.raises(SystemExit, match=r"^Checkpoint error: models/ep2.pth could not be written \(No space left on "
                                         r"device\): free space on the disk, or pass another --out\. The last "
                                         r"checkpoint written: models/ep1.pth; continue with:\n  python train.py "
                                         r"--resume models/ep1.pth$"):
        train.main(["--fresh", "--epochs", "4", "--save-every", "1", *TINY, *data, "--no-wandb"])
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["ep1.pth"]  # no lock, no partial file


def test_messages_say_what_is_there_and_what_to_do(fresh_run, tmp_path, monkeypatch):
    work, data, _ = fresh_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copy(work / "models" / "roc.png", tmp_path / "models")  # another run's report, without checkpoints
    with pytest.raises(SystemExit, match=r"holds another run \(roc.png\); .* or delete it first \(rm -r models\)$"):
        train.main(["--fresh", *TINY, *data, "--no-wandb"])
    with pytest.raises(SystemExit, match=r"^Checkpoint error: folder nomodels/ or checkpoint nomodels.pth does not exist"):
        train.main(["--resume", "nomodels"])
    jpeg(tmp_path / "a.jpg")
    with pytest.raises(SystemExit, match=r"^Data error: 1 of 2 images cannot be decoded \(1: pics \(Is a directory\)\)"):
        (tmp_path / "pics").mkdir()
        interpret.main(["--ckpt", str(work / "models" / "ep7"), "--pair", "pics", "a.jpg", *data])


def test_wandb_asked_online_without_a_network_logs_offline_at_once(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    assert wandb_mode() == ("offline", "WANDB_MODE=online is set but http://127.0.0.1:9 cannot be reached (no network?)")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == ("disabled", "WANDB_MODE=disabled")


def test_a_model_refuses_an_input_size_its_patches_do_not_tile():
    with pytest.raises(TwinsError, match="--size 36 is not a multiple of the patch size 8 of test_vit"):
        DCAL("test_vit", 5, 36, pretrained=False, patch_size=8)


class Payload:
    def __reduce__(self):  # what a malicious pickle does: call something when loaded
        return (print, ("this ran",))


def test_a_checkpoint_holds_only_tensors_and_plain_values_and_one_with_an_object_is_refused(fresh_run, tmp_path,
                                                                                            capsys):
    work, _, _ = fresh_run
    ckpt = torch.load(work / "models" / "ep7.pth", weights_only=True)  # torch's safe loader takes ours
    assert ckpt["epoch"] == 7 and isinstance(ckpt["opt"]["hypers"][0]["lr"], float)
    torch.save({**ckpt, "extra": Payload()}, tmp_path / "ep7.pth")
    with pytest.raises(SystemExit, match=r"^Checkpoint error: checkpoint .*ep7.pth cannot be read \(it holds an object, print, "
                                         r"whose loading could run code\)$"):
        export.main(["--ckpt", str(tmp_path / "ep7.pth"), "--out", str(tmp_path / "t.pkl")])
    assert "this ran" not in capsys.readouterr().out


def test_a_timm_that_cannot_use_the_hub_package_says_so_not_bad_arch(monkeypatch):
    import timm

    def old_timm(*args, **kwargs):  # timm < 1.0.21 with huggingface_hub >= 1 raises exactly this
        raise RuntimeError("Hugging Face hub model specified but package not installed. Run `pip install huggingface_hub`.")
    monkeypatch.setattr(timm, "create_model", old_timm)
    with pytest.raises(TwinsError, match=r"cannot use this huggingface_hub to fetch the weights of vit_small_patch16_224: "
                                         r"pip install -U 'timm>=1.0.21'"):
        DCAL("vit_small_patch16_224", 5, 224)


def test_a_resume_into_another_folder_continues_the_run_and_its_wandb_run(fresh_run, tmp_path):
    """The next Kaggle session resumes from the attached (read-only) output into a new --out: one run."""
    work, data, _ = fresh_run
    run_id = load_checkpoint(work / "models" / "ep5")["plan"]["run_id"]
    p = run(["--resume", str(work / "models" / "ep5.pth"), "--out", "next_session", *data], tmp_path)
    assert f"Run {run_id} in next_session/" in p.stdout
    ckpt = load_checkpoint(tmp_path / "next_session" / "ep7")
    first = load_checkpoint(work / "models" / "ep5")
    assert ckpt["plan"]["run_id"] == run_id and ckpt["wandb_id"] == first["wandb_id"] is not None


def test_export_to_a_folder_or_an_unwritable_place_is_one_line(fresh_run, tmp_path, monkeypatch):
    work, _, _ = fresh_run
    monkeypatch.chdir(work)
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(SystemExit, match=rf"^Checkpoint error: --out {tmp_path} is a folder: name the file, e\.g\. "
                                         rf"--out {tmp_path}/twins.pkl$"):
        export.main(["--ckpt", "models/ep7", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^Checkpoint error: --out .*afile/t.pkl cannot be written \(.*\): pass another"):
        export.main(["--ckpt", "models/ep7", "--out", str(tmp_path / "afile" / "t.pkl")])
