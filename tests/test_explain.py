"""Pair maps: the occlusion map of the pair score is what it says it is."""
import matplotlib
import numpy as np
import pytest
import torch

from twins.explain import occlusion_map, pair_maps, window_size, windows
from twins.model import DCAL
from twins.viz import plot_pairs, verdict_map

matplotlib.use("Agg")


def reference_delta(model, image, other, patches):
    """The score change when `patches` are left out, written out token by token."""
    with torch.no_grad():
        tokens = model.tokens(image[None])
        base = model.embedding(model.encode_tokens(tokens))[0] @ other
        keep = [0] + [1 + p for p in range(tokens.shape[1] - 1) if p not in patches]
        return float(model.embedding(model.encode_tokens(tokens[:, keep]))[0] @ other - base)


@pytest.mark.parametrize("size, patch, window, grid", [(32, 8, 1, 4), (116, 4, 2, 15)])  # 29 patches: edge windows of 1
def test_each_value_is_the_score_change_when_its_window_is_left_out(size, patch, window, grid):
    torch.manual_seed(0)
    model = DCAL("test_vit", 5, size, pretrained=False, top_r=0.25, patch_size=patch).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        other = model.embed(x[1:])[0]
    delta = occlusion_map(model, x[0], other)
    assert window_size(model) == window and delta.shape == (grid, grid)
    n = model.vit.patch_embed.grid_size[1]
    for r, c in ((1, 2), (2, 1), (grid - 1, grid - 1)):  # rows and columns not swapped; the edge window too
        patches = {p for p in range(n * n) if p // n // window == r and p % n // window == c}
        assert delta[r, c].item() == pytest.approx(reference_delta(model, x[0], other, patches), abs=1e-5)
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
