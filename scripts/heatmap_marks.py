"""Do the heatmaps look at what tells the twins apart? (run by hand after `python train.py --fresh --demo`)

On the demo set every difference between twins is known (demo/marks.json): marks of different kinds at
different places, and the slant of one eyebrow; two photos of one person share theirs. Over the demo's
test pairs this measures, against two ground truths (the marks alone; every difference: marks or the
slanted brow)
- correctly rejected twin pairs, each image: does the top window of the dissimilarity map (what made
  the faces differ, twins/explain.py) cover a difference? And the rollout maximum, and the share of
  GLCA-selected patches on differences;
- correctly accepted genuine pairs, each image: does the top window of the similarity map cover one?
- the summary (`interpret.py --summary`'s averaging, every rejected twin pair): the share of each pair's
  dissimilarity map on the windows that cover a difference of either face, averaged over the pairs;
against chance (the share of windows, or patches, that cover one: what a uniform map would score).

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
from twins.explain import pair_maps, pair_share, window_size, window_words, windows
from twins.inference import load_split, validation_threshold
from twins.metrics import protocol_scores
from twins.model import encode_all


def near(places, segments, radius: float, gh: int, gw: int) -> np.ndarray:
    """(gh*gw,) bool: patches whose centre lies within two mark radii of a mark or of a segment."""
    cy, cx = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
    hit = np.zeros((gh, gw), bool)
    for x, y in places:
        hit |= np.hypot(cx - x, cy - y) < 2 * radius
    for (x0, y0), (x1, y1) in segments:
        t = np.clip(((cx - x0) * (x1 - x0) + (cy - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        hit |= np.hypot(cx - x0 - t * (x1 - x0), cy - y0 - t * (y1 - y0)) < 2 * radius
    return hit.ravel()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt")
    p.add_argument("--demo", default="demo")
    args = p.parse_args()
    model, s, ckpt = model_from_checkpoint(args.ckpt or newest_checkpoint("models"))
    if not model.use_glca:
        raise SystemExit("this model has no GLCA branch (trained with --no-glca)")
    truth = json.loads((Path(args.demo) / "marks.json").read_text())
    if "brows" not in truth:
        raise SystemExit(f"{args.demo}/marks.json records no brows (written before they were): delete {args.demo}/ "
                         "and generate it again (python train.py --fresh --demo; the images come out the same)")
    threshold, _ = validation_threshold(model, s, ckpt["classes"])
    test = load_split(s, "test", ckpt["classes"])
    cache = build_cache(test.paths, s.size, "test images")
    enc = encode_all(model, cache)
    scores, genuine, pairs = protocol_scores(model.embedding(enc), test.person, test.twin_pairs)
    gh, gw = model.vit.patch_embed.grid_size
    wins = windows(model)
    truths = ("marks", "marks or brow")

    def differences(i: int) -> dict:
        """Per ground truth: (patches, windows) of image i that cover a difference."""
        key = f"{test.ids[test.person[i]]}/{test.paths[i].name}"
        out = {}
        for name, segments in zip(truths, ([], [truth["brows"][key]])):
            on_patch = near(truth["marks"][key], segments, truth["mark_radius"], gh, gw)
            out[name] = on_patch, np.array([on_patch[w.numpy()].any() for w in wins])
        return out

    rejected = pairs[(~genuine) & (scores < threshold)]
    accepted = pairs[genuine & (scores >= threshold)]
    t = time.time()
    maps = {(a, b): pair_maps(model, cache[[a, b]])[1:] for chosen in (rejected, accepted) for a, b in chosen}
    per_pair = (time.time() - t) / max(1, len(maps))
    rows = []
    for name, chosen, sign in (("dissimilarity map, rejected twin pairs", rejected, 1.0),
                               ("similarity map, accepted genuine pairs", accepted, -1.0)):
        hits, chance = {k: [] for k in truths}, {k: [] for k in truths}
        for a, b in chosen:
            for i, delta in ((a, maps[a, b][0]), (b, maps[a, b][1])):
                for k, (_, on_window) in differences(i).items():
                    hits[k].append(on_window[int((sign * delta).flatten().argmax())])
                    chance[k].append(on_window.mean())
        rows.append((f"top window, {name}", 2 * len(chosen), hits, chance))
    shares, chance = {k: [] for k in truths}, {k: [] for k in truths}
    summed = 0
    for a, b in rejected:
        share = pair_share(*maps[a, b], 1.0)
        if share is None:
            continue
        summed = summed + share
        da, db = differences(a), differences(b)
        for k in truths:
            either = da[k][1] | db[k][1]
            shares[k].append(float(share.flatten()[torch.from_numpy(either)].sum()))
            chance[k].append(either.mean())
    rows.append(("summary: dissimilarity share on either face's differences, rejected twin pairs",
                 len(shares[truths[0]]), shares, chance))
    images = np.unique(rejected)
    for what in ("rollout maximum", "GLCA-selected patches (share on differences)"):
        hits, chance = {k: [] for k in truths}, {k: [] for k in truths}
        for i in images:
            for k, (on_patch, _) in differences(i).items():
                hits[k].append(on_patch[int(enc["rollout"][i].argmax())] if what.startswith("rollout")
                               else on_patch[enc["selected"][i].numpy()].mean())
                chance[k].append(on_patch.mean())
        rows.append((f"{what}, rejected twin pairs", len(images), hits, chance))
    print(f"{len(rejected)} of {int((~genuine).sum())} twin-impostor and {len(accepted)} of {int(genuine.sum())} "
          f"genuine test pairs decided right (threshold {threshold:.3f}); windows of {window_size(model)}x"
          f"{window_size(model)} patches; pair maps {1000 * per_pair:.0f} ms per pair")
    print("| measure | n | on a mark | chance | on a mark or the slanted brow | chance |")
    print("|---|---|---|---|---|---|")
    for name, n, hits, chance in rows:
        print(f"| {name} | {n} | " + " | ".join(f"{100 * np.mean(hits[k]):.1f}% | {100 * np.mean(chance[k]):.1f}%"
                                              for k in truths) + " |")
    if len(shares[truths[0]]):
        mean = summed / len(shares[truths[0]])
        print("Summary's top windows (where twins differ for this model): "
              + "; ".join(w["words"] for w in window_words(model, mean)))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
