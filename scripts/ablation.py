"""Ablation on the demo set (run by hand): plain ViT siamese, +GLCA, +PWCA, full DCAL, several seeds,
same recipe and budget; prints the twins-only test EER and AUC (mean ± spread) as a markdown table.

    python -m scripts.ablation --jobs 2        # 5 seeds, the demo recipe (about 40 minutes on 2 CPU cores)
    python -m scripts.ablation --seeds 1 2 3 -- --epochs 40    # extra flags go to train.py

Runs already finished under --out are reused, so an interrupted ablation picks up where it stopped
(delete --out after changing the code).

On real data: the same flags (`--no-glca`, `--no-pwca`) with `python train.py --fresh`.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"plain ViT": ["--no-glca", "--no-pwca"], "+GLCA": ["--no-pwca"], "+PWCA": ["--no-glca"], "DCAL": []}


def train(cmd: list[str], threads: int) -> None:
    print(" ".join(cmd[1:]), flush=True)
    # one run per job, each on its share of the cores (a small model uses two cores poorly)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def spread(values: np.ndarray, digits: int) -> str:
    """mean ± sample sd (just the value for one seed)."""
    sd = f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{values.mean():.{digits}f}{sd}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (each gets cores / jobs threads)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("extra", nargs="*", help="flags passed on to train.py (after --)")
    args = p.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs = {(name, seed): Path(args.out) / f"{name.replace(' ', '_').replace('+', '')}_seed{seed}"
            for name in VARIANTS for seed in args.seeds}
    todo = [[sys.executable, str(ROOT / "train.py"), "--fresh", "--demo", "--no-wandb", "--seed", str(seed),
             "--out", str(out), *VARIANTS[name], *args.extra]
            for (name, seed), out in runs.items() if not (out / "test_report.json").is_file()]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda cmd: train(cmd, threads), todo))  # list(): a failed run raises here
    results = {}
    for (name, _), out in runs.items():
        t = json.loads((out / "test_report.json").read_text())["test"]
        results.setdefault(name, []).append((t["eer"], t["auc"]))
    print(f"\n| variant | test EER % (mean ± sd, {len(args.seeds)} seeds) | test AUC | per seed EER % |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        eer, auc = np.array(rows).T
        print(f"| {name} | {spread(100 * eer, 1)} | {spread(auc, 3)} | {', '.join(f'{100 * e:.1f}' for e in eer)} |")


if __name__ == "__main__":
    main()
