"""Embedding a split's cached images, and the twins-only test report."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from sklearn.metrics import roc_curve

from .data import TwinData
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


def evaluate(model: DCAL, data: TwinData, out: Path, valid: dict) -> dict:
    """Test on the twins-only protocol, at the threshold the last validation chose (`valid`: its report;
    the EER threshold of the validation twins, never the test's). Writes `test_report.json` and
    `roc.png` to `out` (the main process); returns the report. Every process calls it."""
    scores, genuine, _ = protocol_scores(embed_images(model, data.caches["test"]), data.test.person,
                                         data.test.twin_pairs)
    test = verification_report(scores, genuine, valid["eer_threshold"])
    test["accuracy_at_test_eer_threshold"] = verification_report(scores, genuine)["accuracy"]  # best-on-test, reference only
    report = {"test": test, "valid": valid}
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "test_report.json").write_text(json.dumps(report, indent=2))
        far, tar, _ = roc_curve(genuine, scores)
        plot_roc(far, tar, test, out / "roc.png")
    return report
