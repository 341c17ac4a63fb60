"""The maths of DCAL, each checked against an independent reference."""
import copy

import pytest
import timm
import torch

from twins.errors import TwinsError
from twins.loss import DCALLoss
from twins.model import embed_images
from twins.model import DCAL, Attention, attend, block_tail, qkv_heads, rollout_row

torch.manual_seed(0)


def small(**kw) -> DCAL:
    args = dict(arch="test_vit", n_classes=5, img_size=32, pretrained=False, drop_path=0.0, top_r=0.25, patch_size=8)
    return DCAL(**{**args, **kw})


def explicit(model: DCAL):
    """The same model on the explicit-softmax attention path."""
    m = copy.deepcopy(model)
    for blk in list(m.vit.blocks) + ([m.glca_block] if m.use_glca else []):
        blk.attn.fused_attn = False
    return m


# Every timm internal that twins/model.py reads, by owner: a timm release that renames or drops one
# fails here by name (requirements.txt's lower bound is the oldest timm this passed on).
TIMM_INTERNALS = {
    "VisionTransformer": ["cls_token", "num_prefix_tokens", "patch_embed", "_pos_embed", "patch_drop", "norm_pre",
                          "blocks", "norm", "embed_dim", "no_weight_decay"],
    "PatchEmbed": ["num_patches", "grid_size"],
    "Block": ["norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"],
    "Attention": ["qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale", "fused_attn", "attn_drop", "proj",
                  "proj_drop"],
}


def test_timm_internals_the_model_relies_on_exist():
    vit = small().vit
    owners = {"VisionTransformer": vit, "PatchEmbed": vit.patch_embed, "Block": vit.blocks[0],
              "Attention": vit.blocks[0].attn}
    missing = [f"{owner}.{name}" for owner, names in TIMM_INTERNALS.items() for name in names
               if not hasattr(owners[owner], name)]
    assert not missing, f"timm {timm.__version__} lacks {missing}"
    assert isinstance(vit.blocks[0].attn, Attention)
    assert callable(timm.data.resolve_data_config)
    # optional in timm (absent in older releases): a gate must be off, a norm before the projection is applied
    assert getattr(vit.blocks[0].attn, "gate", None) is None


def test_rollout_row_matches_full_matrix_product():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    maps, h = [], model.tokens(x)
    with torch.no_grad():
        for blk in model.vit.blocks:
            q, k, _ = qkv_heads(blk.attn, blk.norm1(h))
            maps.append((q @ k.transpose(-2, -1) * blk.attn.scale).softmax(-1))  # (B, H, N, N), explicit
            h = blk(h)
        eye = torch.eye(h.shape[1])
        full = eye.expand(2, -1, -1)
        for S in maps:
            full = (0.5 * S.mean(1) + 0.5 * eye) @ full  # S_hat_i = S_bar_i @ S_hat_{i-1}
        ref = full[:, 0]
        got = rollout_row([S.mean(1) for S in maps])
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(2), atol=1e-5)  # a product of row-stochastic matrices
    assert torch.allclose(model.encode(x)["rollout"], ref[:, 1:], atol=1e-5)


def test_sa_stream_is_the_timm_vit():
    model = small().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode(x)["sa"], model.vit.forward_features((x - model.mean) / model.std)[:, 0], atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_pwca_with_itself_as_partner_equals_sa(fused):
    model = small(drop_path=0.0).train()
    if not fused:
        model = explicit(model)
    x = torch.randn(2, 3, 32, 32)
    out = model.encode(x, partner=torch.arange(2))  # every image is its own distractor
    assert torch.allclose(out["pwca"], out["sa"], atol=1e-5)
    # block by block: duplicated keys/values leave every softmax-weighted average unchanged
    blk = model.vit.blocks[0]
    h = blk.norm1(model.tokens(x))
    q, k, v = qkv_heads(blk.attn, h)
    single = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    doubled = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2))
    assert torch.allclose(single, doubled, atol=1e-6)


def test_pwca_uses_the_partner_at_the_same_block():
    model = small().train()
    x = torch.randn(2, 3, 32, 32)
    own = model.encode(x, partner=torch.arange(2))["pwca"]
    swapped = model.encode(x, partner=torch.tensor([1, 0]))["pwca"]
    assert not torch.allclose(own, swapped, atol=1e-4)  # the distractor changes the PWCA stream ...
    assert torch.allclose(model.encode(x, partner=torch.tensor([1, 0]))["sa"], model.encode(x)["sa"], atol=1e-5)  # ... not SA


def test_glca_with_all_tokens_equals_last_block_mean_token():
    model = small(top_r=1.0).eval()  # glca weights are a copy of the last block: untouched here
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.encode(x)
        tokens = model.vit.forward_features((x - model.mean) / model.std)  # all tokens after the last block and the final norm
    assert model.n_select == model.n_patches
    assert torch.allclose(out["glca"], tokens.mean(1), atol=1e-5)


def test_glca_is_its_block_on_class_token_and_top_rollout_patches():
    model = small(top_r=0.25).eval()
    with torch.no_grad():  # GLCA's own weights, no longer the last block's copy
        for p in model.glca_block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    out = model.encode(x)
    top = out["rollout"].topk(model.n_select, dim=1).indices
    assert torch.equal(out["selected"].sort(1).values, top.sort(1).values)
    with torch.no_grad():  # reference: the whole GLCA block on every token, then keep the chosen rows
        h = model.tokens(x)
        for blk in model.vit.blocks[:-1]:
            h = blk(h)
        rows = model.glca_norm(model.glca_block(h))
        rows = torch.cat([rows[:, :1], rows[torch.arange(2)[:, None], top + 1]], 1)
    assert torch.allclose(out["glca"], rows.mean(1), atol=1e-5)
    assert not torch.allclose(out["glca"], rows[:, 0], atol=1e-3)  # the chosen patches shape the feature
    out["glca"].sum().backward()
    assert model.glca_block.attn.qkv.weight.grad.abs().sum() > 0
    assert model.glca_block.mlp.fc1.weight.grad.abs().sum() > 0


def test_fused_equals_explicit_forward_and_gradients():
    model = small().train()
    ref = explicit(model)
    x = torch.randn(2, 3, 32, 32)
    xb = torch.randn(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    outs = []
    for m in (model, ref):
        out = m(x, xb)
        DCALLoss()(out, torch.tensor([1.0, 0.0]), y, y).backward()
        outs.append(out)
    for key in ("sa", "glca", "pwca", "emb_a"):
        assert torch.allclose(outs[0][key], outs[1][key], atol=1e-5), key
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_eval_never_runs_pwca_and_embedding_ignores_the_partner():
    model = small().eval()
    calls = []
    model.vit.blocks[0].norm1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    a, b1, b2 = (torch.randn(2, 3, 32, 32) for _ in range(3))
    with torch.no_grad():
        o1, o2 = model(a, b1), model(a, b2)
    assert calls == [4, 4]  # only the SA stream of the 2 + 2 images, no PWCA stream
    assert "pwca" not in o1
    assert torch.allclose(o1["emb_a"], o2["emb_a"], atol=1e-6)
    assert torch.allclose(o1["emb_a"].norm(dim=-1), torch.ones(2), atol=1e-5)
    model.train()
    calls.clear()
    model(a, b1)
    assert calls == [8]  # SA and PWCA streams of 4 images


def test_plain_timm_state_dict_loads_into_the_backbone():
    plain = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8)
    model = small()
    result = model.vit.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # and a checkpoint made at 224 runs in a model built at a larger size (position embeddings resampled)
    big = DCAL("test_vit", 5, 448, pretrained=False)
    src = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=224)
    from timm.models.vision_transformer import checkpoint_filter_fn
    big.vit.load_state_dict(checkpoint_filter_fn(src.state_dict(), big.vit))
    with torch.no_grad():
        assert big.eval().embedding(big.encode(torch.randn(1, 3, 448, 448))).shape == (1, 128)


def test_uncertainty_weighted_loss_reaches_every_branch_and_weight():
    model = small().train()
    a, b = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model(a, b)
    for key in ("sa", "glca", "pwca"):
        out[key].retain_grad()
    loss = DCALLoss()(out, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, -1]))
    loss.backward()
    assert torch.all(model.log_vars.grad != 0)
    for key in ("sa", "glca", "pwca"):
        assert out[key].grad.abs().sum() > 0, key
    assert model.pair_logit.grad.abs().sum() > 0


def test_loss_formula_and_reduction():
    torch.manual_seed(1)
    n, c = 3, 4
    out = {k: torch.rand(2 * n, c) * 2 - 1 for k in ("sa", "glca", "pwca")}
    out.update(feat_sa=torch.randn(2 * n, 8), feat_glca=torch.randn(2 * n, 8),
               log_vars=torch.tensor([0.3, -0.2, 0.1]), pair_logit=torch.tensor([10.0, -5.0]))
    same, ya, yb = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, -1]), torch.tensor([0, 2, -1])
    f = DCALLoss(scale=16, margin=0.2, reduction="none")
    per_pair = f(out, same, ya, yb)
    assert per_pair.shape == (n,)
    # reference, written out
    y = torch.cat([ya, yb])
    total = 0
    for i, k in enumerate(("sa", "glca", "pwca")):
        logits = 16 * (out[k] - 0.2 * torch.nn.functional.one_hot(y.clamp(min=0), c))
        ce = torch.nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none") * (y >= 0)
        branch = 0.5 * (ce[:n] + ce[n:])
        if k != "pwca":
            fa, fb = (torch.nn.functional.normalize(out[f"feat_{k}"], dim=-1)[s] for s in (slice(0, n), slice(n, None)))
            branch = branch + torch.nn.functional.binary_cross_entropy_with_logits(10 * (fa * fb).sum(-1) - 5, same,
                                                                                   reduction="none")
        w = out["log_vars"][i]
        total = total + 0.5 * (torch.exp(-w) * branch + w)
    assert torch.allclose(per_pair, total, atol=1e-5)
    assert torch.allclose(DCALLoss()(out, same, ya, yb), total.mean(), atol=1e-5)


def test_pretrained_weights_that_cannot_be_downloaded_say_what_to_do():
    with pytest.raises(TwinsError, match="pretrained weights of vit_small_patch16_224.augreg_in21k_ft_in1k could "
                                         "not be downloaded .*Internet on"):
        DCAL("vit_small_patch16_224.augreg_in21k_ft_in1k", 5, 32, pretrained=True)
    with pytest.raises(TwinsError, match="--arch no_such_vit"):
        DCAL("no_such_vit", 5, 32, pretrained=False)


def test_training_gives_each_image_its_pair_partner_as_pwca_distractor():
    """PWCA silently off (each image its own distractor) would make PWCA equal SA and change nothing."""
    model = small().train()
    xa, xb = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    out = model(xa, xb)
    xb2 = xb.clone()
    xb2[0] += torch.randn_like(xb2[0])  # another partner for pair 0 only
    torch.manual_seed(0)
    out2 = model(xa, xb2)
    assert not torch.allclose(out["pwca"][0], out2["pwca"][0], atol=1e-4)  # xa[0]'s PWCA sees xb[0] ...
    assert torch.allclose(out["pwca"][1], out2["pwca"][1], atol=1e-6)  # ... and only the partner
    assert torch.allclose(out["sa"][0], out2["sa"][0], atol=1e-6)  # SA of xa[0] never sees it
    assert not torch.allclose(out["pwca"], out["sa"], atol=1e-3)


def test_pwca_keys_and_values_come_from_the_partners_sa_stream_detached():
    """Decision 5 (PLAN.md): the partner's keys/values are those of its SA stream at the same block, detached."""
    model = small().train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model.encode(x, partner=torch.tensor([1, 0]))
    with torch.no_grad():  # reference, block by block from the timm blocks themselves
        sa = model.tokens(x)
        pw = sa[:1].clone()
        for blk in model.vit.blocks:
            _, k, v = qkv_heads(blk.attn, blk.norm1(sa))
            q_p, k_p, v_p = qkv_heads(blk.attn, blk.norm1(pw))
            pw = block_tail(blk, pw, attend(blk.attn, q_p, torch.cat([k_p, k[1:]], 2), torch.cat([v_p, v[1:]], 2)))
            sa = blk(sa)
        ref = model.vit.norm(pw)[:, 0]
    assert torch.allclose(out["pwca"][:1], ref, atol=1e-5)
    (out["pwca"][0] * torch.randn_like(out["pwca"][0])).sum().backward()  # a plain sum of a LayerNorm output is constant
    assert x.grad[0].abs().sum() > 0 and torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))  # no gradient to the partner


def test_pretrained_weights_load_into_every_block_and_glca_starts_as_the_loaded_last_block(tmp_path):
    torch.manual_seed(11)
    src = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))  # far from any fresh initialisation
    torch.save(src.state_dict(), tmp_path / "weights.pth")
    model = small(pretrained=True, weights=str(tmp_path / "weights.pth"))  # timm's loading path, from a file
    loaded = model.vit.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(loaded[k], v), k
    for (k, v), (_, w) in zip(model.glca_block.state_dict().items(), src.blocks[-1].state_dict().items()):
        assert torch.equal(v, w), k
    assert torch.equal(model.glca_norm.weight, src.norm.weight)


def test_weights_that_lack_a_tensor_of_the_backbone_are_refused_naming_it(tmp_path):
    """timm's pretrained path loads non-strictly once the head is dropped: a file without a block's MLP
    would leave that block random, the failure that sank earlier attempts."""
    src = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=8).state_dict()
    torch.save({k: v for k, v in src.items() if not k.startswith("blocks.1.mlp.")}, tmp_path / "partial.pth")
    with pytest.raises(TwinsError, match=r"partial.pth holds no tensor for 4 of test_vit's \(blocks.1.mlp.fc1.weight, "):
        small(pretrained=True, weights=str(tmp_path / "partial.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(TwinsError, match=r"--weights .*text.pth: cannot load them into test_vit \("):
        small(pretrained=True, weights=str(tmp_path / "text.pth"))
    with pytest.raises(TwinsError, match=r"--weights nope.pth: cannot load them into test_vit \(FileNotFoundError: "):
        small(pretrained=True, weights="nope.pth")


def test_evaluation_embeddings_come_from_the_model_in_eval_mode():
    model = small(drop_path=0.5).train()  # drop-path would make every embedding random
    cache = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    first, second = embed_images(model, cache), embed_images(model, cache)
    assert torch.equal(first, second)
    x = cache.float() / 255  # the model normalises
    with torch.no_grad():
        assert torch.allclose(first, model.eval().embedding(model.encode(x)), atol=1e-5)


def test_glca_selects_by_the_sa_stream_s_rollout_in_training_too():
    """Decision 4: the rollout is the SA stream's; PWCA's stream (keys and values of two images) never chooses."""
    model = small().train()  # drop-path 0 and no dropout: the SA stream computes what eval computes
    x = torch.randn(4, 3, 32, 32)
    partner = torch.arange(4).roll(2)
    trained = model.encode(x, partner)  # with gradient, as in training
    with torch.no_grad():
        alone = model.eval().encode(x)
    assert torch.allclose(trained["rollout"], alone["rollout"], atol=1e-6)
    assert torch.equal(trained["selected"], alone["selected"])


def test_the_classifier_is_a_cosine_whatever_the_scale_of_its_centres():
    model = small()
    x = torch.randn(6, model.vit.embed_dim)
    before = model.sa_head(x)
    with torch.no_grad():
        model.sa_head.weight.mul_(torch.rand(5, 1) * 10 + 0.1)  # each class centre rescaled
    assert torch.allclose(model.sa_head(x), before, atol=1e-6) and before.abs().max() <= 1 + 1e-6
    assert torch.allclose(before, torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(
        model.sa_head.weight, dim=-1).T, atol=1e-6)


def test_the_embedding_weighs_sa_and_glca_equally_whatever_their_scales():
    """Decision 9: each part L2-normalised, then the concatenation."""
    model = small()
    out = {"sa": torch.randn(3, 64), "glca": torch.randn(3, 64) * 50}
    emb = model.embedding(out)
    assert torch.allclose(emb[:, :64].norm(dim=1), torch.full((3,), 0.5 ** 0.5), atol=1e-6)
    assert torch.allclose(emb[:, 64:].norm(dim=1), torch.full((3,), 0.5 ** 0.5), atol=1e-6)
    assert torch.allclose(model.embedding({"sa": out["sa"] * 7, "glca": out["glca"]}), emb, atol=1e-6)


def test_images_are_normalised_with_the_backbone_s_own_mean_and_std(tiny_demo):
    """deit_* backbones use ImageNet's mean and std (not 0.5 / 0.5): the model normalises the [0, 1]
    images that the loaders (and inference) give it, with its backbone's own figures."""
    from twins.model import as_input
    from twins.run import build, prepare
    from twins.settings import fresh_settings
    json_dir, images = tiny_demo
    s = fresh_settings(dict(arch="deit_tiny_patch16_224", size=32, pretrained=False, bs=4, data=str(json_dir),
                            data_root=str(images), wandb=False, valid_pct=0.25))
    learn = build(s, prepare(s))
    model = learn.model.eval()
    dc = timm.data.resolve_data_config({}, model=model.vit)
    mean, std = (torch.tensor(dc[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    assert not torch.allclose(mean, std)
    cache = learn.dls.valid.dataset.cache
    x = as_input(model, cache[:4])
    assert torch.allclose(learn.dls.valid.one_batch()[0].cpu(), x, atol=1e-6)  # the loader: [0, 1]
    with torch.no_grad():
        assert torch.allclose(model.encode(x)["sa"], model.vit.forward_features((x - mean) / std)[:, 0], atol=1e-5)
