"""The twin data: the four JSON files, path resolution, the RAM image cache, and pair loaders.

Layout (mission.md): `<split>_dataset_infor.json` maps person id -> image paths (absolute paths from
the machine that wrote them); `<split>_twin_pairs.json` lists twin id pairs. Twins come only from
the pairs files; a person may have several siblings (triplets are stored as three pairs).
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.data.transforms import IntToFloatTensor
from fastai.torch_core import TensorImage, set_seed
from fastai.vision.augment import aug_transforms
from fastcore.parallel import parallel
from fasttransform import ItemTransform, Pipeline
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .distributed import rank, world
from .errors import DataError
from .settings import Settings


def _examples(items, n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return f"{len(items)}: {shown}" + (", ..." if len(items) > n else "")


def _refuse(items, what: str, remedy: str = "") -> None:
    """One DataError for every problem of a kind: what is wrong, how many and which, what to do."""
    if items:
        raise DataError(f"{what} ({_examples(sorted(items))})" + (f"; {remedy}" if remedy else ""))


def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected the four files of the ND-TWIN layout in {path.parent})")

    def no_repeats(items: list) -> dict:  # json keeps the last of a repeated key: the other images would vanish
        _refuse({k for k, n in Counter(k for k, _ in items).items() if n > 1}, f"{path}: ids listed more than once "
                "as keys", "merge their image lists")
        return dict(items)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=no_repeats)  # -sig: a BOM is fine
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None


def read_split(json_dir: Path, split: str) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """Read and check one split's info and pairs files: their shape, then what they say."""
    info_path, pairs_path = Path(json_dir) / f"{split}_dataset_infor.json", Path(json_dir) / f"{split}_twin_pairs.json"
    info, pairs = _read_json(info_path), _read_json(pairs_path)
    bad = [k for k, v in info.items() if not (isinstance(v, list) and all(isinstance(p, str) for p in v))
           ] if isinstance(info, dict) else []
    if not (isinstance(info, dict) and info) or bad:
        raise DataError(f'{info_path}: expected an object mapping person id -> list of image paths, e.g. '
                        f'{{"90003": ["/data/90003/90003d13.jpg", ...]}}, with at least one person'
                        + (f"; not so for ({_examples(bad)})" if bad else ""))
    example = '[["90003", "90004"], ...]'
    if not (isinstance(pairs, list) and pairs):
        raise DataError(f"{pairs_path}: expected a list of two-id lists, e.g. {example}, with at least one pair")
    for p in pairs:
        if not (isinstance(p, list) and len(p) == 2 and all(isinstance(i, str) for i in p)):
            hint = "; write a triplet as three pairs, one for each two siblings" if isinstance(p, list) and len(p) == 3 else ""
            raise DataError(f"{pairs_path}: each entry must be one twin pair of id strings, e.g. {example}; found "
                            f"{json.dumps(p)}{hint}")
    _refuse({i for p in pairs for i in p if i not in info}, f"{pairs_path}: twin pairs name ids missing from "
            f"{info_path.name}")
    _refuse([tuple(p) for p in pairs if p[0] == p[1]], f"{pairs_path}: pairs of a person with themself")
    _refuse([k for k, n in Counter(tuple(sorted(p)) for p in pairs).items() if n > 1],  # its impostors would count twice
            f"{pairs_path}: twin pairs listed more than once", "list each once")
    _refuse([k for k, v in info.items() if len(v) < 2], f"{info_path}: people with fewer than 2 images")
    _refuse(set(info) - {i for p in pairs for i in p}, f"{info_path}: people without a twin in {pairs_path.name}",
            "twins-only verification needs every person's twin")
    return info, [tuple(p) for p in pairs]


def resolve_path(path: str, data_root: Path | None) -> Path | None:
    """Where `path` (written on another machine, maybe Windows: `D:\\ND_TWIN\\90003d13.jpg`) lives here:
    as written, else the longest tail of it that exists under `data_root` (so both `<root>/<id>/<file>`
    and a flat `<root>/<file>` work). What exists is returned even if it is no image (a folder, say):
    decoding names that."""
    p = Path(path)
    if p.exists():
        return p
    if data_root is not None:
        parts = [s for s in PureWindowsPath(path).parts if s not in (PureWindowsPath(path).anchor, "")]
        for start in range(len(parts)):
            candidate = data_root.joinpath(*parts[start:])
            if candidate.exists():
                return candidate
    return None


@dataclass
class Split:
    """One split: images (resolved paths), the person index of each, and the twin structure."""
    ids: list[str]                       # person ids, sorted; person index = position here
    paths: list[Path]                    # one per image
    person: np.ndarray                   # person index of each image
    twin_pairs: list[tuple[int, int]]    # person-index pairs, as in the pairs file
    siblings: dict[int, list[int]] = field(init=False)

    def __post_init__(self):
        self.siblings = {i: [] for i in range(len(self.ids))}
        for a, b in self.twin_pairs:
            self.siblings[a].append(b)
            self.siblings[b].append(a)

    def images_of(self, person: int) -> np.ndarray:
        return np.flatnonzero(self.person == person)

    def families(self) -> list[list[int]]:
        """Connected groups of siblings (a triplet family is one group), ordered by their first person."""
        n = len(self.ids)
        a, b = np.array(self.twin_pairs, dtype=np.int64).reshape(-1, 2).T
        _, label = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)
        groups = {}
        for p, g in enumerate(label):
            groups.setdefault(g, []).append(p)
        return list(groups.values())

    def subset(self, people: list[int]) -> "Split":
        """The split restricted to `people` (whole families, so twin pairs stay intact)."""
        keep = sorted(people)
        new_index = {p: i for i, p in enumerate(keep)}
        images = [i for i in range(len(self.paths)) if self.person[i] in new_index]
        return Split(ids=[self.ids[p] for p in keep], paths=[self.paths[i] for i in images],
                     person=np.array([new_index[self.person[i]] for i in images], dtype=np.int64),
                     twin_pairs=[(new_index[a], new_index[b]) for a, b in self.twin_pairs if a in new_index])


def load_dataset(json_dir: str | Path, data_root: str | Path | None = None) -> dict[str, Split]:
    """Parse and validate both splits and find every image on disk; raise DataError on any problem."""
    json_dir = Path(json_dir)
    raw = {s: read_split(json_dir, s) for s in ("train", "test")}
    _refuse(set(raw["train"][0]) & set(raw["test"][0]), f"{json_dir}: ids in both train and test",
            "splits must be disjoint")
    all_paths = [p for info, _ in raw.values() for ps in info.values() for p in ps]
    _refuse([p for p, n in Counter(all_paths).items() if n > 1], f"{json_dir}: image paths listed more than once")
    root = Path(data_root) if data_root is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"--data-root {root}: no such folder")
    resolved = dict(zip(all_paths, parallel(resolve_path, all_paths, data_root=root, n_workers=8, threadpool=True)))
    missing = [p for p, r in resolved.items() if r is None]
    if missing:
        hint = (f"under --data-root {root}" if root is not None
                else "as written; pass --data-root DIR, the folder that holds the images")
        raise DataError(f"{len(missing)} of {len(all_paths)} images not found {hint}. "
                        f"Missing ({_examples(missing, 3)})")
    same_file = {}
    for p, r in resolved.items():
        same_file.setdefault(r.resolve(), []).append(p)
    _refuse([f"{' and '.join(ps)} -> {f}" for f, ps in same_file.items() if len(ps) > 1],  # one photo, two people
            f"{json_dir}: different entries that are the same image file")
    splits = {}
    for name, (info, pairs) in raw.items():
        ids = sorted(info)
        index = {k: i for i, k in enumerate(ids)}
        paths = [resolved[p] for k in ids for p in info[k]]
        person = np.array([index[k] for k in ids for _ in info[k]], dtype=np.int64)
        splits[name] = Split(ids, paths, person, [(index[a], index[b]) for a, b in pairs])
    return splits


def split_valid(train: Split, valid_pct: float, seed: int) -> tuple[Split, Split]:
    """Hold out whole twin families (all images of both twins) for validation: the threshold is chosen
    on them, never on people the model trained on."""
    fams = train.families()
    n_valid = max(1, round(valid_pct * len(fams)))
    if n_valid >= len(fams):
        raise DataError(f"--valid-pct {valid_pct} leaves no training family ({len(fams)} families)")
    order = np.random.default_rng(seed).permutation(len(fams))
    valid_people = [p for f in order[:n_valid] for p in fams[f]]
    train_people = [p for f in order[n_valid:] for p in fams[f]]
    return train.subset(train_people), train.subset(valid_people)


@dataclass
class TwinData:
    """A run's data: the three splits, the training classes, and (after `decode`) the decoded images."""
    train: Split
    valid: Split
    test: Split
    classes: dict[str, int]  # training person id -> class index
    caches: dict[str, torch.Tensor] = field(default_factory=dict)

    def decode(self, size: int) -> None:
        """Decode every image of every split once into the RAM caches (one tensor: every failure in one message)."""
        splits = (self.train, self.valid, self.test)
        cache = load_faces([p for s in splits for p in s.paths], size)
        self.caches = dict(zip(("train", "valid", "test"), cache.split([len(s.paths) for s in splits])))


def prepare_data(s: Settings) -> TwinData:
    """Load and check the run's JSON files, find every image, and hold out the validation families;
    no image is decoded yet (`TwinData.decode`), so checks that need only the ids come first."""
    splits = load_dataset(s.data, s.data_root)
    train, valid = split_valid(splits["train"], s.valid_pct, s.seed)
    parts = {"train": train, "valid": valid, "test": splits["test"]}
    print("Data: " + ", ".join(f"{k} {len(p.ids)} people / {len(p.paths)} images / {len(p.twin_pairs)} twin pairs"
                              for k, p in parts.items()))
    return TwinData(train, valid, splits["test"], {pid: i for i, pid in enumerate(train.ids)})


def to_rgb(im: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB. 16-bit greyscale (PNG, TIFF) is scaled to 8 bits: Pillow's own
    conversion clips it, which turns a face all white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.round(a / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        raise ValueError("a 32-bit float image: save it as 8- or 16-bit")
    return im.convert("RGB")


def load_face(src: str | Path | Image.Image, size: int) -> np.ndarray:
    """One image (a path or a PIL image) as uint8 (3, size, size), the way the cache holds it."""
    im = src if isinstance(src, Image.Image) else Image.open(src)
    if im.format == "JPEG":
        im.draft("RGB", (size, size))  # decode at reduced scale when the file is much larger
    im = ImageOps.exif_transpose(im)  # a photo stored on its side, with an EXIF orientation, upright
    return np.asarray(to_rgb(im).resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)


def load_faces(sources: list, size: int, desc: str = "images") -> torch.Tensor:
    """Every source (path or PIL image) decoded once into a uint8 (n, 3, size, size) tensor: the RAM
    cache, so that epochs do no JPEG work. Filled in place (no second copy), in threads; all failures
    are collected and raised together as one DataError naming each file and what is wrong with it."""
    out = torch.empty((len(sources), 3, size, size), dtype=torch.uint8)
    if len(sources) > 2:
        print(f"Caching {len(sources)} {desc} at {size}x{size}: {out.numel() / 2**30:.2f} GiB in RAM", flush=True)

    def one(i):
        try:
            out[i].numpy()[...] = load_face(sources[i], size)
        except UnidentifiedImageError:
            return f"{sources[i]} (not an image, or an empty file)"
        except Exception as e:  # any decoding failure is the file's (a folder, ...), reported with the others
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            return f"{sources[i]} ({'truncated: an incomplete copy?' if 'truncated' in why.lower() else why})"
    failed = [f for f in parallel(one, range(len(sources)), n_workers=min(8, os.cpu_count() or 1), threadpool=True,
                                  progress=sys.stdout.isatty() and len(sources) > 2) if f]  # a log gets no bar
    if failed:
        raise DataError(f"{len(failed)} of {len(sources)} {desc} cannot be decoded ({_examples(failed, 10)})")
    return out


def sample_pairs(split: Split, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One epoch: every image anchors one pair; half the partners (random half) are another image of
    the same person, the rest an image of one of their twins. Returns (partner, same)."""
    n = len(split.paths)
    same = np.zeros(n, dtype=bool)
    same[rng.permutation(n)[: n // 2 + rng.integers(0, 2) * (n % 2)]] = True
    images = [split.images_of(p) for p in range(len(split.ids))]
    partner = np.empty(n, dtype=np.int64)
    for i in range(n):
        p = split.person[i]
        if same[i]:
            partner[i] = rng.choice(images[p][images[p] != i])
        else:
            partner[i] = rng.choice(images[rng.choice(split.siblings[p])])
    return partner, same


class TwinPairs:
    """Dataset of one epoch of pairs, drawn from (seed, epoch) by `resample(epoch)` (fixed when `fixed`).
    Items: (anchor image, partner image, same, class of anchor, class of partner); class -1 = unseen id."""

    def __init__(self, split: Split, cache: torch.Tensor, classes: dict[str, int], seed: int, fixed: bool):
        self.split, self.cache, self.seed, self.fixed = split, cache, seed, fixed
        self.label = torch.tensor([classes.get(split.ids[p], -1) for p in split.person])
        self.resample(0)

    def resample(self, epoch: int):
        if self.fixed and hasattr(self, "partner"):
            return
        self.epoch = epoch
        partner, same = sample_pairs(self.split, np.random.default_rng([self.seed, epoch]))
        self.partner, self.same = torch.from_numpy(partner), torch.from_numpy(same)

    def __len__(self):
        return len(self.split.paths)

    def __getitem__(self, i):
        return i


def shard(order: list[int], share: int, rank: int, world: int, drop_last: bool) -> list[int]:
    """The part of an epoch's anchor `order` that process `rank` of `world` takes: of each step of `world *
    share` anchors, the rank-th slice of `share`, so a step sees the anchors one process would, and
    gathering in process order gives back `order`. With `drop_last` (training) the incomplete last step
    is dropped (no step straddles two epochs); without (validation) it is split in `world` equal slices,
    padded with repeats of its final anchor: once gathered, the padding comes after every real anchor."""
    step = world * share
    full = len(order) // step * step
    mine = [i for k in range(0, full, step) for i in order[k + rank * share:k + (rank + 1) * share]]
    tail = order[full:]
    if drop_last or not tail:
        return mine
    per = -(-len(tail) // world)
    tail = tail + tail[-1:] * (per * world - len(tail))
    return mine + tail[rank * per:(rank + 1) * per]


class PairDL(DataLoader):
    """A fastai DataLoader over `TwinPairs`: a batch is gathered straight from the RAM cache (no
    per-item work). Shuffled from (seed, epoch), so every process draws the same order without
    communicating; with several processes each takes its `shard` of every step (`accum` batches of
    `bs` pairs each). A training batch's random draws (augmentation, drop-path) come from (seed, epoch,
    step, its slot in the step), so a step trains the same whichever processes and micro-batches share it."""
    n_inp = 2  # the model is called as model(img_a, img_b); the targets are (same, id_a, id_b)

    def __init__(self, *args, accum: int = 1, **kwargs):
        self.accum = accum
        super().__init__(*args, **kwargs)

    def shuffle_fn(self, idxs):
        ds = self.dataset
        return np.random.default_rng([ds.seed, ds.epoch, 1]).permutation(idxs).tolist()

    def get_idxs(self):
        return shard(super().get_idxs(), self.bs * self.accum, rank(), world(), self.drop_last)

    def __len__(self):
        step = world() * self.bs * self.accum
        return self.n // step * self.accum if self.drop_last else -(-self.n // (world() * self.bs))

    def before_iter(self):
        super().before_iter()
        self.batches = 0

    def create_batch(self, b):
        ds = self.dataset
        if self.shuffle:  # training
            step, slot = divmod(self.batches, self.accum)
            seed = np.random.SeedSequence([ds.seed, ds.epoch, step, rank() * self.accum + slot])
            set_seed(int(seed.generate_state(1)[0]))
            self.batches += 1
        a = torch.as_tensor(b)
        p = ds.partner[a]
        return (TensorImage(ds.cache[a]), TensorImage(ds.cache[p]), ds.same[a].float(), ds.label[a], ds.label[p])


class RedrawPairs(Callback):
    """Every epoch's pairs and their order from the seed and fastai's epoch number (the same in every
    process), so that a resumed run trains as the uninterrupted run (the batches' own draws: `PairDL`)."""

    def before_train(self):
        self.dls.train.dataset.resample(self.epoch)


class PairAugment(ItemTransform):
    """Train-time augmentation with independent random draws for the two images of each pair
    (fastai's batch transforms would give both images the same draw). No flips: see PLAN.md."""
    split_idx, order = 0, 20

    def __init__(self, size: int):
        self.tfms = Pipeline(aug_transforms(do_flip=False, max_rotate=8.0, max_zoom=1.1, max_lighting=0.25,
                                            max_warp=0.05, p_affine=0.75, size=size), split_idx=0)

    def encodes(self, b):
        xa, xb, *targets = b
        x = self.tfms(TensorImage(torch.cat([xa, xb])))
        blur = torch.rand(len(x), device=x.device) < 0.2
        if blur.any():  # mild defocus, as in real photos
            x[blur] = TensorImage(torch.nn.functional.avg_pool2d(x[blur], 3, stride=1, padding=1,
                                                                  count_include_pad=False))
        return (x[: len(xa)], x[len(xa):], *targets)


def pair_dataloaders(train: Split, valid: Split, train_cache: torch.Tensor, valid_cache: torch.Tensor,
                     classes: dict[str, int], bs: int, size: int, seed: int, accum: int = 1,
                     device: torch.device | None = None) -> DataLoaders:
    """Training pairs (redrawn each epoch, augmented; `accum` batches of `bs` per step) and fixed
    validation pairs (every validation image anchors once, in image order: the metrics rely on it).
    Images in [0, 1]: the model normalises them."""
    train_dl = PairDL(TwinPairs(train, train_cache, classes, seed, fixed=False), bs=bs, accum=accum, shuffle=True,
                      drop_last=True, after_batch=Pipeline([IntToFloatTensor(), PairAugment(size)], split_idx=0),
                      device=device)
    valid_dl = PairDL(TwinPairs(valid, valid_cache, classes, seed + 1, fixed=True), bs=bs, shuffle=False,
                      after_batch=IntToFloatTensor(), device=device)
    return DataLoaders(train_dl, valid_dl, device=device)
