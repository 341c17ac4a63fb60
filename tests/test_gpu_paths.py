"""What runs on a GPU, checked on the CPU: the arch check against real builds' arch lists, the mixed
precision paths under CPU bf16 autocast (it casts matmul down as CUDA's fp16 autocast does), the
device of inference, the batch probe, the memory the rollout keeps."""
import importlib
import os
import re
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train
from helpers import ROOT
from twins.plan import training_step
from twins.checkpoint import model_from_checkpoint
from twins.errors import TwinsError
from twins.model import embed_images
from twins.loss import DCALLoss
from twins.metrics import protocol_scores
from twins.model import CU126_INSTALL, DCAL, check_cuda_arch, encode_all

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
# get_arch_list() of real builds: CUDA 12.6 (torch's own table in torch/cuda/__init__.py), CUDA 12.8
# (torch 2.7 starts at sm_75, later releases at sm_70), CUDA 13.0 (this machine's torch 2.14.1).
BUILDS = {
    "cu126": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
    "cu128 (2.7)": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"],
    "cu128": ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"],
    "cu130": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"],
}
GPUS = {"Tesla P100-PCIE-16GB": (6, 0), "Tesla P40": (6, 1), "Tesla T4": (7, 5), "NVIDIA L4": (8, 9),
        "NVIDIA A100-SXM4-40GB": (8, 0), "NVIDIA H100 80GB HBM3": (9, 0)}


def fake_gpu(monkeypatch, name, capability, arch_list):
    for attr, value in (("is_available", lambda: True), ("current_device", lambda: 0), ("device_count", lambda: 1),
                        ("get_device_capability", lambda d=None: capability), ("get_arch_list", lambda: arch_list),
                        ("get_device_name", lambda d=None: name)):
        monkeypatch.setattr(torch.cuda, attr, value)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("gpu", GPUS)
def test_every_gpu_runs_where_its_build_has_its_major_version_and_a_pascal_card_gets_the_cu126_command(
        monkeypatch, build, gpu):
    fake_gpu(monkeypatch, gpu, GPUS[gpu], BUILDS[build])
    refused = GPUS[gpu][0] == 6 and build != "cu126"
    if not refused:
        check_cuda_arch()
    else:
        with pytest.raises(TwinsError) as e:
            check_cuda_arch()
        assert gpu in str(e.value) and "(sm_6" in str(e.value) and CU126_INSTALL in str(e.value)
    check_cubins = getattr(torch.cuda, "_check_cubins", None)  # torch's own rule, where this torch has it
    if check_cubins is not None:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            check_cubins()
        assert bool(seen) == refused


def test_ptx_runs_on_later_gpus_and_a_card_no_cu126_build_serves_gets_no_cu126_advice(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100", (9, 0), ["sm_80", "compute_80"])
    check_cuda_arch()  # the driver compiles compute_80 PTX for sm_90
    fake_gpu(monkeypatch, "NVIDIA GeForce RTX 5090", (12, 0), BUILDS["cu126"])
    with pytest.raises(TwinsError, match=r"no kernels for NVIDIA GeForce RTX 5090 \(sm_120;") as e:
        check_cuda_arch()
    assert "cu126" not in str(e.value) and "T4" not in str(e.value)


def test_the_p100_command_in_readme_is_the_one_the_error_gives_and_installs_a_matching_cu126_pair():
    assert f"!{CU126_INSTALL}" in (ROOT / "README.md").read_text()
    torch_v, vision_v = re.fullmatch(r"pip install torch==(2\.\d+\.\d+)\+cu126 torchvision==(0\.\d+\.\d+)\+cu126 "
                                     r"--index-url https://download.pytorch.org/whl/cu126", CU126_INSTALL).groups()
    # explicit +cu126 versions: pip orders X+cu128 above X+cu126, so anything less keeps Kaggle's build
    assert int(vision_v.split(".")[1]) == int(torch_v.split(".")[1]) + 15  # torchvision 0.(N+15) goes with torch 2.N


@pytest.mark.parametrize("user_value", [None, "backend:native"])
def test_cuda_allocator_is_set_to_expandable_segments_unless_the_user_chose(monkeypatch, user_value):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    if user_value:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_value)
    importlib.reload(train)  # train.py sets it at the top, before it imports torch
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (user_value or "expandable_segments:True")


def small(**kw) -> DCAL:
    torch.manual_seed(0)
    return DCAL("test_vit", 5, 32, pretrained=False, top_r=0.25, patch_size=8, **kw)


def test_a_mixed_precision_training_step_is_finite_and_close_to_fp32():
    model = small(drop_path=0.0).train()
    xa, xb = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    ya, yb = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 4])
    losses, grads = [], []
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast(**BF16, enabled=amp):
            out = model(xa, xb)
            loss = DCALLoss()(out, (ya == yb).float(), ya, yb)
        assert (out["glca"].dtype == torch.bfloat16) == amp  # the lines that run in fp16 on a GPU ran in bf16
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.isfinite(grads[1]).all() and losses[1] == pytest.approx(losses[0], rel=0.05)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], 0) > 0.99


def test_embeddings_are_encoded_in_the_autocast_dtype_and_scored_in_fp32():
    model = small().eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    fp32 = encode_all(model, images)
    with torch.autocast(**BF16):
        low = encode_all(model, images)
        emb = embed_images(model, images)
    assert low["sa"].dtype == emb.dtype == torch.float32 and not torch.equal(low["sa"], fp32["sa"])  # bf16 ran
    cos = torch.nn.functional.cosine_similarity
    assert (cos(low["sa"], fp32["sa"]) > 0.999).all()
    same = (low["selected"] == fp32["selected"]).all(1)  # where rollout picks the same patches, GLCA agrees too
    assert same.any() and (cos(low["glca"], fp32["glca"])[same] > 0.999).all()
    person, pairs = torch.tensor([0, 0, 0, 1, 1, 1]).numpy(), [(0, 1)]
    with torch.autocast(**BF16):  # scores from fp32 embeddings stay fp32 whoever calls them
        scores = protocol_scores(emb, person, pairs)[0]
    exact = protocol_scores(emb.double(), person, pairs)[0]
    assert abs(scores - exact).max() < 1e-6


def test_the_batch_probe_measures_a_step_taken_with_the_optimizer_state_in_memory():
    states = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: states.append(sum(len(s) for s in opt.state.values())))
    try:
        with torch.autocast(**BF16):  # the probe's forward runs in the caller's low precision, as on a GPU
            training_step(small(), 5, 32, torch.device("cpu"))(2)
    finally:
        hook.remove()
    assert len(states) >= 2 and states[0] == 0 and states[-1] > 0  # the first step allocates AdamW's state


def test_a_checkpoint_becomes_a_model_on_the_device_asked_for(fresh_run):
    work, _, _ = fresh_run
    model, _, _ = model_from_checkpoint(work / "models" / "ep7.pth", torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"} and not model.training
    model, _, _ = model_from_checkpoint(work / "models" / "ep7.pth")  # default: the GPU where there is one
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}


def test_interpret_checks_the_gpu_before_using_it_and_export_needs_none(fresh_run, monkeypatch, tmp_path):
    import export
    import interpret
    work, _, _ = fresh_run
    ckpt = str(work / "models" / "ep7.pth")
    export.main(["--ckpt", ckpt, "--out", str(tmp_path / "twins.pkl")])  # on the CPU, before the fake GPU
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0), BUILDS["cu128"])  # Kaggle's torch on a P100
    refusal = r"(?s)^Error: torch .* has no kernels for Tesla P100-PCIE-16GB \(sm_60;.*on Kaggle, pick GPU T4 x2"
    export.main(["--ckpt", ckpt, "--out", str(tmp_path / "again.pkl")])  # export needs no GPU: it works there
    assert (tmp_path / "again.pkl").stat().st_size > 0
    with pytest.raises(SystemExit, match=refusal):
        interpret.main(["--ckpt", ckpt, "--pair", __file__, __file__])
