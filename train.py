"""Train DCAL for identical-twin verification.

    python train.py --fresh                  # from ImageNet-pretrained timm weights (the Kaggle recipe)
    python train.py --resume models/ep20     # continue from the checkpoint written after epoch 20
    python train.py --fresh --demo           # the generated demo set, a small CPU recipe
"""
import argparse
import warnings

from twins.app import DEFAULTS, DEMO, KAGGLE, load_checkpoint, resolve_config, train
from twins.callbacks import WANDB_ENTITY
from twins.data import DataError
from twins.demo import make_demo

DEMO_DIR = "demo"


def parse_args(argv=None):
    k = KAGGLE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fresh", action="store_true", help="start a new run (from the arch's pretrained weights)")
    mode.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint, e.g. models/ep20 (.pth optional); "
                      "the run's settings come from the checkpoint")
    p.add_argument("--epochs", type=int, help=f"total epochs of the one-cycle schedule (default {k['epochs']}; demo {DEMO['epochs']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate of the one-cycle schedule (default {k['lr']}; demo {DEMO['lr']})")
    p.add_argument("--bs", type=int, help=f"pairs per batch (default {k['bs']}: about 10-11 GB at 448 in fp16, estimated; demo {DEMO['bs']})")
    p.add_argument("--size", type=int, help=f"square input size in pixels (default {k['size']}; demo {DEMO['size']})")
    p.add_argument("--arch", help=f"timm ViT with a class token (default {k['arch']}; demo {DEMO['arch']})")
    p.add_argument("--patch-size", type=int, help="override the backbone's patch size (default: the arch's own; demo 8)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False,
                   help="random init instead of the arch's pretrained weights (the demo always is)")
    p.add_argument("--wd", type=float, help=f"AdamW weight decay (default {k['wd']})")
    p.add_argument("--drop-path", type=float, help=f"stochastic depth rate (default {k['drop_path']})")
    p.add_argument("--top-r", type=float, help=f"GLCA: share of patch tokens selected by rollout (default {k['top_r']})")
    p.add_argument("--no-glca", dest="glca", action="store_const", const=False, help="ablation: no GLCA branch")
    p.add_argument("--no-pwca", dest="pwca", action="store_const", const=False,
                   help="ablation: no PWCA branch (both flags: the plain ViT siamese baseline)")
    p.add_argument("--data", help="folder with the four JSON files (default data_json/)")
    p.add_argument("--data-root", help="folder holding the images, when the JSON paths (written on another "
                   "machine) do not exist here; e.g. /kaggle/input/nd-twin")
    p.add_argument("--demo", action="store_true", default=None,
                   help=f"generate (once) and use the demo set in {DEMO_DIR}/, with the CPU demo recipe")
    p.add_argument("--valid-pct", type=float, help="share of training twin families held out for validation, "
                   "threshold and model choice (default 0.1; 0 = train on all)")
    p.add_argument("--seed", type=int, help="seed for the split, the pairs and the model (default 42)")
    p.add_argument("--out", help="folder for checkpoints ep{N}.pth, attention maps and the test report (default models/)")
    p.add_argument("--map-every", type=int, help="save attention maps every N epochs (default 5)")
    p.add_argument("--wandb-project", help="W&B project (default twins-dcal)")
    p.add_argument("--wandb-entity", help=f"W&B entity (default {WANDB_ENTITY})")
    p.add_argument("--no-wandb", action="store_true", default=None, help="no W&B logging at all")
    return p.parse_args(argv)


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("fresh", "resume")}
    ckpt_cfg = load_checkpoint(args.resume)["config"] if args.resume else None
    cfg = resolve_config(flags, ckpt_cfg or {**DEFAULTS, **(DEMO if args.demo else KAGGLE)})
    if cfg["demo"] and args.data is None and args.data_root is None and not args.resume:
        cfg["data"] = str(make_demo(DEMO_DIR))
        cfg["data_root"] = f"{DEMO_DIR}/images"
    print("Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    try:
        train(cfg, resume=args.resume)
    except DataError as e:
        raise SystemExit(f"Data error: {e}") from None


if __name__ == "__main__":
    main()
