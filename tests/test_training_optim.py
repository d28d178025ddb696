"""AdamW's parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carpool.training.config import OptimizerConfig
from carpool.training.optim import build_optimizer, build_scheduler


def test_weight_decay_applies_to_matrices_and_not_to_norms_or_biases():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1), "cpu")
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decay == {id(model[0].weight), id(model[1].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(nn.Linear(2, 2), cfg, "cpu")
    sched = build_scheduler(opt, cfg, max_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert lrs[4:] == pytest.approx(cosine)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # strictly decaying after warmup
    torch.testing.assert_close(torch.tensor(opt.param_groups[0]["lr"]), torch.tensor(0.1))  # at the floor
