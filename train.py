"""Train DCAL for identical-twin verification.

    python train.py --fresh                  # from ImageNet-pretrained timm weights (the Kaggle recipe)
    python train.py --resume models/ep20     # continue from the checkpoint written after epoch 20
    python train.py --fresh --demo           # the generated demo set, a small CPU recipe
"""
import argparse
import warnings

from twins.app import train
from twins.checkpoint import checkpoint_path, load_checkpoint
from twins.config import DEFAULTS, DEMO, KAGGLE, resolve_config
from twins.demo import make_demo
from twins.errors import TwinsError

DEMO_DIR = "demo"


def default(key: str) -> str:
    """The default of a setting for help texts, from the recipes (the demo's too when it differs)."""
    if key in DEFAULTS:
        return f"default: {DEFAULTS[key]}"
    value = "the arch's own" if KAGGLE[key] is None else KAGGLE[key]
    return f"default: {value}" + (f"; demo {DEMO[key]}" if DEMO[key] != KAGGLE[key] else "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fresh", action="store_true", help="start a new run (from the arch's pretrained weights)")
    mode.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint, e.g. models/ep20 (.pth optional); "
                      "the run's settings come from the checkpoint")
    p.add_argument("--epochs", type=int, help=f"total epochs of the one-cycle schedule ({default('epochs')})")
    p.add_argument("--lr", type=float, help=f"peak learning rate of the one-cycle schedule ({default('lr')})")
    p.add_argument("--bs", type=int, help=f"pairs per batch ({default('bs')})")
    p.add_argument("--size", type=int, help=f"square input size in pixels ({default('size')})")
    p.add_argument("--arch", help=f"timm ViT with a class token ({default('arch')})")
    p.add_argument("--patch-size", type=int, help=f"override the backbone's patch size ({default('patch_size')})")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False,
                   help="random init instead of the arch's pretrained weights (the demo always is)")
    p.add_argument("--wd", type=float, help=f"AdamW weight decay ({default('wd')})")
    p.add_argument("--drop-path", type=float, help=f"stochastic depth rate ({default('drop_path')})")
    p.add_argument("--top-r", type=float, help=f"GLCA: share of patch tokens selected by rollout ({default('top_r')})")
    p.add_argument("--no-glca", dest="glca", action="store_const", const=False, help="ablation: no GLCA branch")
    p.add_argument("--no-pwca", dest="pwca", action="store_const", const=False,
                   help="ablation: no PWCA branch (both flags: the plain ViT siamese baseline)")
    p.add_argument("--data", help=f"folder with the four JSON files ({default('data')})")
    p.add_argument("--data-root", help="folder holding the images, when the JSON paths (written on another "
                   "machine) do not exist here; e.g. /kaggle/input/nd-twin")
    p.add_argument("--demo", action="store_true", default=None,
                   help=f"generate (once) and use the demo set in {DEMO_DIR}/, with the CPU demo recipe")
    p.add_argument("--valid-pct", type=float, help="share of training twin families held out for validation, "
                   f"threshold and model choice ({default('valid_pct')}; 0 = train on all)")
    p.add_argument("--seed", type=int, help=f"seed for the split, the pairs and the model ({default('seed')})")
    p.add_argument("--out", help=f"folder for checkpoints ep{{N}}.pth, attention maps and the test report ({default('out')})")
    p.add_argument("--map-every", type=int, help=f"save attention maps every N epochs ({default('map_every')})")
    p.add_argument("--wandb-project", help=f"W&B project ({default('wandb_project')})")
    p.add_argument("--wandb-entity", help=f"W&B entity ({default('wandb_entity')})")
    p.add_argument("--no-wandb", dest="wandb", action="store_const", const=False, help="no W&B logging at all")
    return p.parse_args(argv)


def main(argv=None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("fresh", "resume")}
    try:
        ckpt = load_checkpoint(args.resume) if args.resume else None
        cfg = resolve_config(flags, ckpt["config"] if ckpt else DEMO if args.demo else KAGGLE)
        if cfg["demo"] and args.data is None and args.data_root is None and not ckpt:
            cfg["data"] = str(make_demo(DEMO_DIR))
            cfg["data_root"] = f"{DEMO_DIR}/images"
        print("Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        train(cfg, ckpt, str(checkpoint_path(args.resume)) if ckpt else None)
    except TwinsError as e:
        raise SystemExit(f"{e.label}: {e}") from None


if __name__ == "__main__":
    main()
