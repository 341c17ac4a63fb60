"""Twins-only verification metrics: genuine pairs (two images of one person) against twin-impostor
pairs (a person and their own twin); other impostors are never counted."""
from __future__ import annotations

import numpy as np
import torch
from fastai.learner import Metric
from sklearn.metrics import roc_auc_score, roc_curve

FARS = (0.01, 0.001)


def protocol_scores(emb: torch.Tensor, person: np.ndarray, twin_pairs: list[tuple[int, int]]):
    """Cosine scores of every genuine pair and every twin-impostor pair, in fp32 (under autocast too).
    Returns (scores, is_genuine, (i, j) image indices of each pair)."""
    emb = emb.float()
    scores, labels, index = [], [], []
    groups = {p: np.flatnonzero(person == p) for p in np.unique(person)}
    with torch.autocast(emb.device.type, enabled=False):
        for idx in groups.values():
            i, j = np.triu_indices(len(idx), 1)
            s = emb[idx] @ emb[idx].T
            scores.append(s[i, j].numpy()), labels.append(np.ones(len(i), bool)), index.append(np.stack([idx[i], idx[j]], 1))
        for a, b in twin_pairs:
            ia, ib = groups[a], groups[b]
            s = (emb[ia] @ emb[ib].T).numpy()
            scores.append(s.ravel()), labels.append(np.zeros(s.size, bool))
            index.append(np.stack(np.meshgrid(ia, ib, indexing="ij"), -1).reshape(-1, 2))
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(index)


def equal_error(scores: np.ndarray, genuine: np.ndarray) -> tuple[float, float]:
    """EER and its threshold, linearly interpolated where FAR and FRR cross on the ROC."""
    far, tar, thr = roc_curve(genuine, scores)
    frr = 1 - tar
    k = int(np.argmax(far >= frr))  # first ROC point where FAR has caught up with FRR
    if k == 0:
        return float(far[0]), float(thr[0])
    d0, d1 = frr[k - 1] - far[k - 1], frr[k] - far[k]  # d0 > 0 >= d1
    t = d0 / (d0 - d1)
    eer = far[k - 1] + t * (far[k] - far[k - 1])
    if not np.isfinite(thr[k - 1]):  # "accept nobody" (sklearn's first threshold is inf): the crossing's own
        return float(eer), float(thr[k])
    return float(eer), float(thr[k - 1] + t * (thr[k] - thr[k - 1]))


def verification_report(scores: np.ndarray, genuine: np.ndarray, threshold: float | None = None) -> dict:
    """EER, AUC, TAR at FAR 1% / 0.1% (where measurable) and accuracy at `threshold` (else the EER threshold)."""
    n_imp = int((~genuine).sum())
    eer, eer_thr = equal_error(scores, genuine)
    far, tar, _ = roc_curve(genuine, scores)
    rep = {"n_genuine": int(genuine.sum()), "n_impostor": n_imp, "eer": eer, "eer_threshold": eer_thr,
           "auc": float(roc_auc_score(genuine, scores))}
    for f in FARS:
        # measurable only if at least one impostor pair may lie above the threshold
        rep[f"tar@far={f:g}"] = float(np.interp(f, far, tar)) if n_imp * f >= 1 else None
    t = eer_thr if threshold is None else threshold
    accept = scores >= t
    rep.update(threshold=float(t), accuracy=float((accept == genuine).mean()),
               balanced_accuracy=float(0.5 * (accept[genuine].mean() + (~accept[~genuine]).mean())))
    return rep


class TwinsMetric(Metric):
    """One figure of the twins-only protocol on the validation set, for fastai's table and W&B; the whole
    report is kept as `learn.valid_report` (its EER threshold goes into the epoch's checkpoint). The
    validation loader yields every validation image once as an anchor, in image order; with several
    processes each batch is gathered, which keeps that order, and the last batch's padding is cut off."""

    def __init__(self, key: str, person: np.ndarray, twin_pairs: list[tuple[int, int]]):
        self.key, self.person, self.twin_pairs = key, person, twin_pairs

    @property
    def name(self):
        return f"valid_{self.key}"

    def reset(self):
        self.embs = []

    def accumulate(self, learn):
        self.embs.append(learn.to_detach(learn.pred["emb_a"]).float())  # gathered across processes
        self.learn = learn

    @property
    def value(self):
        emb = torch.cat(self.embs)
        n = len(self.person)
        if not n <= len(emb) < n + self.learn.plan.processes:  # several processes: at most processes-1 repeats
            return None
        self.learn.valid_report = verification_report(*protocol_scores(emb[:n], self.person, self.twin_pairs)[:2])
        return self.learn.valid_report[self.key]

