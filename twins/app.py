"""The training application behind train.py / export.py / interpret.py: data, learner, checkpoints,
evaluation on the twins-only protocol."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_core import set_seed, to_device

from .callbacks import (WANDB_ENTITY, AttentionMaps, BranchLogger, Checkpoint, TimmWeightDecay, Wandb, start_wandb, twin_sample,
                        wandb_run)
from .data import Split, build_cache, load_dataset, pair_dataloaders, split_valid
from .loss import DCALLoss
from .metrics import TwinsMetric, protocol_scores, verification_report
from .model import DCAL, check_cuda_arch

# The Kaggle recipe (P100, 16 GB): see PLAN.md "Input size" for the figures behind it.
KAGGLE = dict(arch="vit_small_patch16_224.augreg_in21k_ft_in1k", size=448, patch_size=None, pretrained=True,
              epochs=40, bs=16, lr=1e-4, wd=0.05, drop_path=0.1, top_r=0.1)
# The CPU demo recipe: a small ViT from scratch on the generated set, a few minutes on 2 cores.
DEMO = dict(arch="test_vit", size=64, patch_size=8, pretrained=False, epochs=30, bs=16, lr=2e-3, wd=0.05,
            drop_path=0.0, top_r=0.2)
# Everything else a run is configured by.
DEFAULTS = dict(data="data_json", data_root=None, demo=False, valid_pct=0.1, seed=42, out="models", map_every=5,
                wandb_project="twins-dcal", wandb_entity=WANDB_ENTITY, no_wandb=False, glca=True, pwca=True)
# What makes a checkpoint's weights fit a model: these must match on --resume.
MODEL_KEYS = ("arch", "size", "patch_size", "glca", "pwca", "top_r")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class TwinData:
    train: Split
    valid: Split | None
    test: Split
    caches: dict[str, torch.Tensor]
    classes: dict[str, int]  # training person id -> class index


def prepare_data(cfg: dict) -> TwinData:
    splits = load_dataset(cfg["data"], cfg["data_root"])
    train, valid = split_valid(splits["train"], cfg["valid_pct"], cfg["seed"])
    parts = {"train": train, "valid": valid, "test": splits["test"]}
    print("Data: " + ", ".join(f"{k} {len(s.ids)} people / {len(s.paths)} images / {len(s.twin_pairs)} twin pairs"
                              for k, s in parts.items() if s is not None))
    caches = {k: build_cache(s.paths, cfg["size"], f"{k} images") for k, s in parts.items() if s is not None}
    return TwinData(train, valid, splits["test"], caches, {pid: i for i, pid in enumerate(train.ids)})


def make_model(cfg: dict, n_classes: int, pretrained: bool | None = None) -> DCAL:
    return DCAL(cfg["arch"], n_classes, cfg["size"], pretrained=cfg["pretrained"] if pretrained is None else pretrained,
                drop_path=cfg["drop_path"], top_r=cfg["top_r"], glca=cfg["glca"], pwca=cfg["pwca"],
                patch_size=cfg["patch_size"])


def make_learner(cfg: dict, data: TwinData, model: DCAL) -> Learner:
    dc = model.data_config
    dls = pair_dataloaders(data.train, data.valid, data.caches["train"], data.caches.get("valid"), data.classes,
                           bs=cfg["bs"], size=cfg["size"], mean=dc["mean"], std=dc["std"], seed=cfg["seed"],
                           device=device())
    metrics = [TwinsMetric(k, data.valid.person, data.valid.twin_pairs) for k in ("eer", "auc")] if data.valid else []
    learn = Learner(dls, model, loss_func=DCALLoss(), opt_func=partial(Adam, eps=1e-6), lr=cfg["lr"], wd=cfg["wd"],
                    metrics=metrics, cbs=[TimmWeightDecay(), BranchLogger()], path=".", model_dir=cfg["out"])
    if torch.cuda.is_available():
        learn.to_fp16()
    return learn


def checkpoint_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".pth" else p.with_name(p.name + ".pth")


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by train.py, or SystemExit saying what is wrong."""
    p = checkpoint_path(path)
    if not p.is_file():
        near = sorted(p.parent.glob("ep*.pth")) if p.parent.is_dir() else []
        raise SystemExit(f"checkpoint {p} does not exist" + (f"; found: {', '.join(map(str, near))}" if near else ""))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"checkpoint {p} cannot be read ({type(e).__name__}: {e})") from None
    missing = {"model", "opt", "epoch", "config", "classes"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise SystemExit(f"{p} is not a twins checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def check_compatible(ckpt: dict, cfg: dict, classes: list[str], source: str) -> None:
    diffs = [f"{k}: checkpoint {ckpt['config'][k]!r} vs {cfg[k]!r}" for k in MODEL_KEYS if ckpt["config"][k] != cfg[k]]
    if diffs:
        raise SystemExit(f"{source} does not match this run ({'; '.join(diffs)})")
    if ckpt["classes"] != classes:
        extra, gone = sorted(set(classes) - set(ckpt["classes"])), sorted(set(ckpt["classes"]) - set(classes))
        raise SystemExit(f"{source} was trained on other training ids than this data gives "
                         f"(new here: {extra[:5]}{'...' if len(extra) > 5 else ''}; missing here: "
                         f"{gone[:5]}{'...' if len(gone) > 5 else ''}; same --data and --valid-pct/--seed?)")


@torch.no_grad()
def encode_all(model: DCAL, cache: torch.Tensor, bs: int = 64) -> dict:
    """Every cached image through SA + GLCA (eval mode: no PWCA, no augmentation): class tokens,
    rollout, GLCA-selected patches, on the CPU."""
    dc, dev = model.data_config, next(model.parameters()).device
    mean, std = (torch.tensor(dc[k], device=dev).view(1, 3, 1, 1) for k in ("mean", "std"))
    model.eval()
    parts = []
    for i in range(0, len(cache), bs):
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            out = model.encode((cache[i:i + bs].to(dev).float() / 255 - mean) / std)
        parts.append({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def embed_images(model: DCAL, cache: torch.Tensor) -> torch.Tensor:
    """The verification embedding of every cached image."""
    return model.embedding(encode_all(model, cache))


def split_report(model: DCAL, split: Split, cache: torch.Tensor, threshold: float | None = None):
    scores, genuine, pairs = protocol_scores(embed_images(model, cache), split.person, split.twin_pairs)
    return verification_report(scores, genuine, threshold), scores, genuine, pairs


def choose_threshold(model: DCAL, split: Split, cache: torch.Tensor, is_valid: bool) -> tuple[float, str, dict]:
    """The verification threshold: the EER threshold on the validation twins, or on the training
    twins (flagged as optimistic) when the run has no validation split. Returns (threshold, source, report)."""
    rep = split_report(model, split, cache)[0]
    source = ("validation twins (EER threshold)" if is_valid
              else "training twins (no validation split: --valid-pct 0), optimistic")
    return rep["eer_threshold"], source, rep


def evaluate(model: DCAL, data: TwinData, out: Path) -> dict:
    """Test on the twins-only protocol, at the threshold chosen on validation (the validation EER
    threshold; the training twins' when there is no validation split). Writes JSON + ROC PNG."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    has_valid = data.valid is not None
    chosen, source, rep = choose_threshold(model, data.valid if has_valid else data.train,
                                           data.caches["valid" if has_valid else "train"], has_valid)
    valid = rep if has_valid else None
    test, scores, genuine, _ = split_report(model, data.test, data.caches["test"], chosen)
    test["threshold_source"] = source
    test["accuracy_at_test_eer_threshold"] = verification_report(scores, genuine)["accuracy"]  # best-on-test, reference only
    report = {"test": test, "valid": valid}
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_report.json").write_text(json.dumps(report, indent=2))
    far, tar, _ = roc_curve(genuine, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(far, tar, label=f"DCAL  AUC {test['auc']:.3f}  EER {100 * test['eer']:.1f}%")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="FAR (twin impostors accepted)", ylabel="TAR (genuine accepted)",
           title=f"Twins-only test ROC ({test['n_genuine']} genuine / {test['n_impostor']} twin pairs)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    if (run := wandb_run()) is not None:
        import wandb
        run.log({**{f"test/{k}": v for k, v in test.items() if isinstance(v, (int, float))},
                 "test/roc": wandb.Image(fig)})
    plt.close(fig)
    return report


def train(cfg: dict, resume: str | None = None) -> dict:
    """Fresh training (resume=None) or continuation from a checkpoint; returns the test report."""
    check_cuda_arch()
    set_seed(cfg["seed"])  # python, numpy and torch: fastai's shuffling draws from python's random
    ckpt = load_checkpoint(resume) if resume else None
    data = prepare_data(cfg)
    start = 0
    if ckpt is not None:
        check_compatible(ckpt, cfg, list(data.classes), f"checkpoint {checkpoint_path(resume)}")
        start = ckpt["epoch"]
        if start >= cfg["epochs"]:
            raise SystemExit(f"checkpoint {checkpoint_path(resume)} is at epoch {start}, already the last of "
                             f"--epochs {cfg['epochs']}; pass a larger --epochs to train further")
    model = make_model(cfg, len(data.classes), pretrained=cfg["pretrained"] and ckpt is None)
    learn = make_learner(cfg, data, model)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        model.to(device())
        learn.create_opt()
        learn.opt.load_state_dict(to_device(ckpt["opt"], device()))
        learn.dls.train.n_epochs_seen = start  # the pairs of epoch start+1 are those of the uninterrupted run
        print(f"Resuming from {checkpoint_path(resume)}: epoch {start} of {cfg['epochs']} done")
    run = start_wandb(cfg, cfg["wandb_project"], cfg["wandb_entity"], not cfg["no_wandb"],
                      ckpt.get("wandb_id") if ckpt else None)
    out = Path(cfg["out"])
    cbs = [Checkpoint(out, 5, {"config": cfg, "classes": list(data.classes), "wandb_id": run.id if run else None})]
    if run is not None:
        cbs.append(Wandb(log=None, log_preds=False, log_model=False))
    sample_split = data.valid or data.train
    if cfg["glca"]:
        picks = twin_sample(sample_split, 4, cfg["seed"])
        cache = data.caches["valid" if data.valid else "train"]
        images = torch.cat([cache[[a for a, _ in picks]], cache[[b for _, b in picks]]])
        captions = [(f"{sample_split.ids[sample_split.person[a]]}", f"twin {sample_split.ids[sample_split.person[b]]}")
                    for a, b in picks]
        cbs.append(AttentionMaps(images, captions, out / "maps", cfg["map_every"]))
    learn.fit_one_cycle(cfg["epochs"], cfg["lr"], cbs=cbs, start_epoch=start)
    report = evaluate(learn.model, data, out)
    t = report["test"]
    print(f"Test (twins-only, {t['n_genuine']} genuine / {t['n_impostor']} twin-impostor pairs): "
          f"EER {100 * t['eer']:.2f}%  AUC {t['auc']:.4f}  accuracy {100 * t['accuracy']:.2f}% at threshold "
          f"{t['threshold']:.3f} from {t['threshold_source']}; report in {out / 'test_report.json'}")
    if run is not None:
        run.finish()
    return report


def resolve_config(flags: dict, base: dict) -> dict:
    """The run's configuration: `base` (the recipe, or the checkpoint's on resume) with the flags the
    user gave on top."""
    return {**base, **{k: v for k, v in flags.items() if v is not None}}
