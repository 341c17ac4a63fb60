"""`python tests/fake_gpus.py ARGS` is `python train.py ARGS` on a machine that reports 2 GPUs (the one
thing the tests fake: the processes are real, CPU ones talking over gloo). With NAN_FROM_STEP=k in the
environment, process 2 of 2 computes a NaN training loss from its k-th training batch on."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.cuda.device_count = lambda: 2
if os.environ.get("RANK") == "1" and "NAN_FROM_STEP" in os.environ:
    from twins.loss import DCALLoss
    forward, batches = DCALLoss.forward, [0]

    def nan_from_step(self, *args):
        loss = forward(self, *args)
        if torch.is_grad_enabled():
            batches[0] += 1
            if batches[0] >= int(os.environ["NAN_FROM_STEP"]):
                return loss * float("nan")
        return loss
    DCALLoss.forward = nan_from_step
import train  # noqa: E402  (the processes it starts run this file again: sys.argv[0])

train.main()
