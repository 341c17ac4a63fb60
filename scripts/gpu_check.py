"""The GPU path proved on whatever GPU this is, in a few minutes, with no network and random-init
weights. Prints the figures docs/results.md records; writes its log and a JSON of them to --out.

    python -m scripts.gpu_check --out gpu_check

The arch check; fp16 steps of the Kaggle recipe (ViT-S/16 at 448, GLCA + PWCA) (pairs/s, peak
memory per pair); one occlusion map in fp16 against fp32; then the user's
commands as they run them (each in one process per GPU by itself where there are 2+): a demo epoch
stopped by the time limit and resumed, export and interpret, one epoch of the Kaggle model on the demo
set; with 2+ GPUs two demo epochs on all GPUs and on one. Without a GPU the same on the CPU, smaller
and without the Kaggle model's epoch.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from twins.explain import occlusion_maps
from twins.model import DCAL, check_cuda_arch, mixed_precision
from twins.plan import training_step
from scripts.bench import synced_time
from twins.settings import DEMO, Settings

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
KAGGLE = Settings()  # the Kaggle recipe


def logger(path: Path):
    file = path.open("w")
    return lambda text: (print(text, flush=True), file.write(text + "\n"), file.flush())


def recipe_steps() -> dict:
    """Timed fp16 training steps of the Kaggle model; memory per pair = the slope between two batches."""
    model = DCAL.from_settings(KAGGLE, 300, pretrained=False)
    step = training_step(model, 300, KAGGLE.size, DEV)
    sizes, reps = ((4, 8), 5) if CUDA else ((1,), 1)
    peaks, speed = {}, None
    for bs in sizes:
        step(bs)  # warm-up: kernels chosen, AdamW's state allocated
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t = synced_time()
        for _ in range(reps):
            step(bs)
        speed = bs * reps / (synced_time() - t)
        if CUDA:
            peaks[bs] = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
    out = {"batch": sizes[-1], "pairs_per_s": speed}
    if CUDA:
        (a1, r1), (a2, r2) = peaks[sizes[0]], peaks[sizes[1]]
        d = sizes[1] - sizes[0]
        out.update(peak_allocated_gib=a2, peak_reserved_gib=r2, allocated_gib_per_pair=(a2 - a1) / d,
                   reserved_gib_per_pair=(r2 - r1) / d)
    del model, step
    if CUDA:
        torch.cuda.empty_cache()
    return out


def map_precision() -> dict:
    """The occlusion map of one face against another, fp16 (training's precision) against fp32."""
    s = KAGGLE if CUDA else replace(KAGGLE, **DEMO)
    torch.manual_seed(0)
    model = DCAL.from_settings(s, 300, pretrained=False).to(DEV).eval()
    x = torch.randn(2, 3, s.size, s.size, device=DEV)
    with torch.no_grad():
        other = model.embedding(model.encode(x[1:]))[0]
    t = time.time()
    with mixed_precision(DEV):
        low = occlusion_maps(model, x[:1], other[None])[0].flatten()
    low_s = time.time() - t
    full = occlusion_maps(model, x[:1], other[None])[0].flatten()
    corr = float(torch.corrcoef(torch.stack([low, full]))[0, 1])
    return {"size": s.size, "windows": len(full), "seconds_per_face": low_s, "fp32_range": float(full.abs().max()),
            "max_abs_diff": float((low - full).abs().max()), "correlation": corr,
            "same_top_window": bool(low.argmax() == full.argmax())}


def command(log, work: Path, name: str, args: list, script: str = "train.py", env: dict | None = None,
            keep: str = r"^(\d+ GPUs|Batch|Check|Test|Stopped|Resuming|Exported|Model|epoch|  python)") -> dict:
    """A real run of one of the user's commands in `work`: its exit status, time and telling lines."""
    cmd = [sys.executable, str(ROOT / script), *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    log(f"\n$ {' '.join(f'{k}={v}' for k, v in (env or {}).items() if k == 'CUDA_VISIBLE_DEVICES')} python {script} "
        f"{' '.join(args)}")
    t = time.time()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if re.match(keep, ln)]
    log("\n".join(lines) + (f"\nFAILED (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-3000:]}"
                            if p.returncode else ""))
    return {"name": name, "rc": p.returncode, "seconds": time.time() - t, "lines": lines}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.log and gpu_check.json")
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    log = logger(out / "gpu_check.log")
    figures = {"device": torch.cuda.get_device_name() if CUDA else "CPU (no GPU: a trial run)",
               "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if CUDA:
        check_cuda_arch()
        figures.update(capability="sm_{}{}".format(*torch.cuda.get_device_capability()),
                       arch_list=torch.cuda.get_arch_list(), arch_check="passed")
    log(json.dumps(figures))
    for name, measure in (("recipe_steps", recipe_steps), ("map_fp16_vs_fp32", map_precision)):
        figures[name] = measure()
        log(f"{name}: {json.dumps(figures[name])}")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    demo = ["--no-wandb", "--data", "demo/data_json", "--data-root", "demo/images"]
    runs = [command(log, work, "epoch_then_stop", ["--fresh", "--demo", "--epochs", "2", "--time-limit", "0", *demo]),
            command(log, work, "resume", ["--resume", "models", "--no-wandb"]),
            command(log, work, "export", ["--ckpt", "models/ep2", "--out", "models/twins.pkl"], script="export.py"),
            command(log, work, "interpret", ["--ckpt", "models/ep2", "-k", "2"], script="interpret.py",
                    keep=r"^(Model|models)")]
    if CUDA:  # the Kaggle model (448 px) for one epoch of the demo set: the memory search and fp16 for real
        runs.append(command(log, work, "kaggle_model_epoch", ["--fresh", "--no-pretrained", "--epochs", "1", "--out",
                                                              "models_kaggle", *demo]))
    if torch.cuda.device_count() > 1:  # the commands above ran in one process per GPU by themselves; one GPU alone:
        for name, gpus in (("all_gpus", None), ("one_gpu", "0")):
            runs.append(command(log, work, name, ["--fresh", "--demo", "--epochs", "2", "--out", f"models_{name}", *demo],
                                env={"CUDA_VISIBLE_DEVICES": gpus} if gpus else None))
    figures["commands"] = runs
    failed = [r["name"] for r in runs if r["rc"]]
    log(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'All passed'}; work folder {work}")
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
