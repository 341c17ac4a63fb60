"""Pair maps: the occlusion map of the pair score is what it says it is."""
import matplotlib
import numpy as np
import pytest
import torch

from twins.explain import occlusion_map, pair_maps, window_size, windows
from twins.model import DCAL
from twins.viz import plot_pairs, verdict_map

matplotlib.use("Agg")


def reference_delta(model, image, other, patches, precision):
    """The score change when `patches` are left out, written out token by token: each sequence encoded
    in `precision` (an autocast context), its embedding and score in fp32."""
    def score(tokens):
        with precision:
            out = model.encode_tokens(tokens)
        return model.embedding({k: out[k].float() for k in ("sa", "glca")})[0] @ other
    with torch.no_grad():
        with precision:
            tokens = model.tokens(image[None])
        keep = [0] + [1 + p for p in range(tokens.shape[1] - 1) if p not in patches]
        return float(score(tokens[:, keep]) - score(tokens))


# 116 / 4 = 29 patches: edge windows of 1. With CPU bf16 autocast (on a GPU: fp16) the encodings run in
# the low precision, the scores still in fp32 (bf16 on this CPU is slow: the small case only).
@pytest.mark.parametrize("size, patch, window, grid, autocast", [(32, 8, 1, 4, False), (116, 4, 2, 15, False),
                                                                 (32, 8, 1, 4, True)])
def test_each_value_is_the_score_change_when_its_window_is_left_out(size, patch, window, grid, autocast):
    torch.manual_seed(0)
    model = DCAL("test_vit", 5, size, pretrained=False, top_r=0.25, patch_size=patch).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        other = model.embed(x[1:])[0]
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with precision:
        delta = occlusion_map(model, x[0], other)
    assert window_size(model) == window and delta.shape == (grid, grid)
    n = model.vit.patch_embed.grid_size[1]
    for r, c in ((1, 2), (2, 1), (grid - 1, grid - 1)):  # rows and columns not swapped; the edge window too
        patches = {p for p in range(n * n) if p // n // window == r and p % n // window == c}
        # scores in bf16 would be off by their rounding step near a cosine of 1 (about 2e-3)
        assert delta[r, c].item() == pytest.approx(reference_delta(model, x[0], other, patches, precision), abs=1e-5)
    assert sum(len(w) for w in windows(model)) == n * n  # every patch in exactly one window


def test_a_face_against_itself_only_loses_by_occlusion_and_the_verdict_map_follows_the_sign():
    torch.manual_seed(1)
    model = DCAL("test_vit", 5, 32, pretrained=False, top_r=0.25, patch_size=8).eval()
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    score, delta_a, delta_b = pair_maps(model, torch.cat([img, img]))
    assert score == pytest.approx(1.0, abs=1e-5)
    assert (delta_a <= 1e-5).all() and torch.allclose(delta_a, delta_b, atol=1e-6)  # removing anything makes it less itself
    alike, top, what = verdict_map(delta_a, same=True)
    assert what == "made them alike" and (alike >= 0).all() and top.sum() == 1
    assert top.flatten().argmax() == (-delta_a).flatten().argmax()
    differ, top, what = verdict_map(delta_a, same=False)
    assert what == "made them differ" and torch.equal(differ, delta_a.clamp(min=0))
    row = dict(img_a=np.zeros((32, 32, 3)), img_b=np.zeros((32, 32, 3)), heat_a=torch.rand(4, 4),
               heat_b=torch.rand(4, 4), mask_a=torch.zeros(4, 4), mask_b=torch.zeros(4, 4), caption_a="a",
               caption_b="b", delta_a=delta_a, delta_b=delta_b, same=True)
    assert len(plot_pairs([row, row]).axes) == 8  # rollout, map, map, rollout for each pair
