"""Do the heatmaps look at what tells the twins apart? (run by hand after `python train.py --fresh --demo`)

On the demo set the marks that separate twins are known (demo/marks.json). For every image of a
correctly rejected twin-impostor test pair, this measures how often the rollout maximum falls on a
mark, and what share of the GLCA-selected patches cover marks, against the share expected by chance
(the share of patches that cover marks).

    python -m scripts.heatmap_marks [--ckpt models/ep30] [--demo demo]
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from twins.checkpoint import model_from_checkpoint, newest_checkpoint
from twins.data import build_cache
from twins.evaluate import encode_all
from twins.inference import load_split, validation_threshold
from twins.metrics import protocol_scores


def mark_patches(places, radius: float, gh: int, gw: int) -> np.ndarray:
    """(gh*gw,) bool: patches whose centre lies within two mark radii of a mark."""
    cy, cx = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
    hit = np.zeros((gh, gw), bool)
    for x, y in places:
        hit |= np.hypot(cx - x, cy - y) < 2 * radius
    return hit.ravel()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt")
    p.add_argument("--demo", default="demo")
    args = p.parse_args()
    model, cfg, _ = model_from_checkpoint(args.ckpt or newest_checkpoint("models"))
    if not model.use_glca:
        raise SystemExit("this model has no GLCA branch (trained with --no-glca)")
    marks = json.loads((Path(args.demo) / "marks.json").read_text())
    threshold, _ = validation_threshold(model, cfg)
    test = load_split(cfg, "test")
    enc = encode_all(model, build_cache(test.paths, cfg["size"], "test images"))
    emb = model.embedding(enc)
    scores, genuine, pairs = protocol_scores(emb, test.person, test.twin_pairs)
    rejected = pairs[(~genuine) & (scores < threshold)]
    images = np.unique(rejected)
    gh, gw = model.vit.patch_embed.grid_size
    argmax_hits, token_share, chance = [], [], []
    for i in images:
        key = f"{test.ids[test.person[i]]}/{test.paths[i].name}"
        on_mark = mark_patches(marks["marks"][key], marks["mark_radius"], gh, gw)
        argmax_hits.append(on_mark[int(enc["rollout"][i].argmax())])
        token_share.append(on_mark[enc["selected"][i].numpy()].mean())
        chance.append(on_mark.mean())
    print(f"{len(rejected)} of {int((~genuine).sum())} twin-impostor test pairs correctly rejected "
          f"(threshold {threshold:.3f}); {len(images)} images")
    print(f"rollout maximum on a mark: {100 * np.mean(argmax_hits):.1f}%   "
          f"GLCA-selected patches on marks: {100 * np.mean(token_share):.1f}%   "
          f"chance (patches on marks): {100 * np.mean(chance):.1f}%")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
