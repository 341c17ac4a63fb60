"""Heatmaps over the face: the class-token rollout with the GLCA-selected patches marked, and the
pair-score occlusion maps that explain a verdict; the ROC figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def maps_of(model, enc: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image `i`'s rollout heatmap and GLCA-selected mask, both (gh, gw), from `model.encode_all` output."""
    gh, gw = model.vit.patch_embed.grid_size
    if "rollout" not in enc:  # a model trained without GLCA has neither
        return torch.ones(gh, gw), torch.zeros(gh, gw)
    mask = torch.zeros(gh * gw).scatter_(0, enc["selected"][i], 1.0)
    return enc["rollout"][i].view(gh, gw), mask.view(gh, gw)


def overlay(ax, img: np.ndarray, heat: torch.Tensor, mask: torch.Tensor, title: str, cmap: str = "jet"):
    """Draw `img` (H, W, 3 in [0, 1]) with a heatmap and the outlines of the cells `mask` marks."""
    h, w = img.shape[:2]
    heat = F.interpolate(heat[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    ax.imshow(img)
    ax.imshow(heat.numpy(), cmap=cmap, alpha=0.45)
    gh, gw = mask.shape
    ys, xs = np.nonzero(mask.numpy())
    for y, x in zip(ys, xs):
        ax.add_patch(plt.Rectangle((x * w / gw, y * h / gh), w / gw, h / gh, fill=False, lw=0.6, ec="white"))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def verdict_map(delta: torch.Tensor, same: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """From an occlusion map of the pair score (twins/explain.py) to what explains the verdict: the
    similarity part for "same" (regions whose removal lowers the score), the dissimilarity part for
    "different" (removal raises it); with the strongest window marked, and a title."""
    part = (-delta if same else delta).clamp(min=0)
    top = torch.zeros_like(part).flatten()
    top[int(part.argmax())] = 1.0
    return part, top.view_as(part), "made them alike" if same else "made them differ"


def plot_pairs(rows: list[dict], path: Path | None = None, title: str = ""):
    """One row per pair (`explain.pair_rows`): each face with its rollout heatmap and GLCA mask (outer
    columns) and the part of its occlusion map that explains the verdict `same` (inner columns)."""
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3.2 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        overlay(ax_row[0], r["img_a"], r["heat_a"], r["mask_a"], r["caption_a"])
        overlay(ax_row[-1], r["img_b"], r["heat_b"], r["mask_b"], r["caption_b"])
        for ax, img, delta, who in ((ax_row[1], r["img_a"], r["delta_a"], "A"), (ax_row[2], r["img_b"], r["delta_b"], "B")):
            heat, top, what = verdict_map(delta, r["same"])
            overlay(ax, img, heat, top, f"{who}: what {what}", cmap="Reds" if not r["same"] else "Greens")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.2 * len(rows))) if title else None)
    if path is not None:
        save(fig, path)
    return fig


def save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(far: np.ndarray, tar: np.ndarray, report: dict, path: Path) -> None:
    """The twins-only ROC curve of a test report, saved as PNG."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(far, tar, label=f"DCAL  AUC {report['auc']:.3f}  EER {100 * report['eer']:.1f}%")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="FAR (twin impostors accepted)", ylabel="TAR (genuine accepted)",
           title=f"Twins-only test ROC ({report['n_genuine']} genuine / {report['n_impostor']} twin pairs)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save(fig, path)


def plot_summary(panels: list[dict], path: Path, title: str) -> None:
    """Side by side, each panel's mean map over its mean face (keys: face (H, W, 3) in [0, 1], map
    (rows, cols) or None, title), each with its own colour scale: the share of each pair's map."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        h, w = p["face"].shape[:2]
        ax.imshow(p["face"])
        if p["map"] is not None:
            heat = F.interpolate(p["map"][None, None].float(), size=(h, w), mode="nearest")[0, 0]
            shown = ax.imshow(heat.numpy(), cmap="Reds" if p["sign"] > 0 else "Greens", alpha=0.55, vmin=0)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).set_label(
                f"share of each pair's {'dissimilarity' if p['sign'] > 0 else 'similarity'}", fontsize=7)
        ax.set_title(p["title"], fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)
