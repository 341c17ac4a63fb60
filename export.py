"""Write a portable fastai learner (.pkl) from a training checkpoint.

    python export.py                                   # newest models/ep*.pth -> models/twins.pkl
    python export.py --ckpt models/ep20 --out twins.pkl

Then, in any Python with this repository's `twins` importable:

    from fastai.learner import load_learner
    from twins.inference import verify
    learn = load_learner("models/twins.pkl")
    verify(learn, "a.jpg", "b.jpg")   # {'score': 0.83, 'same': True, 'threshold': 0.71}

A .pkl is a pickle: load only files you trust.
"""
import argparse
import os
import warnings
from pathlib import Path

from twins.data import DataError
from twins.inference import inference_learner, model_from_checkpoint, newest_checkpoint, validation_threshold


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to export (default: the newest ep*.pth in models/)")
    p.add_argument("--out", default="models/twins.pkl", help="where to write the learner (default models/twins.pkl)")
    p.add_argument("--data", help="JSON folder, if not where training found it (to choose the threshold)")
    p.add_argument("--data-root", help="image folder, if not where training found it")
    args = p.parse_args(argv)
    ckpt_path = args.ckpt or newest_checkpoint("models")
    model, cfg, ckpt = model_from_checkpoint(ckpt_path)
    try:
        threshold, source = validation_threshold(model, cfg, args.data, args.data_root)
    except DataError as e:
        raise SystemExit(f"Data error while choosing the threshold: {e}") from None
    learn = inference_learner(model, cfg, ckpt, threshold, source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    learn.path = tmp.parent
    learn.export(tmp.name)
    os.replace(tmp, out)
    print(f"Exported {ckpt_path} (epoch {ckpt['epoch']}) to {out}; threshold {threshold:.4f} from {source}")


if __name__ == "__main__":
    main()
