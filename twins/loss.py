"""The DCAL loss for twin verification: per branch an identity loss over the training ids (CosFace
on the class token) plus, for SA and GLCA, a pair loss in which the twin is the negative; balanced by
learned uncertainty weights (Kendall et al.): L = 0.5 * sum_i (exp(-w_i) L_i + w_i)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BRANCHES = ("sa", "glca", "pwca")


class DCALLoss(nn.Module):
    """`loss(out, same, id_a, id_b)`. Ids < 0 (people not among the training classes: validation and
    test people) contribute no identity loss. `reduction='none'` gives one loss per pair."""

    def __init__(self, scale: float = 16.0, margin: float = 0.2, reduction: str = "mean"):
        super().__init__()
        self.scale, self.margin, self.reduction = scale, margin, reduction
        self.last: dict[str, torch.Tensor] = {}

    def identity(self, cos: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CosFace per image, 0 where the id is unknown."""
        known = y >= 0
        target = F.one_hot(y.clamp(min=0), cos.shape[1]).to(cos.dtype) * known[:, None]
        ce = F.cross_entropy(self.scale * (cos - self.margin * target), y.clamp(min=0), reduction="none")
        return ce * known

    def pair(self, out: dict, branch: str, same: torch.Tensor) -> torch.Tensor:
        f = F.normalize(out[f"feat_{branch}"].float(), dim=-1)
        n = len(same)
        scale, bias = out["pair_logit"]
        logit = scale * (f[:n] * f[n:]).sum(-1) + bias
        return F.binary_cross_entropy_with_logits(logit, same.float(), reduction="none")

    def forward(self, out: dict, same: torch.Tensor, id_a: torch.Tensor, id_b: torch.Tensor) -> torch.Tensor:
        y, n = torch.cat([id_a, id_b]), len(same)
        w = out["log_vars"]
        total, parts = 0.0, {}
        for i, branch in enumerate(BRANCHES):
            if branch not in out:
                continue
            ident = self.identity(out[branch].float(), y)
            branch_loss = 0.5 * (ident[:n] + ident[n:])
            if branch != "pwca":
                branch_loss = branch_loss + self.pair(out, branch, same)
            parts[branch] = branch_loss
            total = total + 0.5 * (torch.exp(-w[i]) * branch_loss + w[i])
        # kept detached for logging (no GPU sync here)
        self.last = {f"loss_{k}": v.detach().mean() for k, v in parts.items()}
        self.last.update({f"w_{b}": w[i].detach() for i, b in enumerate(BRANCHES) if b in parts})
        return total.mean() if self.reduction == "mean" else total.sum() if self.reduction == "sum" else total
