"""Reading the user's JSON layout, its errors, path resolution, the pair sampler and the loaders."""
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastai.callback.core import Callback
from fastai.torch_core import TensorImage

from helpers import SHARED_JSON, jpeg, tiny_settings, write_layout
from twins.run import build, prepare
from twins.errors import DataError
from twins.data import (PairAugment, load_faces, load_dataset, pair_dataloaders, resolve_path, sample_pairs,
                        split_valid)


@pytest.mark.skipif(not SHARED_JSON.is_dir(), reason="the user's JSON files (../shared/nd_twin_json) are not here")
def test_users_real_layout_parses_validates_and_pairs_triplets(tmp_path):
    for name in SHARED_JSON.iterdir():
        shutil.copy(name, tmp_path / name.name)
    paths = [p for f in ("train", "test")
             for ps in json.loads((tmp_path / f"{f}_dataset_infor.json").read_text()).values() for p in ps]
    # stand-in images at the Kaggle-style paths' tails, under a different root: exercises --data-root
    prefix = Path(paths[0]).parents[2]
    root = tmp_path / "kaggle_input"
    for p in paths:
        dest = root / Path(p).relative_to(prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"")  # existence is what resolution checks; decoding is tested elsewhere
    splits = load_dataset(tmp_path, root)
    tr, te = splits["train"], splits["test"]
    assert (len(tr.ids), len(tr.paths), len(tr.twin_pairs)) == (353, 6182, 178)
    assert (len(te.ids), len(te.paths), len(te.twin_pairs)) == (62, 907, 31)
    assert all(p.is_file() and str(p).startswith(str(root)) for p in tr.paths[:50])
    counts = Counter(tr.person.tolist())
    assert min(counts.values()) == 4 and max(counts.values()) == 68
    # the triplet family: one group of three, each member's impostors from both siblings
    trip = [tr.ids.index(i) for i in ("90360", "90361", "90362")]
    assert sorted(tr.siblings[trip[0]]) == sorted(trip[1:])
    assert sorted(trip) in tr.families()
    assert sum(len(f) == 3 for f in tr.families()) == 1 and len(tr.families()) == 176
    rng = np.random.default_rng(0)
    seen = set()
    anchors = tr.images_of(trip[0])
    for _ in range(60):
        partner, same = sample_pairs(tr, rng)
        seen |= {int(tr.person[partner[a]]) for a in anchors if not same[a]}
    assert seen == set(trip[1:])
    # twins only from the pairs file: 90056 and 90059 style gaps and no id arithmetic
    pairs = json.loads((tmp_path / "train_twin_pairs.json").read_text())
    assert {tuple(sorted((tr.ids[a], tr.ids[b]))) for a, b in tr.twin_pairs} == {tuple(sorted(p)) for p in pairs}


def test_paths_resolve_as_written_under_root_or_by_file_name(tmp_path):
    jpeg(tmp_path / "here.jpg")
    assert resolve_path(str(tmp_path / "here.jpg"), None) == tmp_path / "here.jpg"
    jpeg(tmp_path / "root" / "90003" / "90003d13.jpg")
    foreign = "/home/user/Work/Dataset/ND_TWIN_Dataset_448/90003/90003d13.jpg"
    assert resolve_path(foreign, tmp_path / "root") == tmp_path / "root" / "90003" / "90003d13.jpg"
    jpeg(tmp_path / "flat" / "90003d13.jpg")
    assert resolve_path(foreign, tmp_path / "flat") == tmp_path / "flat" / "90003d13.jpg"  # file-name fallback
    assert resolve_path("90003/90003d13.jpg", tmp_path / "root") == tmp_path / "root" / "90003" / "90003d13.jpg"
    assert resolve_path(foreign, tmp_path / "nowhere") is None


def test_small_layout_loads(small_layout):
    folder, root, tr, te = small_layout
    s = load_dataset(folder, root)
    assert s["train"].ids == ["90003", "90004", "90056", "90059"]
    assert s["train"].twin_pairs == [(0, 1), (2, 3)]
    assert len(s["test"].paths) == 6


@pytest.mark.parametrize("mutate, message", [
    (lambda tr, trp, te, tep: trp.append(["90003", "99999"]), "twin pairs name ids missing from train_dataset_infor.json (1: 99999)"),
    (lambda tr, trp, te, tep: (te.update({"90003": ["x/1.jpg", "x/2.jpg"]}), tep.append(["90003", "91001"])),
     "ids in both train and test (1: 90003)"),
    (lambda tr, trp, te, tep: tr.update({"90004": tr["90004"][:1]}), "fewer than 2 images (1: 90004)"),
    (lambda tr, trp, te, tep: tr["90056"].append(tr["90003"][0]), "listed more than once"),
    (lambda tr, trp, te, tep: trp.pop(), "without a twin in train_twin_pairs.json (2: 90056, 90059)"),
    (lambda tr, trp, te, tep: tep.append(["91001"]), 'test_twin_pairs.json: each entry must be one twin pair of id strings, .*; found \\["91001"\\]'),
    (lambda tr, trp, te, tep: trp.append(["90003", "90004", "90056"]),
     "each entry must be one twin pair .*; found .*; write a triplet as three pairs"),
    (lambda tr, trp, te, tep: trp.append([90003, 90004]), 'one twin pair of id strings, .*; found \\[90003, 90004\\]'),
    (lambda tr, trp, te, tep: trp.clear(), "train_twin_pairs.json: expected a list of two-id lists, .* with at least one pair"),
    (lambda tr, trp, te, tep: te.clear(), "test_dataset_infor.json: expected an object mapping person id -> list of image paths, .* with at least one person"),
    (lambda tr, trp, te, tep: tr.update({"90004": tr["90004"][0]}), "list of image paths, .*; not so for (1: 90004)"),
])
def test_each_validation_error_names_file_and_ids(tmp_path, small_layout, mutate, message):
    _, root, tr, te = small_layout
    tr, te = json.loads(json.dumps(tr)), json.loads(json.dumps(te))
    trp, tep = [["90003", "90004"], ["90056", "90059"]], [["91001", "91002"]]
    mutate(tr, trp, te, tep)
    folder = write_layout(tmp_path / "bad", tr, trp, te, tep)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(folder, root)


def test_malformed_and_missing_files(tmp_path, small_layout):
    folder, root, _, _ = small_layout
    (folder / "train_dataset_infor.json").write_text('{"90003": ["a.jpg",')
    with pytest.raises(DataError, match="train_dataset_infor.json: malformed JSON"):
        load_dataset(folder, root)
    (folder / "train_dataset_infor.json").write_text('["90003"]')
    with pytest.raises(DataError, match="expected an object mapping person id"):
        load_dataset(folder, root)
    (folder / "train_dataset_infor.json").unlink()
    with pytest.raises(DataError, match="train_dataset_infor.json: file not found"):
        load_dataset(folder, root)


def test_missing_images_reported_with_count_and_examples(small_layout):
    folder, root, _, _ = small_layout
    (root / "90004" / "90004d1.jpg").unlink()
    (root / "91002" / "91002d2.jpg").unlink()
    with pytest.raises(DataError, match=r"2 of 18 images not found under --data-root .*90004d1.jpg.*91002d2.jpg"):
        load_dataset(folder, root)
    with pytest.raises(DataError, match="18 of 18 images not found as written; pass --data-root"):
        load_dataset(folder, None)


def test_sampler_each_image_anchors_once_balanced_valid_and_seeded(tiny_demo):
    json_dir, root = tiny_demo
    tr = load_dataset(json_dir, root)["train"]
    n = len(tr.paths)
    p1, s1 = sample_pairs(tr, np.random.default_rng([7, 0]))
    p2, s2 = sample_pairs(tr, np.random.default_rng([7, 0]))
    p3, _ = sample_pairs(tr, np.random.default_rng([7, 1]))
    assert np.array_equal(p1, p2) and np.array_equal(s1, s2)
    assert not np.array_equal(p1, p3)  # redrawn next epoch
    assert len(p1) == n and abs(int(s1.sum()) - n / 2) <= 0.5
    for a in range(n):
        pa, pb = tr.person[a], tr.person[p1[a]]
        if s1[a]:
            assert pa == pb and p1[a] != a
        else:
            assert pb in tr.siblings[pa]


def test_valid_split_holds_out_whole_families(tiny_demo):
    json_dir, root = tiny_demo
    tr = load_dataset(json_dir, root)["train"]
    train, valid = split_valid(tr, 0.25, seed=3)
    assert not set(train.ids) & set(valid.ids)
    assert set(train.ids) | set(valid.ids) == set(tr.ids)
    for split in (train, valid):  # every twin pair stays inside one side
        assert all(split.siblings[p] for p in range(len(split.ids)))
    with pytest.raises(DataError, match="--valid-pct 0.99 leaves no training family"):
        split_valid(tr, 0.99, seed=3)


def test_cache_holds_the_decoded_files_and_batches_are_right(tiny_demo):
    json_dir, root = tiny_demo
    s = load_dataset(json_dir, root)
    tr = s["train"]
    cache = load_faces(tr.paths, 32)
    assert cache.shape == (len(tr.paths), 3, 32, 32) and cache.dtype == torch.uint8
    ref = np.asarray(Image.open(tr.paths[5]).convert("RGB").resize((32, 32), Image.BICUBIC))
    got = cache[5].permute(1, 2, 0).numpy().astype(int)
    # JPEG draft decoding at reduced scale differs from a full decode + resize only by a little
    assert np.abs(got - ref).mean() < 3
    other = np.asarray(Image.open(tr.paths[-1]).convert("RGB").resize((32, 32), Image.BICUBIC))
    assert np.abs(got - other).mean() > 10
    train, valid = split_valid(tr, 0.25, seed=0)
    caches = load_faces(train.paths, 32), load_faces(valid.paths, 32)
    classes = {pid: i for i, pid in enumerate(train.ids)}
    dls = pair_dataloaders(train, valid, *caches, classes, bs=6, size=32, seed=0)
    xa, xb, same, ya, yb = dls.train.one_batch()
    assert xa.shape == xb.shape == (6, 3, 32, 32) and xa.dtype == torch.float32
    assert same.shape == (6,) and set(same.tolist()) <= {0.0, 1.0}
    assert ya.dtype == torch.int64 and ya.min() >= 0 and yb.max() < len(classes)
    assert torch.equal(same.bool(), ya == yb)  # genuine pairs share the id, twin pairs never do
    assert 0 <= xa.min() and xa.max() <= 1 and xa.max() > 0.5  # [0, 1]: the model normalises
    va = list(dls.valid)
    assert sum(len(b[0]) for b in va) == len(valid.paths)  # every validation image anchors once
    assert (torch.cat([b[3] for b in va]) == -1).all()  # validation people are not training classes
    # validation batches are the cached images in order, without augmentation
    first = caches[1][:6].float() / 255
    assert torch.allclose(va[0][0], first, atol=1e-6)


def test_pair_augmentation_draws_each_image_on_its_own_and_never_flips():
    aug = PairAugment(32)
    half = torch.zeros(1, 3, 32, 32)
    half[..., :16] = 1.0  # bright left half: a horizontal flip would put it on the right
    same = half.expand(64, -1, -1, -1).clone()
    xa, xb, *_ = aug((TensorImage(same), TensorImage(same.clone()), torch.zeros(64)), split_idx=0)  # training
    assert (xa - xb).abs().flatten(1).amax(1).gt(0.05).float().mean() > 0.9  # the two images of a pair differ
    for x in (xa, xb):
        assert (x[..., 4:28, 2:12].mean((1, 2, 3)) > x[..., 4:28, 20:30].mean((1, 2, 3))).all()  # left stays left


def test_training_draws_the_pairs_of_each_epoch_from_seed_and_epoch(tiny_demo):
    s = tiny_settings(tiny_demo)
    learn = build(s, prepare(s))
    ds = learn.dls.train.dataset
    seen = {}

    class Record(Callback):
        def before_batch(self):
            if self.training and self.iter == 0:
                seen[self.epoch] = ds.partner.clone()
    learn.fit(3, 1e-3, cbs=Record())
    for epoch, partner in seen.items():
        expected, _ = sample_pairs(ds.split, np.random.default_rng([s.seed, epoch]))
        assert np.array_equal(partner.numpy(), expected), epoch
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_data_root_resolution_prefers_the_longest_existing_tail(tmp_path):
    jpeg(tmp_path / "root" / "90003" / "90003d13.jpg", value=10)
    jpeg(tmp_path / "root" / "90003d13.jpg", value=200)  # another photo with the same file name
    foreign = "/home/user/Work/Dataset/ND_TWIN/90003/90003d13.jpg"
    assert resolve_path(foreign, tmp_path / "root") == tmp_path / "root" / "90003" / "90003d13.jpg"
