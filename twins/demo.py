"""The embedded demo set: generated twin faces in exactly the user's ND-TWIN JSON layout.

Twins share every face parameter (shape, skin, eyes, brows, nose, mouth, hair, background) and differ
only in small skin marks (each sibling has a few of a kind no sibling has, at their own places) and the
slant of one eyebrow. Each photo varies pose, expression, light, blur and JPEG quality. The JSON files
hold absolute paths under a prefix that is not where the images are, so every demo run exercises
`--data-root` resolution like the real data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

FOREIGN_PREFIX = "/home/demo-user/Work/Dataset/ND_TWIN_demo"  # paths "from the machine that wrote the files"
CANVAS = 256  # faces are drawn at this size, then reduced to the photo size: anti-aliased edges
MARK_RADIUS = 0.045  # of the image width: about 6 px at the demo recipe's 64 px
MARKS_PER_PERSON = 4  # all of the person's own kind
MARK_TYPES = ("mole", "freckles", "scar", "birthmark")


def rgb(v) -> tuple:
    return tuple(int(x) for x in v)


def _family(rng: np.random.Generator) -> dict:
    return dict(
        skin=rng.uniform([150, 100, 80], [240, 200, 170]), face_w=rng.uniform(0.58, 0.70),
        face_h=rng.uniform(0.74, 0.86), eye_y=rng.uniform(0.40, 0.46), eye_dx=rng.uniform(0.15, 0.19),
        eye_r=rng.uniform(0.030, 0.042), iris=rng.uniform(20, 140, 3), brow_w=rng.uniform(0.008, 0.016),
        nose_len=rng.uniform(0.10, 0.15), mouth_w=rng.uniform(0.10, 0.16), mouth_y=rng.uniform(0.70, 0.75),
        hair=rng.uniform(10, 120, 3), hair_h=rng.uniform(0.08, 0.16), bg=rng.uniform(60, 200, 3),
    )


def _person_marks(rng: np.random.Generator, taken: list[int]) -> dict:
    """What tells a twin apart: a few small skin marks of a kind no sibling has (moles, freckles,
    scars or pale birthmarks), at person-specific places, and one eyebrow's slant."""
    kind = int(rng.choice([k for k in range(len(MARK_TYPES)) if k not in taken]))
    taken.append(kind)
    angle, radius = rng.uniform(0, 2 * math.pi, MARKS_PER_PERSON), rng.uniform(0.12, 0.26, MARKS_PER_PERSON)
    places = np.stack([0.5 + radius * np.cos(angle), 0.58 + 1.1 * radius * np.sin(angle)], 1)
    return dict(marks=[(MARK_TYPES[kind], p) for p in places], brow_tilt=rng.uniform(-0.03, 0.03))


def _draw_mark(d: ImageDraw.ImageDraw, kind: str, x: float, y: float, skin: np.ndarray):
    r, x, y = MARK_RADIUS * CANVAS, x * CANVAS, y * CANVAS
    if kind == "mole":
        d.ellipse([x - r, y - r, x + r, y + r], fill=(70, 40, 30))
    elif kind == "freckles":
        for dx, dy in ((-1.2, -0.6), (1.0, -0.9), (0.1, 1.1)):
            d.ellipse([x + (dx - 0.45) * r, y + (dy - 0.45) * r, x + (dx + 0.45) * r, y + (dy + 0.45) * r],
                      fill=(150, 90, 50))
    elif kind == "scar":
        d.line([x - 1.6 * r, y + 0.8 * r, x + 1.6 * r, y - 0.8 * r], fill=(200, 90, 100), width=max(1, int(0.6 * r)))
    else:  # birthmark: a pale patch
        d.ellipse([x - 1.4 * r, y - 0.8 * r, x + 1.4 * r, y + 0.8 * r], fill=rgb(np.minimum(255, skin * 0.5 + 128)))


def draw_face(fam: dict, marks: dict, rng: np.random.Generator, size: int) -> Image.Image:
    """One photo of a person: the face, then a random pose, expression, light, blur."""
    c = CANVAS
    img = Image.new("RGB", (c, c), rgb(fam["bg"] + rng.normal(0, 8, 3)))
    d = ImageDraw.Draw(img)
    def px(x, y): return (x * c, y * c)
    fw, fh = fam["face_w"] / 2, fam["face_h"] / 2
    d.ellipse([*px(0.5 - fw - 0.02, 0.5 - fh - fam["hair_h"]), *px(0.5 + fw + 0.02, 0.55)], fill=rgb(fam["hair"]))
    d.ellipse([*px(0.5 - fw, 0.52 - fh), *px(0.5 + fw, 0.52 + fh)], fill=rgb(fam["skin"]))
    ey, dx, er = fam["eye_y"], fam["eye_dx"], fam["eye_r"]
    for side in (-1, 1):
        cx = 0.5 + side * dx
        d.ellipse([*px(cx - 1.8 * er, ey - er), *px(cx + 1.8 * er, ey + er)], fill=(245, 245, 245))
        look = rng.uniform(-0.4, 0.4) * er
        d.ellipse([*px(cx + look - er * 0.8, ey - er * 0.8), *px(cx + look + er * 0.8, ey + er * 0.8)],
                  fill=rgb(fam["iris"]))
        tilt = marks["brow_tilt"] if side == 1 else 0.0
        d.line([px(cx - 2.2 * er, ey - 2.2 * er + tilt), px(cx + 2.2 * er, ey - 2.2 * er - tilt)],
               fill=rgb(fam["hair"] * 0.6), width=max(1, int(fam["brow_w"] * c)))
    d.line([px(0.5, ey + 0.02), px(0.49, ey + fam["nose_len"]), px(0.52, ey + fam["nose_len"])],
           fill=rgb(fam["skin"] * 0.75), width=3)
    smile, mw, my = rng.uniform(-0.02, 0.04), fam["mouth_w"] / 2, fam["mouth_y"]  # expression
    d.line([px(0.5 - mw, my - smile), px(0.5, my + smile * 0.5), px(0.5 + mw, my - smile)], fill=(150, 60, 60), width=4)
    for kind, (mx, my_) in marks["marks"]:
        _draw_mark(d, kind, mx, my_, fam["skin"])
    angle, shift = rng.uniform(-7, 7), rng.uniform(-0.03, 0.03, 2) * c
    img = img.rotate(angle, resample=Image.BICUBIC, translate=tuple(shift), fillcolor=rgb(fam["bg"]))
    zoom = rng.uniform(0.0, 0.06) * c
    img = img.crop((zoom, zoom, c - zoom, c - zoom)).resize((size, size), Image.BICUBIC)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.2))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.15))
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7)))


def _ids(n_families: int, first: int, triplet: bool) -> list[list[str]]:
    """Family id lists like ND-TWIN's: mostly consecutive twins, one gap (twins need not be consecutive
    numbers: 90056/90059 in the real data), optionally one triplet."""
    fams = []
    for f in range(n_families):
        k, step = (3 if triplet and f == 1 else 2), (3 if f == 2 else 1)
        fams.append([str(first + i * step) for i in range(k)])
        first += k * step + 1
    return fams


def make_demo(out: str | Path, n_train_families: int = 60, n_test_families: int = 12,
              images_per_person: tuple[int, int] = (4, 8), size: int = 128, seed: int = 0) -> Path:
    """Write `out/images/<id>/<id>d<k>.jpg` and `out/data_json/*.json`; returns the JSON folder.
    Deterministic in `seed`; skips the work when the set is already there."""
    out = Path(out)
    json_dir = out / "data_json"
    if (json_dir / "test_twin_pairs.json").is_file():  # written last: the set is complete
        return json_dir
    rng = np.random.default_rng(seed)
    json_dir.mkdir(parents=True, exist_ok=True)
    first = 90003
    for split, n_fam in (("train", n_train_families), ("test", n_test_families)):
        info, pairs = {}, []
        for fam_ids in _ids(n_fam, first, triplet=(split == "train")):
            fam, taken = _family(rng), []
            for pid in fam_ids:
                marks = _person_marks(rng, taken)
                (out / "images" / pid).mkdir(parents=True, exist_ok=True)
                info[pid] = []
                for k in range(int(rng.integers(images_per_person[0], images_per_person[1] + 1))):
                    draw_face(fam, marks, rng, size).save(out / "images" / pid / f"{pid}d{13 + 2 * k}.jpg",
                                                         quality=int(rng.integers(85, 96)))
                    info[pid].append(f"{FOREIGN_PREFIX}/{pid}/{pid}d{13 + 2 * k}.jpg")
            pairs += [[a, b] for i, a in enumerate(fam_ids) for b in fam_ids[i + 1:]]
            first = int(fam_ids[-1]) + 1
        first += 1000
        (json_dir / f"{split}_dataset_infor.json").write_text(json.dumps(info, indent=1))
        (json_dir / f"{split}_twin_pairs.json").write_text(json.dumps(pairs))
    return json_dir
