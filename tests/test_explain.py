"""Pair maps: the occlusion map of the pair score is what it says it is, and their summary over a split
is the mean of the maps `explain` draws."""
import json

import matplotlib
import numpy as np
import pytest
import torch

from helpers import run
from twins.explain import KINDS, occlusion_maps, pair_maps, pair_share, summary_map, summary_pairs, window_size, windows
from twins.model import DCAL, embed_images
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
        other = model.embedding(model.encode(x[1:]))[0]
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with precision:
        maps = occlusion_maps(model, x[[0, 0]], torch.stack([other, -other]), bs=5)
    delta = maps[0]  # batches of 5 sequences mix the faces: each face is scored against its own row
    assert window_size(model) == window and maps.shape == (2, grid, grid)
    assert torch.allclose(maps[1], -delta, atol=1e-5)  # the same face against -other: every change reversed
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


def test_a_pair_weighs_the_same_in_a_summary_whatever_its_scale_and_both_faces_count():
    da, db = torch.tensor([[1.0, -1.0], [0.0, 2.0]]), torch.tensor([[0.5, 0.0], [-3.0, 0.5]])
    assert torch.allclose(pair_share(da, db, 1.0), torch.tensor([[1.5, 0.0], [0.0, 2.5]]) / 4)  # dissimilarity
    assert torch.allclose(pair_share(da, db, -1.0), torch.tensor([[0.0, 1.0], [3.0, 0.0]]) / 4)  # similarity
    assert torch.allclose(pair_share(10 * da, 10 * db, 1.0), pair_share(da, db, 1.0))
    assert pair_share(-da.abs(), -db.abs(), 1.0) is None  # nothing made them differ: no part in the mean


def test_summary_samples_are_reproducible_of_their_kind_and_at_most_n():
    rng = np.random.default_rng(0)
    scores, genuine = rng.random(200), rng.random(200) < 0.4
    a, b = summary_pairs(scores, genuine, 0.5, 10, seed=3), summary_pairs(scores, genuine, 0.5, 10, seed=3)
    for k in KINDS:
        assert np.array_equal(a[k][0], b[k][0]) and len(a[k][0]) == min(10, a[k][1])
        assert np.array_equal(a[k][0], np.sort(a[k][0]))
    assert a["same"][1] == (genuine & (scores >= 0.5)).sum() and genuine[a["same"][0]].all()
    assert not np.array_equal(a["same"][0], summary_pairs(scores, genuine, 0.5, 10, seed=4)["same"][0])
    assert (~genuine[a["differ"][0]]).all() and (scores[a["differ"][0]] < 0.5).all()
    assert (~genuine[a["fooled"][0]]).all() and (scores[a["fooled"][0]] >= 0.5).all()
    assert summary_pairs(scores, genuine, 0.5, 1000, seed=3)["same"][0].size == a["same"][1]


def test_the_summary_is_the_mean_of_each_pair_s_explain_maps():
    torch.manual_seed(2)
    model = DCAL("test_vit", 5, 32, pretrained=False, top_r=0.25, patch_size=8).eval()
    cache = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    pairs = np.array([[0, 1], [2, 3], [4, 5]])
    for sign in (1.0, -1.0):
        shares = [pair_share(*pair_maps(model, cache[list(p)])[1:], sign) for p in pairs]  # as explain() draws them
        shares = [x for x in shares if x is not None]
        mean, counted = summary_map(model, cache, pairs, sign)
        assert counted == len(shares) > 0 and torch.allclose(mean, torch.stack(shares).mean(0), atol=1e-6)
        assert mean.sum().item() == pytest.approx(1.0)
    assert summary_map(model, cache, pairs[:0], 1.0) == (None, 0)
    score, delta_a, _ = pair_maps(model, cache[[0, 1]])  # face A scored against B's embedding, not its own
    emb = embed_images(model, cache[[0, 1]])
    assert score == pytest.approx(float(emb[0] @ emb[1]), abs=1e-6)
    assert torch.allclose(delta_a, occlusion_maps(model, cache[[0]].float() / 255, emb[[1]])[0], atol=1e-6)


def test_interpret_summary_writes_the_figure_and_the_numbers(fresh_run):
    work, data, _ = fresh_run
    run(["--ckpt", "models/ep7", "--summary", "--pairs", "3", "--out", "summ", *data], work, script="interpret.py")
    rep = json.loads((work / "summ" / "summary_test.json").read_text())
    assert (work / "summ" / "summary_test.png").stat().st_size > 5000
    assert set(rep["kinds"]) == set(KINDS) and rep["pairs_per_kind"] == 3 and rep["split"] == "test"
    for kind in rep["kinds"].values():
        assert kind["counted"] <= kind["sampled"] == min(3, kind["in_split"])
        if kind["counted"]:
            assert np.array(kind["map"]).sum() == pytest.approx(1.0)
