"""Inference from a checkpoint or an exported learner: the portable `.pkl`, `verify`, per-pair losses
and the top-loss twin pairs with their attention heatmaps. No W&B here: `verify()` runs without wandb."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.data.transforms import IntToFloatTensor
from fastai.learner import Learner, load_learner
from fasttransform import Pipeline

from .checkpoint import check_classes
from .data import PairDL, Split, TwinPairs, build_cache, load_faces, normalizer, prepare_data
from .errors import CheckpointError, DataError
from .evaluate import choose_threshold, embed_images
from .loss import DCALLoss
from .model import device, encode_all
from .metrics import protocol_scores
from .explain import pair_maps
from .settings import Settings
from .viz import maps_of


def load_split(s: Settings, split: str, classes: list[str], data: str | None = None,
               data_root: str | None = None) -> Split:
    """One split of the run's data ('train', 'valid' or 'test'; the validation families the run held
    out), with the JSON folder or image folder moved when given. The data must give the training ids
    `classes` of the run (else the held-out families would not be the ones it held out)."""
    prepared = prepare_data(replace(s, data=data or s.data, data_root=data_root or s.data_root))
    check_classes({"classes": classes}, list(prepared.classes), "this model")
    found = getattr(prepared, split)
    if found is None:
        raise DataError("this run had no validation split (--valid-pct 0)")
    return found


def validation_threshold(model, s: Settings, classes: list[str], data: str | None = None,
                         data_root: str | None = None):
    """The verification threshold as training chose it: the EER threshold on the validation twins
    (on the training twins, flagged, when the run had no validation split)."""
    has_valid = s.valid_pct > 0
    split = load_split(s, "valid" if has_valid else "train", classes, data, data_root)
    threshold, source, _ = choose_threshold(model, split, build_cache(split.paths, s.size, "threshold images"), has_valid)
    return threshold, source


def inference_learner(model, s: Settings, ckpt: dict, ckpt_path: Path, threshold: float, source: str) -> Learner:
    """A Learner holding only what inference needs: the model, the loss, empty loaders with the
    normalisation, and the run's settings, training ids, verification threshold and origin."""
    dc = model.data_config
    empty = TwinPairs.empty(s.size)
    tfms = Pipeline([IntToFloatTensor(), normalizer(dc["mean"], dc["std"])], split_idx=1)
    dls = DataLoaders(PairDL(empty, bs=1, after_batch=tfms), PairDL(empty, bs=1, after_batch=tfms))
    learn = Learner(dls, model, loss_func=DCALLoss())
    learn.twins = {"settings": s, "classes": ckpt["classes"], "epoch": ckpt["epoch"], "threshold": threshold,
                   "threshold_source": source, "checkpoint": str(ckpt_path), "run_id": ckpt["plan"]["run_id"]}
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


def explain(learn: Learner, img_a, img_b) -> dict:
    """`verify` plus why (paths or PIL images): `map_a`, `map_b` are occlusion maps of the pair score,
    one value per window of patches, row-major over the face (twins/explain.py). Positive: without that
    region the two faces would score more alike, so it made them look different (dissimilarity);
    negative: it made them look alike (similarity)."""
    score, map_a, map_b = pair_maps(learn.model, load_faces([img_a, img_b], learn.twins["settings"].size))
    t = learn.twins["threshold"]
    return {"score": score, "same": score >= t, "threshold": t, "map_a": map_a, "map_b": map_b}


def verify(learn: Learner, img_a, img_b) -> dict:
    """Score one pair (paths or PIL images): cosine of the DCAL embeddings (SA + GLCA), the decision
    at the threshold chosen on validation, and the threshold."""
    size = learn.twins["settings"].size
    emb = embed_images(learn.model, load_faces([img_a, img_b], size))
    score = float(emb[0] @ emb[1])
    return {"score": score, "same": score >= learn.twins["threshold"], "threshold": learn.twins["threshold"]}


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
    """The k twin-impostor pairs and the k genuine pairs with the highest loss: (encodings, scores,
    is_genuine, image pairs, losses, {"impostor": indices, "genuine": indices} into those pairs)."""
    enc = encode_all(model, cache)
    emb = model.embedding(enc)
    scores, genuine, pairs = protocol_scores(emb, split.person, split.twin_pairs)
    losses = pair_losses(model, enc, pairs, genuine)
    picks = {}
    for name, mask in (("impostor", ~genuine), ("genuine", genuine)):
        idx = np.flatnonzero(mask)
        picks[name] = idx[np.argsort(-losses[idx], kind="stable")[:k]]
    return enc, scores, genuine, pairs, losses, picks


def figure_rows(model, split: Split, cache: torch.Tensor, enc: dict, pairs, scores, genuine, losses, threshold):
    """Rows for `viz.plot_pairs`: both faces with rollout heatmap and GLCA tokens, the occlusion maps that
    explain the verdict, score, threshold, truth."""
    rows = []
    for (a, b), s, g, l in zip(pairs, scores, genuine, losses):
        (heat_a, mask_a), (heat_b, mask_b) = maps_of(model, enc, a), maps_of(model, enc, b)
        _, delta_a, delta_b = pair_maps(model, cache[[a, b]])
        verdict = "same" if s >= threshold else "different"
        truth = "same person" if g else "twins"
        rows.append(dict(img_a=cache[a].permute(1, 2, 0).numpy() / 255, img_b=cache[b].permute(1, 2, 0).numpy() / 255,
                         heat_a=heat_a, heat_b=heat_b, mask_a=mask_a, mask_b=mask_b, delta_a=delta_a,
                         delta_b=delta_b, same=bool(s >= threshold),
                         caption_a=f"{split.ids[split.person[a]]}  {split.paths[a].name}\n"
                                   f"cos {s:.3f}, threshold {threshold:.3f}",
                         caption_b=f"{split.ids[split.person[b]]}  {split.paths[b].name}\n"
                                   f"says {verdict}; truth: {truth}; loss {l:.2f}"))
    return rows


def single_pair(paths: list[str], size: int) -> tuple[Split, torch.Tensor]:
    """A two-image 'split' for the one-pair mode."""
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"image {p} " + ("is a folder: give an image file" if Path(p).is_dir() else "does not exist"))
    return Split(["image 1", "image 2"], [Path(p) for p in paths], np.array([0, 1]), []), load_faces(paths, size)
