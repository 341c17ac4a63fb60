"""Embedding a split's cached images, the verification threshold, and the twins-only test report."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from sklearn.metrics import roc_curve

from .data import Split, TwinData
from .distributed import gather, is_main, rank, world
from .metrics import protocol_scores, verification_report
from .model import DCAL, encode_all
from .viz import plot_roc


def embed_images(model: DCAL, cache: torch.Tensor) -> torch.Tensor:
    """The verification embedding of every cached image, in image order. With several processes
    each embeds a contiguous part and the parts are gathered, in process order."""
    per = -(-len(cache) // world())
    part = model.embedding(encode_all(model, cache[rank() * per:(rank() + 1) * per]))
    return torch.cat(gather(part))


def split_report(model: DCAL, split: Split, cache: torch.Tensor, threshold: float | None = None):
    """(twins-only report, scores, is_genuine, image pairs) of one split."""
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
    threshold; the training twins' when there is no validation split). Writes `test_report.json` and
    `roc.png` to `out` (the main process); returns the report. Every process calls it."""
    has_valid = data.valid is not None
    chosen, source, rep = choose_threshold(model, data.valid if has_valid else data.train,
                                           data.caches["valid" if has_valid else "train"], has_valid)
    test, scores, genuine, _ = split_report(model, data.test, data.caches["test"], chosen)
    test["threshold_source"] = source
    test["accuracy_at_test_eer_threshold"] = verification_report(scores, genuine)["accuracy"]  # best-on-test, reference only
    report = {"test": test, "valid": rep if has_valid else None}
    if not is_main():
        return report
    out.mkdir(parents=True, exist_ok=True)
    (out / "test_report.json").write_text(json.dumps(report, indent=2))
    far, tar, _ = roc_curve(genuine, scores)
    plot_roc(far, tar, test, out / "roc.png")
    return report
