"""Which bytes each batch-1 GEMV of a decoder warms into L2 while it waits (ops/triton/gemv.py L2Warmup).

The layer's four projections run in a fixed order: qkv, o, gate/up, down, then the next layer's qkv.
For each of them a plan names two amounts: of its own weight, the bytes after those its first wave of
programs loads anyway; of the next projection's weight, the leading bytes (read first by that GEMV).
The plan comes from CARPOOL_L2_WARMUP ("o=64+16,qkv=16+0": MiB own + MiB next, per projection; empty:
none). A hint to the memory system: results are the same with or without it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

L2_WARMUP_ENV = "CARPOOL_L2_WARMUP"
L2_WARMUP_PROGRAMS_ENV = "CARPOOL_L2_WARMUP_PROGRAMS"  # how many programs share the work (default 2 per SM)
ROLES = ("qkv", "o", "gate_up", "down")
ROWS_PER_PROGRAM = 2  # (default_gemv_config's block_n, and the push and SiLU variants')


def parse_plan(text: str) -> dict[str, tuple[int, int]]:
    """"o=64+16,qkv=16+0" -> {"o": (64 MiB, 16 MiB), "qkv": (16 MiB, 0)} in bytes."""
    plan: dict[str, tuple[int, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, _, amounts = item.partition("=")
        own, _, nxt = amounts.partition("+")
        if role not in ROLES or not own.isdigit() or not (nxt or "0").isdigit():
            raise ValueError(f"{L2_WARMUP_ENV}: expected items like o=64+16 for roles {ROLES}, got {item!r}")
        plan[role] = (int(own) << 20, int(nxt or 0) << 20)
    return plan


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().view(-1).view(torch.uint8)


def _range(flat: torch.Tensor, start: int, nbytes: int) -> torch.Tensor | None:
    nbytes = min(nbytes, flat.numel() - start) // 16 * 16
    return flat[start:start + nbytes] if nbytes > 0 else None


def layer_projections(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(role, weight) of every decoder layer's projections in execution order."""
    layers = model.model.layers  # type: ignore[union-attr]
    out: list[tuple[str, torch.Tensor]] = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [("qkv", attn.qkv_proj.weight), ("o", attn.o_proj.weight), ("gate_up", mlp.gate_up_proj.weight),
                ("down", mlp.down_proj.weight)]
    return out


def configure(model: nn.Module, device: torch.device, text: str | None = None) -> int:
    """Set weight.l2_warmup on the model's projections from the plan (default: the environment's);
    returns how many were set."""
    from carpool.ops.triton.gemv import L2Warmup
    plan = parse_plan(os.environ.get(L2_WARMUP_ENV, "") if text is None else text)
    if not plan or device.type != "cuda":
        return 0
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = int(os.environ.get(L2_WARMUP_PROGRAMS_ENV, 2 * sms))
    projections = layer_projections(model)
    count = 0
    for i, (role, weight) in enumerate(projections):
        own_bytes, next_bytes = plan.get(role, (0, 0))
        ranges = []
        if own_bytes:
            first_wave = programs * ROWS_PER_PROGRAM * weight.shape[1] * weight.element_size()
            ranges.append(_range(_flat(weight), first_wave, own_bytes))
        if next_bytes and i + 1 < len(projections):
            ranges.append(_range(_flat(projections[i + 1][1]), 0, next_bytes))
        ranges = [r for r in ranges if r is not None]
        if ranges:
            weight.l2_warmup = L2Warmup(tuple(ranges), programs)  # type: ignore[attr-defined]
            count += 1
    return count
