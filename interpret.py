"""The twin pairs the model gets most wrong, drawn with attention heatmaps.

    python interpret.py                        # test split, top 8 twin impostors + top 8 genuine pairs by loss
    python interpret.py --split valid -k 4
    python interpret.py --pair a.jpg b.jpg     # why were these two faces judged the same / different?
    python interpret.py --summary              # over the test twins: which face parts tell them apart?

Each pair: outer columns, the attention rollout over each face (white squares: GLCA's patches); inner
columns, what made the two faces differ (red) or look alike (green) (twins/explain.py). `--summary`
averages those maps over pairs of each kind (twins rejected, twins accepted, genuine pairs accepted)
over the mean face (`summary_<split>.png` / `.json`). Figures go to --out (default models/interpret/).
"""
import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from twins.checkpoint import checkpoint_path, model_from_checkpoint, newest_checkpoint
from twins.data import Split, load_faces
from twins.errors import TwinsError
from twins.explain import SUMMARY_PAIRS, pair_rows, write_summary
from twins.inference import load_split, top_losses
from twins.settings import COUNT
from twins.viz import plot_pairs


def interpret(args: argparse.Namespace) -> None:
    path = checkpoint_path(args.ckpt or newest_checkpoint("models"))
    model, s, ckpt = model_from_checkpoint(path)
    threshold, out = ckpt["threshold"], Path(args.out)
    print(f"Model: run {ckpt['plan']['run_id']}, epoch {ckpt['epoch']}, {path}")
    if args.pair:
        split = Split(["image 1", "image 2"], [Path(p) for p in args.pair], np.array([0, 1]), [])  # truth unknown
        cache = load_faces(args.pair, s.size)
        rows = pair_rows(model, split, cache, [(0, 1)], threshold)
        plot_pairs(rows, out / "pair.png", title="outer: rollout + GLCA tokens; inner: the regions that decided the verdict")
        print(f"{args.pair[0]} vs {args.pair[1]}: cos {rows[0]['score']:.4f}, threshold {threshold:.4f} -> "
              f"{'same person' if rows[0]['same'] else 'different people'}; figure {out / 'pair.png'}")
        return
    split = load_split(s, args.split, ckpt["classes"], args.data, args.data_root)
    cache = load_faces(split.paths, s.size, f"{args.split} images")
    if args.summary:
        write_summary(model, split, cache, threshold, args.pairs, s.seed, out / f"summary_{args.split}", args.split)
        return
    scores, pairs, losses, picks = top_losses(model, split, cache, args.k)
    listing = {}
    for name, idx in picks.items():
        what = "twin impostors scored most alike" if name == "impostor" else "genuine pairs scored least alike"
        plot_pairs(pair_rows(model, split, cache, pairs[idx], threshold, losses[idx]), out / f"top_{name}.png",
                   title=f"{args.split}: top-loss {what} (outer: rollout + GLCA; inner: what decided)")
        listing[name] = [{"image_a": str(split.paths[a]), "image_b": str(split.paths[b]), "score": float(sc),
                          "loss": float(l)} for (a, b), sc, l in zip(pairs[idx], scores[idx], losses[idx])]
        print(f"{out / f'top_{name}.png'}: {len(idx)} {what}")
    (out / "top_losses.json").write_text(json.dumps({"threshold": threshold, **listing}, indent=1))


def main(argv=None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to interpret (default: the newest ep*.pth in models/)")
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
