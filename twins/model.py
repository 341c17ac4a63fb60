"""DCAL (Zhu et al., CVPR 2022) on a timm ViT, adapted to twin verification.

- SA: the timm blocks themselves (their pretrained weights load unchanged).
- Rollout: the class-token row of prod_l (0.5 S_l + 0.5 I), head-mean, no gradient, as a vector
  through the layers (the per-layer head-mean maps are kept without gradient; no N^3 chain).
- GLCA: one block, parallel to the last SA block (same input), initialised from it; queries = class
  token + top-R patch tokens by rollout, keys/values = all tokens; projection and FFN on the selected
  tokens only; its feature is the mean of all its query outputs (each query row of one attention
  block is independent, so a class-token-only feature would not depend on which patches were chosen).
- PWCA (training only): every block with the SA weights; each image's queries attend over its own
  keys/values concatenated with its partner's from the partner's SA stream (detached), one softmax.
- Embedding: concat(SA class token, GLCA feature), L2-normalised; pair score = cosine.
The model takes images in [0, 1] and normalises them with its backbone's own mean and std (the one
place that does: loaders, inference and the pair maps all feed it [0, 1] images).
All attention for forward and backward runs through the fused `scaled_dot_product_attention`
kernel (unless a block's `attn.fused_attn` is False: the explicit-softmax reference path).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, checkpoint_filter_fn  # also where timm < 1.0.19 defines them
from torch import nn

from .errors import TwinsError


def split_heads(attn: Attention, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Project `x` (B, N, C) with a slice of the qkv weights and split heads -> (B, H, N, d)."""
    B, N, _ = x.shape
    return F.linear(x, weight, bias).reshape(B, N, -1, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)


def qkv_heads(attn: Attention, x: torch.Tensor):
    q, k, v = split_heads(attn, x, attn.qkv.weight, attn.qkv.bias).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           probs: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (or `probs` v, when the attention is already computed), then merge
    heads and project: (B, H, M, d) -> (B, M, C)."""
    drop = attn.attn_drop.p if attn.training else 0.0
    if probs is not None:
        o = probs @ v
    elif attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    else:
        o = F.dropout((q * attn.scale @ k.transpose(-2, -1)).softmax(-1), drop, attn.training) @ v
    B, H, M, d = o.shape
    o = o.transpose(1, 2).reshape(B, M, H * d)
    norm = getattr(attn, "norm", None)  # timm >= 1.0.16: optional norm before the projection
    return attn.proj_drop(attn.proj(o if norm is None else norm(o)))


def block_tail(blk: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The residual, MLP and residual of a pre-norm timm Block, after its attention."""
    x = x + blk.drop_path1(blk.ls1(attn_out))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


@torch.no_grad()
def rollout_row(maps: list[torch.Tensor]) -> torch.Tensor:
    """Row 0 of S_hat = S_bar_L ... S_bar_1 with S_bar = 0.5 S + 0.5 I, as a vector (O(L N^2)), in fp32
    whatever the maps' dtype."""
    row = torch.zeros(maps[-1][:, 0].shape, device=maps[-1].device)
    row[:, 0] = 1.0
    with torch.autocast(row.device.type, enabled=False):  # bmm would be cast down again
        for S in reversed(maps):
            row = 0.5 * torch.bmm(row.unsqueeze(1), S.float()).squeeze(1) + 0.5 * row
    return row


def device() -> torch.device:
    """Where training and inference run: the GPU when there is one and this torch has kernels for it
    (`check_cuda_arch`, here so that every path to the GPU checks)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    check_cuda_arch()
    return torch.device("cuda")


def mixed_precision(dev: torch.device):
    """fp16 autocast on CUDA, as training's MixedPrecision; elsewhere the caller's precision, so that a
    test under CPU bf16 autocast runs the very lines that run in fp16 on a GPU. Scores (differences of
    cosines near 1) are taken outside, in fp32: matmul is on autocast's low-precision list."""
    return torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else nullcontext()


class CosineClassifier(nn.Module):
    """cos(feature, class centre) for every training id; the margin and scale live in the loss."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


class DCAL(nn.Module):
    """Siamese DCAL: `model(xa, xb)` -> dict of class-token features, identity cosines and embeddings."""

    def __init__(self, arch: str, n_classes: int, img_size: int, pretrained: bool = True, drop_path: float = 0.1,
                 top_r: float = 0.1, glca: bool = True, pwca: bool = True, patch_size: int | None = None,
                 weights: str | None = None):
        super().__init__()
        extra = {} if patch_size is None else {"patch_size": patch_size}
        try:
            self.vit = vit = timm.create_model(arch, pretrained=pretrained and not weights, num_classes=0,
                                               img_size=img_size, drop_path_rate=drop_path, **extra)
        except RuntimeError as e:  # timm's own word for an unknown model name or a bad argument
            if "huggingface_hub" in str(e):  # timm < 1.0.21 does not import huggingface_hub >= 1: it says "missing"
                raise TwinsError(f"timm {timm.__version__} cannot use this huggingface_hub to fetch the weights of "
                                 f"{arch}: pip install -U 'timm>=1.0.21' (or pass --weights FILE)") from None
            raise TwinsError(f"--arch {arch}: {e}") from None
        except Exception as e:  # only downloading the weights can fail otherwise (no Internet)
            if not pretrained:
                raise
            raise TwinsError(f"the pretrained weights of {arch} could not be downloaded ({type(e).__name__}): on Kaggle "
                             "switch the notebook's Internet on, or pass --weights FILE, or --no-pretrained") from None
        if pretrained and weights:  # timm's reading and key conversion of the file, then every tensor checked present
            try:  # timm's own pretrained path would load it non-strictly: a block missing from it would stay random
                loaded = timm.models.load_checkpoint(vit, weights, strict=False, filter_fn=checkpoint_filter_fn)
            except Exception as e:
                raise TwinsError(f"--weights {weights}: cannot load them into {arch} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'no such file'})") from None
            if loaded and loaded.missing_keys:  # (a .npz file goes through timm's own loader: None)
                raise TwinsError(f"--weights {weights} holds no tensor for {len(loaded.missing_keys)} of {arch}'s "
                                 f"({', '.join(loaded.missing_keys[:4])}, ...): the weights of another model?")
        patch = vit.patch_embed.patch_size[0]
        if img_size % patch:
            raise TwinsError(f"--size {img_size} is not a multiple of the patch size {patch} of {arch}: "
                             f"take --size {img_size // patch * patch or patch} or {(img_size // patch + 1) * patch}")
        if vit.cls_token is None or vit.num_prefix_tokens != 1 or not all(
                isinstance(b.attn, Attention) and getattr(b.attn, "gate", None) is None for b in vit.blocks):
            raise TwinsError(f"--arch {arch}: DCAL needs a timm ViT with one class token and plain attention "
                             "blocks (vit_*, deit_*)")
        self.use_glca, self.use_pwca = glca, pwca
        self.n_patches = vit.patch_embed.num_patches
        self.n_select = max(1, min(self.n_patches, round(top_r * self.n_patches)))
        dim = vit.embed_dim
        self.sa_head = CosineClassifier(dim, n_classes)
        if glca:
            self.glca_block = copy.deepcopy(vit.blocks[-1])
            self.glca_norm = copy.deepcopy(vit.norm)
            self.glca_head = CosineClassifier(dim, n_classes)
        # Loss parameters live here so that fastai's optimizer (built from the model) trains them:
        # uncertainty weights w_i of the SA, GLCA, PWCA losses, and the scale/bias of the pair logit.
        self.log_vars = nn.Parameter(torch.zeros(3))
        self.pair_logit = nn.Parameter(torch.tensor([10.0, -5.0]))
        dc = timm.data.resolve_data_config({}, model=vit)
        for k in ("mean", "std"):
            self.register_buffer(k, torch.tensor(dc[k]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_settings(cls, s, n_classes: int, pretrained: bool | None = None) -> "DCAL":
        """The model a run's `Settings` describe (`pretrained` overrides theirs)."""
        return cls(s.arch, n_classes, s.size, pretrained=s.pretrained if pretrained is None else pretrained,
                   drop_path=s.drop_path, top_r=s.top_r, glca=s.glca, pwca=s.pwca, patch_size=s.patch_size,
                   weights=s.weights)

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the token sequence (class token first) with position embeddings."""
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed((x - self.mean) / self.std))))

    def glca_forward(self, x: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GLCA on the last block's input `x`: class token + top-R patches by rollout `row` as queries
        against all tokens. Returns the GLCA feature (the mean of the R+1 outputs, after its norm) and the
        selected patch indices."""
        blk, attn = self.glca_block, self.glca_block.attn
        top = row[:, 1:].topk(min(self.n_select, row.shape[1] - 1), dim=1).indices + 1
        idx = torch.cat([torch.zeros_like(top[:, :1]), top], 1)
        h = blk.norm1(x)
        h_sel = h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        x_sel = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        C = attn.num_heads * attn.head_dim  # the width of q (timm >= 1.0.23 stores it as attn.attn_dim)
        bias = attn.qkv.bias
        q = attn.q_norm(split_heads(attn, h_sel, attn.qkv.weight[:C], None if bias is None else bias[:C])[0])
        k, v = split_heads(attn, h, attn.qkv.weight[C:], None if bias is None else bias[C:]).unbind(0)
        out = block_tail(blk, x_sel, attend(attn, q, attn.k_norm(k), v))
        return self.glca_norm(out).mean(1), top - 1

    def block(self, blk: nn.Module, x: torch.Tensor, x_pw: torch.Tensor | None, partner: torch.Tensor | None):
        """One SA block on the SA stream `x` and, when given, the PWCA stream `x_pw` with the same weights.
        Returns (x, x_pw, head-mean attention map of the SA stream or None without GLCA)."""
        n = len(x)
        h = blk.norm1(x if x_pw is None else torch.cat([x, x_pw]))
        q, k, val = qkv_heads(blk.attn, h)
        probs = S = None
        if self.use_glca:
            with torch.no_grad():
                probs = (q[:n] * blk.attn.scale @ k[:n].transpose(-2, -1)).softmax(-1)
            S = probs.mean(1).to(q.dtype)  # kept until the rollout: in the autocast dtype, half of fp32
            # with gradient, the fused kernel recomputes attention (no N x N kept for backward);
            # without, the probabilities just computed give the output at no extra cost
            probs = None if torch.is_grad_enabled() else probs
        if x_pw is not None:
            kd, vd = k[:n][partner].detach(), val[:n][partner].detach()
            pw = attend(blk.attn, q[n:], torch.cat([k[n:], kd], 2), torch.cat([val[n:], vd], 2))
            x_pw = block_tail(blk, x_pw, pw)
        return block_tail(blk, x, attend(blk.attn, q[:n], k[:n], val[:n], probs)), x_pw, S

    def encode(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> dict:
        """Run SA (+ PWCA when `partner` gives each image's partner index in the batch) and GLCA."""
        return self.encode_tokens(self.tokens(x), partner)

    def encode_tokens(self, x: torch.Tensor, partner: torch.Tensor | None = None) -> dict:
        """`encode` from the token sequence (class token first): patch tokens may have been left out
        (occlusion maps), the rest keep their position embeddings."""
        x_pw = x if partner is not None else None
        maps, last_in = [], x
        for blk in self.vit.blocks:
            last_in = x
            x, x_pw, S = self.block(blk, x, x_pw, partner)
            if S is not None:
                maps.append(S)
        out = {"sa": self.vit.norm(x)[:, 0]}
        if x_pw is not None:
            out["pwca"] = self.vit.norm(x_pw)[:, 0]
        if self.use_glca:
            row = rollout_row(maps)
            out["rollout"] = row[:, 1:]
            out["glca"], out["selected"] = self.glca_forward(last_in, row)
        return out

    def embedding(self, out: dict) -> torch.Tensor:
        parts = [F.normalize(out["sa"], dim=-1)] + ([F.normalize(out["glca"], dim=-1)] if "glca" in out else [])
        return F.normalize(torch.cat(parts, -1), dim=-1)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> dict:
        n = len(xa)
        partner = torch.arange(2 * n, device=xa.device).roll(n)  # a <-> b: each image's partner is the other
        out = self.encode(torch.cat([xa, xb]), partner if (self.training and self.use_pwca) else None)
        emb = self.embedding(out)
        res = {"sa": self.sa_head(out["sa"]), "feat_sa": out["sa"], "emb_a": emb[:n], "emb_b": emb[n:],
               "log_vars": self.log_vars, "pair_logit": self.pair_logit}
        if "glca" in out:
            res.update(glca=self.glca_head(out["glca"]), feat_glca=out["glca"])
        if "pwca" in out:
            res["pwca"] = self.sa_head(out["pwca"])  # PWCA shares the SA classifier, as it shares the blocks
        return res


def as_input(model: DCAL, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (n, 3, H, W) as the model's input, on its device: [0, 1]."""
    return images.to(next(model.parameters()).device).float() / 255


@torch.no_grad()
def encode_all(model: DCAL, cache: torch.Tensor, bs: int = 64) -> dict:
    """Every cached image through SA + GLCA (eval mode: no PWCA, no augmentation): class tokens,
    rollout, GLCA-selected patches, on the CPU."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":  # a model put on the GPU by the caller (load_learner(..., cpu=False))
        check_cuda_arch()
    model.eval()
    parts = []
    for i in range(0, len(cache), bs):
        with mixed_precision(dev):  # as training's evaluation; every output cast to fp32 for the scores
            out = model.encode(as_input(model, cache[i:i + bs]))
        parts.append({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in out.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def embed_images(model: DCAL, cache: torch.Tensor) -> torch.Tensor:
    """The verification embedding of every cached image, in image order."""
    return model.embedding(encode_all(model, cache))


# A CUDA 12.6 build (kernels for sm_50 to sm_90) in place of Kaggle's CUDA 12.8 one; explicit `+cu126`
# versions, since pip orders X+cu128 above X+cu126 (PEP 440). README's P100 cell is this line.
CU126_INSTALL = ("pip install torch==2.10.0+cu126 torchvision==0.25.0+cu126 "
                 "--index-url https://download.pytorch.org/whl/cu126")


def runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build with these `get_arch_list()` entries has kernels for a GPU of this
    capability: torch's own rule (`_check_cubins`: binary code `sm_XY` runs within its major version)
    and PTX (`compute_XY`), which the driver compiles for any GPU at or above XY."""
    cc = 10 * capability[0] + capability[1]
    versions = [(a.startswith("sm_"), int(a.split("_", 1)[1].rstrip("af"))) for a in arch_list]
    return not arch_list or any(v // 10 == capability[0] if binary else v <= cc for binary, v in versions)


def check_cuda_arch() -> None:
    """Stop early, with what to do, when this torch build has no kernels for the GPU (P100 = sm_60
    on Kaggle's CUDA 12.8 build), rather than at the first kernel."""
    if not torch.cuda.is_available() or runs_on(torch.cuda.get_device_capability(), torch.cuda.get_arch_list()):
        return
    capability = torch.cuda.get_device_capability()
    remedy = (f"install a CUDA 12.6 build first (a few minutes, no restart needed):\n  {CU126_INSTALL}\n"
              "or, on Kaggle, pick GPU T4 x2" if runs_on(capability, ["sm_50", "sm_60", "sm_70", "sm_80", "sm_90"])
              else "install a torch build whose arch list has it: https://pytorch.org/get-started/locally/")
    raise TwinsError(f"torch {torch.__version__} has no kernels for {torch.cuda.get_device_name()} (sm_"
                     f"{''.join(map(str, capability))}; it has {' '.join(torch.cuda.get_arch_list())}): " + remedy)
