"""WarmupCosineLR: the learning rate at every step, by hand."""

from __future__ import annotations

import math

import torch

from treg_lightning.module.schedulers import WarmupCosineLR


def test_warmup_cosine_schedule_values():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = WarmupCosineLR(optimizer, warmup_ratio=0.2, num_training_steps=10)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup = ceil(0.2 * 10) = 2 steps: 0, 1, then cosine over the 8 remaining steps.
    expected = [0.0, 1.0] + [1.0 + math.cos(math.pi * k / 8) for k in range(9)]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(expected))
