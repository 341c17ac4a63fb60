"""Do the heatmaps look at what tells the twins apart? (run by hand after `python train.py --fresh --demo`)

On the demo set the marks are known (demo/marks.json): twins have marks of different kinds at
different places, two photos of one person share theirs. Over the demo's test pairs this measures
- correctly rejected twin pairs, each image: does the top window of the dissimilarity map (what made
  the faces differ, twins/explain.py) cover one of its marks? And, as before, the rollout maximum,
  and the share of GLCA-selected patches on marks;
- correctly accepted genuine pairs, each image: does the top window of the similarity map cover one of
  its (shared) marks?
against chance (the share of windows, or patches, that cover a mark).

    python -m scripts.heatmap_marks [--ckpt models/ep30] [--demo demo]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from twins.checkpoint import model_from_checkpoint, newest_checkpoint
from twins.data import build_cache
from twins.explain import pair_maps, window_size, windows
from twins.inference import load_split, validation_threshold
from twins.metrics import protocol_scores
from twins.model import encode_all


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
    model, s, _ = model_from_checkpoint(args.ckpt or newest_checkpoint("models"))
    if not model.use_glca:
        raise SystemExit("this model has no GLCA branch (trained with --no-glca)")
    marks = json.loads((Path(args.demo) / "marks.json").read_text())
    threshold, _ = validation_threshold(model, s)
    test = load_split(s, "test")
    cache = build_cache(test.paths, s.size, "test images")
    enc = encode_all(model, cache)
    emb = model.embedding(enc)
    scores, genuine, pairs = protocol_scores(emb, test.person, test.twin_pairs)
    gh, gw = model.vit.patch_embed.grid_size
    wins = windows(model)

    def marked(i: int):
        """Patches and windows of image i that cover one of its marks."""
        key = f"{test.ids[test.person[i]]}/{test.paths[i].name}"
        on_patch = mark_patches(marks["marks"][key], marks["mark_radius"], gh, gw)
        return on_patch, np.array([on_patch[w.numpy()].any() for w in wins])

    rejected = pairs[(~genuine) & (scores < threshold)]
    accepted = pairs[genuine & (scores >= threshold)]
    rows = {}
    t = time.time()
    maps = {}
    for chosen in (rejected, accepted):
        for a, b in chosen:
            maps[a, b] = pair_maps(model, cache[[a, b]])[1:]
    for name, chosen, sign in (("dissimilarity map, rejected twin pairs", rejected, 1.0),
                               ("similarity map, accepted genuine pairs", accepted, -1.0)):
        hits, chance = [], []
        for a, b in chosen:
            for i, delta in ((a, maps[a, b][0]), (b, maps[a, b][1])):
                on_window = marked(i)[1]
                hits.append(on_window[int((sign * delta).flatten().argmax())])
                chance.append(on_window.mean())
        rows[name] = (len(chosen), 100 * np.mean(hits), 100 * np.mean(chance))
    per_pair = (time.time() - t) / max(1, len(rejected) + len(accepted))
    images = np.unique(rejected)
    argmax_hits, token_share, chance = [], [], []
    for i in images:
        on_patch = marked(i)[0]
        argmax_hits.append(on_patch[int(enc["rollout"][i].argmax())])
        token_share.append(on_patch[enc["selected"][i].numpy()].mean())
        chance.append(on_patch.mean())
    print(f"{len(rejected)} of {int((~genuine).sum())} twin-impostor and {len(accepted)} of {int(genuine.sum())} "
          f"genuine test pairs decided right (threshold {threshold:.3f}); windows of {window_size(model)}x"
          f"{window_size(model)} patches; pair maps {1000 * per_pair:.0f} ms per pair")
    print("| map | images | top region on a mark | chance |")
    print("|---|---|---|---|")
    for name, (n, hit, ch) in rows.items():
        print(f"| {name} | {2 * n} | {hit:.1f}% | {ch:.1f}% |")
    print(f"| rollout maximum, rejected twin pairs | {len(images)} | {100 * np.mean(argmax_hits):.1f}% | "
          f"{100 * np.mean(chance):.1f}% |")
    print(f"| GLCA-selected patches (share on marks), rejected twin pairs | {len(images)} | "
          f"{100 * np.mean(token_share):.1f}% | {100 * np.mean(chance):.1f}% |")

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
