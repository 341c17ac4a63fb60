"""Inference: the portable learner `export.py` writes (a `.pkl` for fastai's `load_learner`), `verify`,
`explain`, and the top-loss pairs of a split. No W&B here: `verify()` runs without wandb."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from .checkpoint import check_classes
from .data import Split, load_faces, prepare_data
from .explain import pair_maps
from .loss import DCALLoss
from .metrics import protocol_scores
from .model import embed_images, encode_all
from .settings import Settings


def load_split(s: Settings, split: str, classes: list[str], data: str | None = None,
               data_root: str | None = None) -> Split:
    """One split of the run's data ('train', 'valid' or 'test'), with the JSON or image folder moved when
    given; it must give the run's training ids `classes`, else 'valid' would not be the families it held out."""
    prepared = prepare_data(replace(s, data=data or s.data, data_root=data_root or s.data_root))
    check_classes({"classes": classes}, list(prepared.classes), "this model")
    return getattr(prepared, split)


def inference_learner(model, ckpt: dict, ckpt_path: Path) -> Learner:
    """A Learner holding only what inference needs: the model, the loss, no data, and the run's settings,
    training ids, verification threshold (the checkpoint's validation EER threshold) and origin."""
    learn = Learner(DataLoaders(), model, loss_func=DCALLoss())
    learn.twins = {"settings": Settings(**ckpt["settings"]), "classes": ckpt["classes"], "epoch": ckpt["epoch"],
                   "threshold": ckpt["threshold"], "checkpoint": str(ckpt_path), "run_id": ckpt["plan"]["run_id"]}
    return learn


def verify(learn: Learner, img_a, img_b) -> dict:
    """Score one pair (paths or PIL images): cosine of the DCAL embeddings (SA + GLCA), the decision
    at the threshold chosen on validation, and the threshold."""
    emb = embed_images(learn.model, load_faces([img_a, img_b], learn.twins["settings"].size))
    score, t = float(emb[0] @ emb[1]), learn.twins["threshold"]
    return {"score": score, "same": score >= t, "threshold": t}


def explain(learn: Learner, img_a, img_b) -> dict:
    """`verify` plus why: `map_a`, `map_b`, the occlusion maps of the pair score over each face (one value
    per window; positive: it made them look different, negative: alike; twins/explain.py)."""
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
            feat = out[f"feat_{branch}"] = torch.cat([enc[branch][i], enc[branch][j]]).to(dev)
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
