"""Write a portable fastai learner (.pkl) from a training checkpoint.

    python export.py                                   # newest models/ep*.pth -> models/twins.pkl (beside it)
    python export.py --ckpt models/ep20 --out twins.pkl

Then, in any Python with this repository's `twins` importable:

    from fastai.learner import load_learner
    from twins.inference import verify
    learn = load_learner("models/twins.pkl")
    verify(learn, "a.jpg", "b.jpg")   # {'score': 0.83, 'same': True, 'threshold': 0.71}

A .pkl is a pickle: load only files you trust.
"""
import argparse
import io
import warnings
from pathlib import Path

import torch

from twins.checkpoint import checkpoint_path, model_from_checkpoint, newest_checkpoint, write_atomic
from twins.errors import CheckpointError, TwinsError
from twins.inference import inference_learner


def export(args: argparse.Namespace) -> None:
    """No data and no GPU: the checkpoint holds the weights and the threshold its validation chose."""
    ckpt_path = checkpoint_path(args.ckpt or newest_checkpoint("models"))
    model, _, ckpt = model_from_checkpoint(ckpt_path, torch.device("cpu"))
    out = Path(args.out or ckpt_path.with_name("twins.pkl"))  # beside its checkpoint: never another run's learner
    if out.is_dir():
        raise CheckpointError(f"--out {out} is a folder: name the file, e.g. --out {out / 'twins.pkl'}")
    pkl = io.BytesIO()  # what fastai's Learner.export writes (a learner without data or optimizer), written whole
    torch.save(inference_learner(model, ckpt, ckpt_path), pkl, pickle_protocol=2)
    try:
        write_atomic(out, pkl.getvalue())
    except OSError as e:
        raise CheckpointError(f"--out {out} cannot be written ({e.strerror or e}): pass another --out") from None
    print(f"Exported {ckpt_path} (run {ckpt['plan']['run_id']}, epoch {ckpt['epoch']}) to {out}; "
          f"threshold {ckpt['threshold']:.4f} from that epoch's validation twins (EER threshold)")


def main(argv=None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to export (default: the newest ep*.pth in models/)")
    p.add_argument("--out", help="where to write the learner (default: twins.pkl beside the checkpoint)")
    args = p.parse_args(argv)
    try:
        export(args)
    except TwinsError as e:
        raise SystemExit(f"{e.label}: {e}") from None


if __name__ == "__main__":
    main()
