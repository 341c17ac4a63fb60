"""The twin pairs the model gets most wrong, drawn with attention heatmaps.

    python interpret.py                        # test split, top 8 twin impostors + top 8 genuine pairs by loss
    python interpret.py --split valid -k 4
    python interpret.py --pair a.jpg b.jpg     # why were these two faces judged the same / different?
    python interpret.py --summary              # over the test twins: which face parts tell them apart?

Each pair: outer columns, the class-token attention rollout over each face (white squares: the patches
GLCA selected); inner columns, the occlusion map of the pair score that explains the verdict: what made
the two faces differ (red) or look alike (green), its strongest window outlined (twins/explain.py).
`--summary`: the pair maps averaged over up to --pairs pairs of each kind (twins rejected: where they
differ; twins accepted: what fooled the model; genuine pairs accepted: what stays the same), drawn over
the mean face, with the numbers and the top windows in words (`summary_<split>.png` / `.json`).
Figures go to --out (default models/interpret/).
"""
import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from twins.checkpoint import checkpoint_path, model_from_checkpoint, newest_checkpoint
from twins.data import build_cache
from twins.errors import TwinsError
from twins.explain import SUMMARY_PAIRS, write_summary
from twins.inference import (figure_rows, load_split, open_learner, single_pair, top_losses,
                             validation_threshold)
from twins.model import encode_all
from twins.settings import COUNT, Settings
from twins.viz import plot_pairs


def one_pair(model, s: Settings, threshold: float, paths: list[str], out: Path) -> None:
    split, cache = single_pair(paths, s.size)
    enc = encode_all(model, cache)
    emb = model.embedding(enc)
    pairs, score = np.array([[0, 1]]), np.array([float(emb[0] @ emb[1])])
    same = score >= threshold
    rows = figure_rows(model, split, cache, enc, pairs, score, same, np.zeros(1), threshold)
    rows[0]["caption_b"] = f"{Path(paths[1]).name}\nsays {'same person' if same[0] else 'different people'}"
    path = out / "pair.png"
    plot_pairs(rows, path, title="outer: rollout + GLCA tokens; inner: the regions that decided the verdict")
    print(f"{paths[0]} vs {paths[1]}: cos {score[0]:.4f}, threshold {threshold:.4f} -> "
          f"{'same person' if same[0] else 'different people'}; figure {path}")


def top_pairs(model, s: Settings, classes: list[str], threshold: float, args: argparse.Namespace, out: Path) -> None:
    split = load_split(s, args.split, classes, args.data, args.data_root)
    cache = build_cache(split.paths, s.size, f"{args.split} images")
    enc, scores, genuine, pairs, losses, picks = top_losses(model, split, cache, args.k)
    listing = {}
    for name, idx in picks.items():
        rows = figure_rows(model, split, cache, enc, pairs[idx], scores[idx], genuine[idx], losses[idx], threshold)
        path = out / f"top_{name}.png"
        what = "twin impostors scored most alike" if name == "impostor" else "genuine pairs scored least alike"
        plot_pairs(rows, path, title=f"{args.split}: top-loss {what} (outer: rollout + GLCA; inner: what decided)")
        listing[name] = [{"image_a": str(split.paths[a]), "image_b": str(split.paths[b]), "score": float(sc),
                          "loss": float(l)} for (a, b), sc, l in zip(pairs[idx], scores[idx], losses[idx])]
        print(f"{path}: {len(idx)} {what}")
    (out / "top_losses.json").write_text(json.dumps({"threshold": threshold, **listing}, indent=1))


def summary(model, s: Settings, classes: list[str], threshold: float, args: argparse.Namespace, out: Path) -> None:
    split = load_split(s, args.split, classes, args.data, args.data_root)
    cache = build_cache(split.paths, s.size, f"{args.split} images")
    rep = write_summary(model, split, cache, threshold, args.pairs, s.seed, out / f"summary_{args.split}", args.split)
    for kind in rep["kinds"].values():
        print(f"{kind['pairs']}: {kind['counted']} of {kind['in_split']} averaged, {kind['meaning']}:"
              + "".join(f"\n  {t['words']}" for t in kind["top"]))
    n = sum(k["sampled"] for k in rep["kinds"].values())
    print(f"{out / f'summary_{args.split}.png'} and .json: {n} pairs in {rep['seconds']:.1f} s "
          f"({n / rep['seconds']:.2f} pairs/s)")


def interpret(args: argparse.Namespace) -> None:
    if args.ckpt or not Path(args.learner).is_file():
        path = checkpoint_path(args.ckpt or newest_checkpoint("models"))
        model, s, ckpt = model_from_checkpoint(path)
        print(f"Model: checkpoint {path} (run {ckpt['plan']['run_id']}, epoch {ckpt['epoch']})")
        classes = ckpt["classes"]
        threshold, _ = validation_threshold(model, s, classes, args.data, args.data_root)
    else:
        learn = open_learner(args.learner)
        t = learn.twins
        print(f"Model: {args.learner}: run {t['run_id']}, epoch {t['epoch']}, exported from {t['checkpoint']}")
        model, s, threshold = learn.model.eval(), learn.twins["settings"], learn.twins["threshold"]
        classes = learn.twins["classes"]
    if args.pair:
        one_pair(model, s, threshold, args.pair, Path(args.out))
    elif args.summary:
        summary(model, s, classes, threshold, args, Path(args.out))
    else:
        top_pairs(model, s, classes, threshold, args, Path(args.out))


def main(argv=None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learner", default="models/twins.pkl", help="exported learner (default: %(default)s; "
                   "if absent, --ckpt or the newest checkpoint is used)")
    p.add_argument("--ckpt", help="use this checkpoint instead of the exported learner")
    p.add_argument("--split", default="test", choices=["test", "valid", "train"])
    p.add_argument("-k", type=COUNT, default=8, help="pairs per figure (default: %(default)s)")
    p.add_argument("--out", default="models/interpret", help="output folder (default: %(default)s)")
    p.add_argument("--pair", nargs=2, metavar=("IMG_A", "IMG_B"), help="explain one given pair instead")
    p.add_argument("--summary", action="store_true", help="the pair maps averaged over the split instead")
    p.add_argument("--pairs", type=COUNT, default=SUMMARY_PAIRS, help="with --summary: pairs of each kind "
                   "(default: %(default)s)")
    p.add_argument("--data", help="JSON folder, if not where training found it")
    p.add_argument("--data-root", help="image folder, if not where training found it")
    args = p.parse_args(argv)
    try:
        interpret(args)
    except TwinsError as e:
        raise SystemExit(f"{e.label}: {e}") from None


if __name__ == "__main__":
    main()
