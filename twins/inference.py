"""Inference from a checkpoint or an exported learner: the portable `.pkl`, `verify`, `explain`, and
the top-loss pairs of a split. No W&B here: `verify()` runs without wandb."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.data.transforms import IntToFloatTensor
from fastai.learner import Learner, load_learner

from .checkpoint import check_classes
from .data import PairDL, Split, TwinPairs, load_faces, prepare_data
from .errors import CheckpointError
from .evaluate import embed_images
from .explain import pair_maps
from .loss import DCALLoss
from .metrics import protocol_scores
from .model import device, encode_all
from .settings import Settings


def load_split(s: Settings, split: str, classes: list[str], data: str | None = None,
               data_root: str | None = None) -> Split:
    """One split of the run's data ('train', 'valid' or 'test'; the validation families the run held
    out), with the JSON folder or image folder moved when given. The data must give the training ids
    `classes` of the run (else the held-out families would not be the ones it held out)."""
    prepared = prepare_data(replace(s, data=data or s.data, data_root=data_root or s.data_root))
    check_classes({"classes": classes}, list(prepared.classes), "this model")
    return getattr(prepared, split)


def inference_learner(model, ckpt: dict, ckpt_path: Path) -> Learner:
    """A Learner holding only what inference needs: the model, the loss, empty loaders, and the run's
    settings, training ids, verification threshold (the checkpoint's validation EER threshold) and origin."""
    empty = PairDL(TwinPairs.empty(ckpt["settings"]["size"]), bs=1, after_batch=IntToFloatTensor())
    learn = Learner(DataLoaders(empty, empty), model, loss_func=DCALLoss())
    learn.twins = {"settings": Settings(**ckpt["settings"]), "classes": ckpt["classes"], "epoch": ckpt["epoch"],
                   "threshold": ckpt["threshold"], "checkpoint": str(ckpt_path), "run_id": ckpt["plan"]["run_id"]}
    return learn


def open_learner(path: str | Path) -> Learner:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"exported learner {p} does not exist; run python export.py first")
    try:
        learn = load_learner(p, cpu=device().type == "cpu")
    except Exception as e:  # a truncated or foreign pickle raises anything
        raise CheckpointError(f"exported learner {p} cannot be read ({type(e).__name__}: {e}); export it again "
                              "with python export.py") from None
    if not hasattr(learn, "twins"):
        raise CheckpointError(f"{p} is not a learner exported by export.py")
    return learn


def verify(learn: Learner, img_a, img_b) -> dict:
    """Score one pair (paths or PIL images): cosine of the DCAL embeddings (SA + GLCA), the decision
    at the threshold chosen on validation, and the threshold."""
    emb = embed_images(learn.model, load_faces([img_a, img_b], learn.twins["settings"].size))
    score, t = float(emb[0] @ emb[1]), learn.twins["threshold"]
    return {"score": score, "same": score >= t, "threshold": t}


def explain(learn: Learner, img_a, img_b) -> dict:
    """`verify` plus why (paths or PIL images): `map_a`, `map_b` are occlusion maps of the pair score,
    one value per window of patches, row-major over the face (twins/explain.py). Positive: without that
    region the two faces would score more alike, so it made them look different (dissimilarity);
    negative: it made them look alike (similarity)."""
    score, map_a, map_b = pair_maps(learn.model, load_faces([img_a, img_b], learn.twins["settings"].size))
    t = learn.twins["threshold"]
    return {"score": score, "same": score >= t, "threshold": t, "map_a": map_a, "map_b": map_b}


@torch.no_grad()
def pair_losses(model, enc: dict, pairs: np.ndarray, genuine: np.ndarray) -> np.ndarray:
    """The training loss of each pair, with `reduction='none'` (people outside the training ids:
    the identity terms are off, the twin pair terms remain)."""
    dev = next(model.parameters()).device
    i, j = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
    out = {"log_vars": model.log_vars, "pair_logit": model.pair_logit}
    for branch, head in (("sa", model.sa_head), ("glca", getattr(model, "glca_head", None))):
        if branch in enc:
            feat = torch.cat([enc[branch][i], enc[branch][j]]).to(dev)
            out[f"feat_{branch}"] = feat
            out[branch] = head(feat)
    unknown = torch.full((len(pairs),), -1, device=dev)
    return DCALLoss(reduction="none")(out, torch.from_numpy(genuine).float().to(dev), unknown, unknown).cpu().numpy()


def top_losses(model, split: Split, cache: torch.Tensor, k: int):
    """The k twin-impostor pairs and the k genuine pairs with the highest loss: (scores, image pairs,
    losses, {"impostor": indices, "genuine": indices} into those pairs)."""
    enc = encode_all(model, cache)
    scores, genuine, pairs = protocol_scores(model.embedding(enc), split.person, split.twin_pairs)
    losses = pair_losses(model, enc, pairs, genuine)
    picks = {}
    for name, mask in (("impostor", ~genuine), ("genuine", genuine)):
        idx = np.flatnonzero(mask)
        picks[name] = idx[np.argsort(-losses[idx], kind="stable")[:k]]
    return scores, pairs, losses, picks


def single_pair(paths: list[str], size: int) -> tuple[Split, torch.Tensor]:
    """A two-image 'split' for the one-pair mode (no twin pairs: the truth is unknown)."""
    return Split(["image 1", "image 2"], [Path(p) for p in paths], np.array([0, 1]), []), load_faces(paths, size)
