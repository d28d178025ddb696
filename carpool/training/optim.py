"""AdamW and its learning-rate schedule (linear warmup, then cosine decay to a floor).

Weight decay applies to matrices (linear and embedding weights) and not to vectors (norm weights,
biases), as in nanoGPT and most Llama recipes. The optimizer holds fp32 states for fp32 parameters: with
bf16 compute the parameters stay fp32 (master weights) and only the compute sees bf16 copies.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from carpool.training.config import OptimizerConfig


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The schedule's factor for optimizer step `step` (0-based): (step+1)/warmup during warmup, then a
    cosine from 1 at the end of warmup to `min_lr_ratio` at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio))
