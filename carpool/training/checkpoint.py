"""Sharded, resumable training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a directory `step-00000100/` holding:
- the DCP shards of the model and the optimizer (each rank writes its own part; FSDP shards stay shards),
  gathered with `get_state_dict` so the keys are the model's plain names whatever wraps it (FSDP,
  activation checkpointing, compile), and a checkpoint can be loaded on another world size;
- `trainer-rank00000.pt` per rank: step, data position, scheduler and RNG states;
- `checkpoint.json`: step and world size, written last.

Atomicity: everything is written to `step-00000100.tmp/` and renamed once all ranks finished, so a run
interrupted while saving leaves only a `.tmp` directory that `latest_checkpoint` ignores; the previous
complete checkpoint stays loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step-(\d{8})$")
META_FILE = "checkpoint.json"


@dataclass(frozen=True)
class TrainerState:
    """The non-tensor state of a run beside the model and optimizer."""

    step: int
    data: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet(world: int) -> Iterator[None]:
    """DCP warns that it 'assumes' a single process when there is no process group; here that is meant."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def complete_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, META_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str) -> str | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def save_checkpoint(root: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                    keep: int = 2) -> str:
    """Save on every rank (a collective); returns the final directory."""
    rank, world = _rank_world()
    final = step_dir(root, state.step)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet(world):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=world == 1)
    torch.save(state.__dict__, os.path.join(tmp, f"trainer-rank{rank:05d}.pt"))
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"step": state.step, "world_size": world}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainerState:
    """Load into an already built (and wrapped) model and optimizer; returns this rank's trainer state.
    A checkpoint saved on another world size loads too; ranks without their own file take rank 0's data
    position and scheduler, and keep their own RNG states."""
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise ValueError(f"checkpoint: {path} is not a complete checkpoint (no {META_FILE})")
    rank, world = _rank_world()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        target = {"model": get_model_state_dict(model)}
    with _single_process_quiet(world):
        dcp.load(target, checkpoint_id=path, no_dist=world == 1)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, target["model"])
    own = os.path.join(path, f"trainer-rank{rank:05d}.pt")
    saved = torch.load(own if os.path.isfile(own) else os.path.join(path, "trainer-rank00000.pt"),
                       weights_only=False)
    if os.path.isfile(own):
        set_rng_state(saved["rng"])
    return TrainerState(**saved)
