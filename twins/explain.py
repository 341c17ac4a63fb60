"""What tells two faces apart, or makes them alike: occlusion maps of the pair score.

For a pair (A, B) each window of A's patch tokens is left out in turn (dropped from the sequence: the
ViT's natural occlusion, no replacement value it never saw), A is embedded again, and the change of
the pair score (what `verify` thresholds) is the window's value; the same for B against A. Positive:
it made them look different (dissimilarity); negative: alike (similarity). Occlusion maps of the
verification score follow Knoche et al. (WACV workshops 2023).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from fastprogress.fastprogress import progress_bar

from .metrics import protocol_scores
from .model import DCAL, as_input, embed_images, encode_all, mixed_precision
from .viz import maps_of, plot_summary

if TYPE_CHECKING:  # a type only: the maps need no data module (callbacks -> explain stays shallow)
    from .data import Split

GRID = 14  # about this many windows per side: 1 patch per window at 64 px / 8, 2 x 2 patches at 448 / 16


def window_size(model: DCAL) -> int:
    """Patches per window side, so that an image has about GRID x GRID windows."""
    return max(1, model.vit.patch_embed.grid_size[0] // GRID)


def windows(model: DCAL) -> list[torch.Tensor]:
    """Patch indices (row-major, without the class token) of each window, windows row-major."""
    gh, gw = model.vit.patch_embed.grid_size
    w = window_size(model)
    return [torch.tensor([r * gw + c for r in range(i, min(i + w, gh)) for c in range(j, min(j + w, gw))])
            for i in range(0, gh, w) for j in range(0, gw, w)]


def score(model: DCAL, tokens: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """The pair score of each token sequence against its row of embeddings `others`: the encoding in
    the caller's precision, the embedding and the cosine in fp32 (in fp16 a window's effect is about
    one rounding step of a cosine near 1)."""
    out = model.encode_tokens(tokens)
    with torch.autocast(tokens.device.type, enabled=False):
        return (model.embedding({k: out[k].float() for k in ("sa", "glca") if k in out}) * others.float()).sum(-1)


@torch.no_grad()
def occlusion_maps(model: DCAL, images: torch.Tensor, others: torch.Tensor, bs: int = 64) -> torch.Tensor:
    """(faces, windows high, windows wide): how much the score of each face `images[f]` (in [0, 1],
    on the model's device) against the embedding `others[f]` rises when each window is left out. The
    left-out sequences of all faces are batched together, `bs` per forward pass, in the caller's
    precision (`pair_maps`: training's); the scores in fp32."""
    model.eval()
    dev = images.device
    gh, gw = model.vit.patch_embed.grid_size
    w = window_size(model)
    wins = windows(model)
    by_size = {}  # edge windows can be smaller: one batch holds sequences of one length
    for i, win in enumerate(wins):
        by_size.setdefault(len(win), []).append(i)
    tokens = torch.cat([model.tokens(images[k:k + bs]) for k in range(0, len(images), bs)])  # with position embeddings
    others = others.to(dev)
    base = torch.cat([score(model, tokens[k:k + bs], others[k:k + bs]) for k in range(0, len(images), bs)])
    delta = torch.empty(len(images), len(wins))
    for group in by_size.values():
        keep = torch.ones(len(group), 1 + gh * gw, dtype=torch.bool)
        for row, i in enumerate(group):
            keep[row, 1 + wins[i]] = False
        pos = keep.nonzero()[:, 1].view(len(group), -1).to(dev)  # the tokens each sequence keeps
        face, win = (t.flatten() for t in torch.meshgrid(torch.arange(len(images)), torch.arange(len(group)),
                                                         indexing="ij"))
        for k in range(0, len(face), bs):
            f, g = face[k:k + bs], win[k:k + bs]
            seq = tokens[f].gather(1, pos[g][..., None].expand(-1, -1, tokens.shape[-1]))
            delta[f, torch.tensor(group)[g]] = (score(model, seq, others[f]) - base[f]).cpu()
    return delta.view(len(images), math.ceil(gh / w), math.ceil(gw / w))


def pair_maps(model: DCAL, images: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(score, map of A, map of B) for a pair of uint8 images (2, 3, H, W), in the precision of `verify`."""
    x = as_input(model, images)
    emb = model.embedding(encode_all(model, images)).to(x.device)
    with mixed_precision(x.device):
        maps = occlusion_maps(model, x, emb[[1, 0]])
    return float(emb[0] @ emb[1]), maps[0], maps[1]


def pair_rows(model: DCAL, split: Split, cache: torch.Tensor, pairs, threshold: float, losses=None) -> list[dict]:
    """Rows for `viz.plot_pairs`, one per image pair (a, b) of `split`: both faces with the rollout
    heatmap and GLCA tokens, the score and verdict at `threshold`, the truth (a split without twin
    pairs, one given pair, has none), the loss when given, and the occlusion maps that explain the verdict."""
    rows = []
    for k, (a, b) in enumerate(pairs):
        enc = encode_all(model, cache[[a, b]])  # the rollout and GLCA tokens
        score, delta_a, delta_b = pair_maps(model, cache[[a, b]])
        (heat_a, mask_a), (heat_b, mask_b) = maps_of(model, enc, 0), maps_of(model, enc, 1)
        row = dict(img_a=cache[a].permute(1, 2, 0).numpy() / 255, img_b=cache[b].permute(1, 2, 0).numpy() / 255,
                   heat_a=heat_a, heat_b=heat_b, mask_a=mask_a, mask_b=mask_b, score=score, same=score >= threshold,
                   delta_a=delta_a, delta_b=delta_b,
                   caption_a=f"{split.ids[split.person[a]]}  {split.paths[a].name}",
                   caption_b=f"{split.ids[split.person[b]]}  {split.paths[b].name}\ncos {score:.3f}: "
                             f"{'same' if score >= threshold else 'different'} (threshold {threshold:.3f})")
        if split.twin_pairs:
            row["caption_b"] += "; truth: " + ("same" if split.person[a] == split.person[b] else "twins")
        if losses is not None:
            row["caption_b"] += f", loss {losses[k]:.2f}"
        rows.append(row)
    return rows


# The pair-map summary over a split: faces are landmark-aligned crops, so one window is one place on
# the face in every photo, and the maps of many pairs can be averaged.
SUMMARY_PAIRS = 100  # pairs of each kind by default: about 5 minutes on a T4 at 448 (an estimate: PLAN, Q3)
KINDS = {  # kind: (the pairs, the side of their maps that explains the verdict, what the mean shows)
    "differ": ("twin pairs rejected", 1.0, "where twins differ for this model"),
    "fooled": ("twin pairs accepted", -1.0, "what fooled it"),
    "same": ("genuine pairs accepted", -1.0, "what stays the same for one person"),
}


def summary_pairs(scores: np.ndarray, genuine: np.ndarray, threshold: float, n: int,
                  seed: int) -> dict[str, tuple[np.ndarray, int]]:
    """For each kind, up to `n` of its pairs (indices into the pair list, sorted: a reproducible
    sample) and how many pairs of that kind the split has."""
    rng = np.random.default_rng(seed)
    kinds = {"differ": ~genuine & (scores < threshold), "fooled": ~genuine & (scores >= threshold),
             "same": genuine & (scores >= threshold)}
    return {k: (np.sort(rng.permutation(np.flatnonzero(m))[:n]), int(m.sum())) for k, m in kinds.items()}


def pair_share(delta_a: torch.Tensor, delta_b: torch.Tensor, sign: float) -> torch.Tensor | None:
    """One pair's part in a summary: the side `sign` of both faces' maps (+1: dissimilarity, -1:
    similarity), added over the two faces and scaled to sum 1, so that every pair weighs the same;
    None when no window moved the score that way."""
    part = (sign * delta_a).clamp(min=0) + (sign * delta_b).clamp(min=0)
    total = part.sum()
    return part / total if total > 0 else None


def summary_map(model: DCAL, cache: torch.Tensor, pairs: np.ndarray, sign: float) -> tuple[torch.Tensor | None, int]:
    """The mean `pair_share` of image `pairs` (their `pair_maps`, as `explain()` draws them), and how
    many pairs it counts."""
    shown = progress_bar(pairs, leave=False) if sys.stdout.isatty() and len(pairs) > 1 else pairs
    shares = [pair_share(*pair_maps(model, cache[list(p)])[1:], sign) for p in shown]
    shares = [x for x in shares if x is not None]
    return (torch.stack(shares).mean(0) if shares else None), len(shares)


def write_summary(model: DCAL, split: Split, cache: torch.Tensor, threshold: float, n: int, seed: int,
                  stem: Path, name: str) -> dict:
    """The pair-map summary of the split called `name`, up to `n` pairs of each kind: `stem.png` (three
    panels over the mean faces) and `stem.json` (the numbers and maps); returns what the JSON holds."""
    t = time.time()
    scores, genuine, pairs = protocol_scores(embed_images(model, cache), split.person, split.twin_pairs)
    report = {"split": name, "threshold": threshold, "pairs_per_kind": n, "kinds": {}}
    panels = []
    for kind, (picked, in_split) in summary_pairs(scores, genuine, threshold, n, seed).items():
        what, sign, meaning = KINDS[kind]
        mean, used = summary_map(model, cache, pairs[picked], sign)
        faces = cache[np.unique(pairs[picked])]
        face = faces.float().mean(0).permute(1, 2, 0).numpy() / 255 if len(faces) else np.full((*cache.shape[2:], 3), 0.5)
        panels.append({"face": face, "map": mean, "sign": sign, "title": f"{what}: {used} of {in_split}\n{meaning}"})
        report["kinds"][kind] = {"pairs": what, "meaning": meaning, "in_split": in_split, "sampled": len(picked),
                                 "counted": used, "map": None if mean is None else mean.tolist()}
        print(f"{what}: {used} of {in_split} averaged, {meaning}")
    report["seconds"] = time.time() - t
    plot_summary(panels, stem.with_suffix(".png"), f"{name} pairs: occlusion maps of the pair score, averaged "
                 f"(threshold {threshold:.3f})")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(f"Pair-map summary of the {name} pairs: {stem}.png and .json in {report['seconds']:.1f} s")
    return report
