"""Benchmark (run by hand, not by pytest): parameters, FLOPs, step times, peak memory and loader speed
of DCAL against the plain ViT siamese baseline at the same batch.

    python -m scripts.bench                                  # the demo recipe
    python -m scripts.bench --arch vit_small_patch16_224 --patch-size 16 --size 224 --bs 4 --reps 2
    python -m scripts.bench --flops-only --arch vit_small_patch16_224 --sizes 224 336 448
    python -m scripts.bench --memory-only --arch vit_small_patch16_224 --patch-size 16 --size 448 --bs 1
    python -m scripts.bench --maps-only 2 --arch vit_small_patch16_224 --patch-size 16 --size 448
"""
import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from twins.settings import DEMO, Settings
from twins.data import Split, pair_dataloaders
from twins.explain import summary_map, windows
from twins.loss import DCALLoss
from twins.model import DCAL, mixed_precision


def synced_time() -> float:
    """time.time() once the GPU's queued work is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def machine() -> str:
    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"


def build(arch, size, patch, dcal: bool, fused: bool = True) -> DCAL:
    m = DCAL(arch, 300, size, pretrained=False, drop_path=0.0, top_r=0.1, glca=dcal, pwca=dcal, patch_size=patch)
    for blk in list(m.vit.blocks) + ([m.glca_block] if dcal else []):
        blk.attn.fused_attn = fused
    return m


def batch(bs, size, dev):
    ids = torch.randint(0, 300, (2, bs), device=dev)
    xa, xb = torch.rand(2, bs, 3, size, size, device=dev)
    return xa, xb, (ids[0] == ids[1]).float(), *ids


def train_step(model, b, loss_fn):
    model.train()
    loss_fn(model(b[0], b[1]), *b[2:]).backward()


@torch.no_grad()
def eval_forward(model, b):
    model.eval()
    model.embedding(model.encode(b[0]))


def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def timed(fn, reps) -> float:
    fn()  # warm-up
    t = synced_time()
    for _ in range(reps):
        fn()
    return (synced_time() - t) / reps


def peak_memory_child(args):
    """Peak memory of one train step, in a fresh process so that the figure is this step's alone."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args.arch, args.size, args.patch_size, dcal=True).to(dev)
    b = batch(args.bs, args.size, dev)
    with mixed_precision(dev):
        train_step(model, b, DCALLoss())
    print(torch.cuda.max_memory_reserved() / 2**30 if dev.type == "cuda"  # what runs out
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def loader_speed(size, bs, n=2000) -> float:
    person = np.repeat(np.arange(n // 10), 10)
    split = Split([str(i) for i in range(n // 10)], [Path(f"{i}.jpg") for i in range(n)], person,
                  [(i, i + 1) for i in range(0, n // 10, 2)])
    cache = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    dls = pair_dataloaders(split, split, cache, cache, {s: i for i, s in enumerate(split.ids)}, bs, size, seed=0)
    t = time.perf_counter()
    pairs = sum(len(b[0]) for b in dls.train)
    return pairs / (time.perf_counter() - t)


def peak_memory(args) -> None:
    """One DCAL train step's peak memory."""
    cmd = [sys.executable, "-m", "scripts.bench", "--child-memory", "--arch", args.arch, "--size", str(args.size),
           "--bs", str(args.bs)] + (["--patch-size", str(args.patch_size)] if args.patch_size else [])
    mem = float(subprocess.run(cmd, capture_output=True, text=True, check=True,
                               cwd=Path(__file__).resolve().parents[1]).stdout.split()[-1])
    unit = "GiB reserved on the GPU" if torch.cuda.is_available() else "GiB process peak RSS"
    print(f"  peak memory of one DCAL train step ({args.bs} pairs at {args.size}): {mem:.2f} {unit}")


def summary_speed(args, dev) -> None:
    """The pair-map summary (`interpret.py --summary`) on `args.maps_only` random pairs: pairs/s, and
    the FLOPs of one pair's maps (counted with explicit attention)."""
    model = build(args.arch, args.size, args.patch_size, True).to(dev).eval()
    n = args.maps_only
    cache = torch.randint(0, 256, (2 * n, 3, args.size, args.size), dtype=torch.uint8)
    pairs = np.arange(2 * n).reshape(n, 2)
    summary_map(model, cache, pairs[:1], 1.0)  # warm-up
    t = synced_time()
    summary_map(model, cache, pairs, 1.0)
    took = synced_time() - t
    counted = build(args.arch, args.size, args.patch_size, True, fused=False).eval()
    with torch.no_grad():  # one left-out sequence, times the sequences of a pair (all windows of both faces + 2)
        seq = counted.tokens(torch.randn(1, 3, args.size, args.size))[:, :-len(windows(counted)[0])]
        gflop = flops(lambda: counted.encode_tokens(seq)) * (2 * len(windows(counted)) + 2) / 1e9
    print(f"pair-map summary at {args.size}: {n} pairs in {took:.1f} s = {n / took:.3f} pairs/s; "
          f"{gflop:.1f} GFLOP per pair")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=DEMO["arch"])
    p.add_argument("--patch-size", type=int, default=DEMO["patch_size"])
    p.add_argument("--size", type=int, default=DEMO["size"])
    p.add_argument("--sizes", type=int, nargs="*", help="FLOPs table at these sizes")
    p.add_argument("--bs", type=int, default=Settings.bs, help="pairs per batch")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--flops-only", action="store_true")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--maps-only", type=int, metavar="PAIRS", help="time the pair-map summary on this many pairs")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        return peak_memory_child(args)
    if args.memory_only:
        return peak_memory(args)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {machine()}; arch {args.arch}, patch {args.patch_size or 'default'}")
    if args.maps_only:
        return summary_speed(args, dev)
    loss_fn = DCALLoss()
    print("\n| size | tokens | params plain | params DCAL | GFLOP train pair plain | GFLOP train pair DCAL | "
          "GFLOP eval image plain | GFLOP eval image DCAL |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes or [args.size]:
        # explicit attention: same FLOPs, and the counter sees its matmuls (it misses the CPU fused kernel)
        plain, dcal = (build(args.arch, size, args.patch_size, d, fused=False) for d in (False, True))
        b1 = batch(1, size, "cpu")
        row = [size, plain.n_patches + 1, f"{sum(q.numel() for q in plain.parameters()) / 1e6:.2f} M",
               f"{sum(q.numel() for q in dcal.parameters()) / 1e6:.2f} M"]
        row += [f"{flops(lambda m=m: train_step(m, b1, loss_fn)) / 1e9:.1f}" for m in (plain, dcal)]
        row += [f"{flops(lambda m=m: eval_forward(m, b1)) / 1e9:.2f}" for m in (plain, dcal)]
        print("| " + " | ".join(map(str, row)) + " |")
    if args.flops_only:
        return
    plain = build(args.arch, args.size, args.patch_size, False).to(dev)
    dcal = build(args.arch, args.size, args.patch_size, True).to(dev)
    b = batch(args.bs, args.size, dev)
    with mixed_precision(dev):
        t = {f"{k} {n}": timed(lambda m=m, f=f: f(m), args.reps)
             for n, m in (("plain", plain), ("DCAL", dcal))
             for k, f in (("train", lambda m: train_step(m, b, loss_fn)), ("eval", lambda m: eval_forward(m, b)))}
    print(f"\nbatch {args.bs} pairs at {args.size}:")
    for k, v in t.items():
        print(f"  {k:12s} {1000 * v:9.1f} ms   {2 * args.bs / v:8.1f} images/s")
    print(f"  ratio train DCAL/plain {t['train DCAL'] / t['train plain']:.2f} (target <= 2.3), "
          f"eval DCAL/plain {t['eval DCAL'] / t['eval plain']:.2f} (target <= 1.10)")
    peak_memory(args)
    pairs_s = loader_speed(args.size, args.bs)
    print(f"  loader: {pairs_s:.0f} pairs/s from the RAM cache with augmentation "
          f"({pairs_s / (args.bs / t['train DCAL']):.1f}x what the DCAL train step consumes)")


if __name__ == "__main__":
    main()
