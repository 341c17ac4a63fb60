"""Train DCAL for identical-twin verification.

    python train.py --fresh                  # from ImageNet-pretrained timm weights (the Kaggle recipe)
    python train.py --resume models/ep20     # continue from the checkpoint written after epoch 20
    python train.py --fresh --demo           # the generated demo set, a small CPU recipe

With several GPUs (Kaggle's T4 x2) the command trains in one process per GPU by itself.
"""
import time

PROCESS_START = time.time()  # --time-limit counts from here, before the slow imports

import argparse  # noqa: E402
import os  # noqa: E402

# Before CUDA starts: a fragmented cache is what makes a micro-batch the memory search chose fail later (validation).
if "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from twins.checkpoint import checkpoint_path, load_checkpoint  # noqa: E402
from twins.demo import make_demo  # noqa: E402
from twins.distributed import is_main, launch, on_main, start, world  # noqa: E402
from twins.errors import TwinsError  # noqa: E402
from twins.run import find_lr, train  # noqa: E402
from twins.settings import (COUNT, DEMO, DEMO_DIR, KAGGLE_TIME_LIMIT_H, Settings, fresh_settings,  # noqa: E402
                            ranged, resumed_settings)

MODES = ("fresh", "resume", "lr_find", "time_limit", "demo")  # how to run, not the run's settings


def default(key: str) -> str:
    """The default of a setting for help texts: the Kaggle recipe's (and the demo's where it differs)."""
    value = getattr(Settings(), key)
    demo = f"; demo {DEMO[key]}" if DEMO.get(key, value) != value else ""
    return f"default: {value if value is not None else 'the arch'}{demo}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    mode = run.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fresh", action="store_true", help="start a new run (from the arch's pretrained weights)")
    mode.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (models/ep20) or a folder's newest; "
                      "its settings come with it")
    run.add_argument("--lr-find", action="store_true", help="with --fresh: fastai's learning-rate finder, no training")
    run.add_argument("--out", help=f"run folder, one run each ({default('out')}; resume: the checkpoint's)")
    run.add_argument("--save-every", type=COUNT, help=f"checkpoint every N epochs, and the last ({default('save_every')})")
    run.add_argument("--demo", action="store_true", help=f"generate (once) and use the demo set in {DEMO_DIR}/, "
                     "with the CPU demo recipe")
    data = p.add_argument_group("data")
    data.add_argument("--data", help=f"folder with the four JSON files ({default('data')})")
    data.add_argument("--data-root", help="folder the JSON's image paths are looked up under, e.g. /kaggle/input/nd-twin")
    data.add_argument("--valid-pct", type=ranged(float, lambda v: 0 < v < 1, "a share above 0 and below 1"),
                      help=f"share of training families held out, where the threshold is chosen ({default('valid_pct')})")
    data.add_argument("--seed", type=int, help=f"seed of the split, pairs and model ({default('seed')})")
    model = p.add_argument_group("model")
    model.add_argument("--arch", help=f"timm ViT with a class token ({default('arch')})")
    model.add_argument("--size", type=COUNT, help=f"square input size in pixels ({default('size')})")
    model.add_argument("--patch-size", type=COUNT, help=f"the backbone's patch size ({default('patch_size')})")
    model.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False,
                       help="random init instead of pretrained weights")
    model.add_argument("--weights", metavar="FILE", help="pretrained weights from a file (a timm state dict) instead "
                       "of the download")
    model.add_argument("--top-r", type=ranged(float, lambda v: 0 < v <= 1, "a share above 0, at most 1"), help=f"GLCA: share of patches selected by rollout ({default('top_r')})")
    model.add_argument("--no-glca", dest="glca", action="store_const", const=False, help="ablation: no GLCA branch")
    model.add_argument("--no-pwca", dest="pwca", action="store_const", const=False,
                       help="ablation: no PWCA branch (with --no-glca: the plain ViT)")
    schedule = p.add_argument_group("schedule")
    schedule.add_argument("--epochs", type=COUNT, help=f"epochs of the one-cycle schedule ({default('epochs')})")
    schedule.add_argument("--bs", type=COUNT, help=f"pairs per optimiser step, all GPUs together ({default('bs')})")
    schedule.add_argument("--lr", type=ranged(float, lambda v: v > 0, "a learning rate above 0"),
                          help=f"peak learning rate of that step ({default('lr')})")
    schedule.add_argument("--wd", type=ranged(float, lambda v: v >= 0, "a weight decay of at least 0"), help=f"AdamW weight decay ({default('wd')})")
    schedule.add_argument("--drop-path", type=ranged(float, lambda v: 0 <= v < 1, "a share from 0 to below 1"), help=f"stochastic depth rate ({default('drop_path')})")
    logging = p.add_argument_group("logging")
    logging.add_argument("--map-every", type=COUNT, help=f"attention maps every N epochs ({default('map_every')})")
    logging.add_argument("--wandb-project", help=f"W&B project ({default('wandb_project')})")
    logging.add_argument("--wandb-entity", help=f"W&B entity ({default('wandb_entity')})")
    logging.add_argument("--no-wandb", dest="wandb", action="store_const", const=False, help="no W&B logging")
    gpu = p.add_argument_group("Kaggle / GPU")
    gpu.add_argument("--time-limit", type=ranged(float, lambda v: v >= 0, "hours, at least 0"), metavar="HOURS", help="stop with a checkpoint before an epoch would "
                     f"end past HOURS from this command's start (Kaggle: {KAGGLE_TIME_LIMIT_H})")
    args = p.parse_args(argv)
    if args.lr_find and not args.fresh:
        p.error("--lr-find goes with --fresh")
    return args


def main(argv=None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    gpus = torch.cuda.device_count()
    if world() == 1 and gpus > 1 and not args.lr_find:  # the user's command, on every GPU
        print(f"{gpus} GPUs: {gpus} processes of this command, one per GPU (torch's elastic launcher)", flush=True)
        raise SystemExit(launch(gpus, [sys.argv[0], *argv]))
    start()
    if not is_main():  # the main process prints for all
        sys.stdout = open(os.devnull, "w")
    flags = {k: v for k, v in vars(args).items() if k not in MODES}
    limit = args.time_limit if args.time_limit is not None else (
        KAGGLE_TIME_LIMIT_H if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") else None)
    try:
        source = ckpt = None
        if args.fresh:
            settings = fresh_settings(flags, demo=args.demo)
            if args.demo and settings.data == DEMO["data"]:
                on_main(lambda: make_demo(DEMO_DIR))  # one writer; the others wait for it
        else:
            source = checkpoint_path(args.resume)
            ckpt = load_checkpoint(args.resume)
            flags["out"] = args.out or str(source.parent)  # beside the checkpoint it continues, by default
            settings = resumed_settings(Settings(**ckpt["settings"]), flags, str(source))
        print("Settings: " + ", ".join(f"{k}={v}" for k, v in vars(settings).items())
              + (f"; time limit {limit} h from {time.ctime(PROCESS_START)}" if limit is not None else ""))
        if args.lr_find:
            find_lr(settings)
            return
        train(settings, ckpt, str(source) if source else None,
              deadline=PROCESS_START + 3600 * limit if limit is not None else None)
    except TwinsError as e:
        raise SystemExit(f"{e.label}: {e}" if is_main() else 1) from None
    except KeyboardInterrupt:  # what was saved and how to resume is printed already
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
