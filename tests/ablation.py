"""Ablation on the demo set (run by hand): plain ViT siamese, +GLCA, +PWCA, full DCAL, several seeds,
same recipe and budget; prints the twins-only test EER and AUC (mean ± spread) as a markdown table.

    python tests/ablation.py                 # 3 seeds, the demo recipe (about 35 minutes on 2 CPU cores)
    python tests/ablation.py --seeds 1 2 3 4 5 -- --epochs 40    # extra flags go to train.py

On real data: the same flags (`--no-glca`, `--no-pwca`) with `python train.py --fresh`.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain ViT": ["--no-glca", "--no-pwca"], "+GLCA": ["--no-pwca"], "+PWCA": ["--no-glca"], "DCAL": []}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("extra", nargs="*", help="flags passed on to train.py (after --)")
    args = p.parse_args()
    results = {}
    for name, flags in VARIANTS.items():
        for seed in args.seeds:
            out = Path(args.out) / f"{name.replace(' ', '_').replace('+', '')}_seed{seed}"
            report = out / "test_report.json"
            if not report.is_file():
                cmd = [sys.executable, str(ROOT / "train.py"), "--fresh", "--demo", "--no-wandb", "--seed", str(seed),
                       "--out", str(out), *flags, *args.extra]
                print(" ".join(cmd[1:]), flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            t = json.loads(report.read_text())["test"]
            results.setdefault(name, []).append((t["eer"], t["auc"]))
    print(f"\n| variant | test EER % (mean ± sd, {len(args.seeds)} seeds) | test AUC |")
    print("|---|---|---|")
    for name, rows in results.items():
        eer, auc = np.array(rows).T
        print(f"| {name} | {100 * eer.mean():.1f} ± {100 * eer.std(ddof=1):.1f} | {auc.mean():.3f} ± {auc.std(ddof=1):.3f} |")


if __name__ == "__main__":
    main()
