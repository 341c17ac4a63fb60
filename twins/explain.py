"""What tells two faces apart, or makes them alike: occlusion maps of the pair score.

For a pair (A, B) each window of A's patch tokens is left out in turn (dropped from the token
sequence, so the ViT never sees a replacement value it was not trained on), A is embedded again, and
the change of the pair score (the cosine of the verification embeddings, what `verify` thresholds)
is the window's value; the same for B against A. Positive: without that region the faces score more
alike, so it is what made them look different (the dissimilarity map). Negative: it made them look
alike (the similarity map). Occlusion maps of the verification score follow Knoche et al. (WACV
workshops 2023); dropping tokens instead of painting patches is the ViT's natural occlusion.
"""
from __future__ import annotations

import math

import torch

from .model import DCAL, encode_all, mixed_precision, normalise

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


def score(model: DCAL, tokens: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The pair score of each token sequence against the embedding `other`: the encoding in the
    caller's precision, the embedding and the cosine in fp32 (in fp16 a window's effect is about one
    rounding step of a cosine near 1)."""
    out = model.encode_tokens(tokens)
    with torch.autocast(tokens.device.type, enabled=False):
        return model.embedding({k: out[k].float() for k in ("sa", "glca") if k in out}) @ other.float()


@torch.no_grad()
def occlusion_map(model: DCAL, image: torch.Tensor, other: torch.Tensor, bs: int = 64) -> torch.Tensor:
    """(windows high, windows wide): how much the score of `image` (a normalised (3, H, W) tensor on the
    model's device) against the embedding `other` rises when each window is left out; batched. The
    encodings run in the caller's precision (`pair_maps`: training's), the scores in fp32."""
    model.eval()
    dev = image.device
    gh, gw = model.vit.patch_embed.grid_size
    w = window_size(model)
    wins = windows(model)
    by_size = {}  # edge windows can be smaller: one batch holds sequences of one length
    for i, win in enumerate(wins):
        by_size.setdefault(len(win), []).append(i)
    delta = torch.empty(len(wins))
    tokens = model.tokens(image[None])  # (1, 1 + N, C) with position embeddings
    base = score(model, tokens, other)
    for group in by_size.values():
        for part in (group[k:k + bs] for k in range(0, len(group), bs)):
            keep = torch.ones(len(part), 1 + gh * gw, dtype=torch.bool)
            for row, i in enumerate(part):
                keep[row, 1 + wins[i]] = False
            pos = keep.nonzero()[:, 1].view(len(part), -1).to(dev)
            seq = tokens.expand(len(part), -1, -1).gather(1, pos[..., None].expand(-1, -1, tokens.shape[-1]))
            delta[part] = (score(model, seq, other) - base).cpu()
    return delta.view(math.ceil(gh / w), math.ceil(gw / w))


def pair_maps(model: DCAL, images: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(score, map of A, map of B) for a pair of uint8 images (2, 3, H, W), in the precision of `verify`."""
    x = normalise(model, images)
    emb = model.embedding(encode_all(model, images)).to(x.device)
    with mixed_precision(x.device):
        maps = occlusion_map(model, x[0], emb[1]), occlusion_map(model, x[1], emb[0])
    return float(emb[0] @ emb[1]), *maps
