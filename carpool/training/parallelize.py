"""Applied to a built model from outside, one function per concern (as torchtitan does): activation
checkpointing, torch.compile, DDP, FSDP2. The model classes are not changed, and neither are parameter
names: checkpointing and compilation replace a layer's `forward` rather than wrapping the module, so
state dicts, the export and the loader all see the names the model defines.

Order (the one that works for all combinations): checkpointing and compile per decoder layer first,
then FSDP's `fully_shard` per layer and at the root (or DDP around the root). FSDP's hooks run around
the layer's `__call__`, outside the checkpointed/compiled forward, so a recomputation in backward does
not gather the weights a second time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers ModuleList of decoder layers")
    return layers


def checkpointed_layer_indices(num_layers: int, mode: str) -> list[int]:
    """Layers whose activations are recomputed in backward: all ("on"), every other one starting with
    the first ("selective"), none ("off")."""
    if mode == "on":
        return list(range(num_layers))
    if mode == "selective":
        return list(range(0, num_layers, 2))
    if mode == "off":
        return []
    raise ValueError(f"activation_checkpointing: must be off, on or selective, got {mode!r}")


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        # preserve_rng_state=False: the layers draw no random numbers (no dropout).
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def apply_layer_transforms(model: nn.Module, activation_checkpointing: str, compile_layers: bool) -> None:
    """torch.compile each decoder layer's forward and/or recompute it in backward."""
    layers = decoder_layers(model)
    recompute = set(checkpointed_layer_indices(len(layers), activation_checkpointing))
    for i, layer in enumerate(layers):
        forward = layer.forward
        if compile_layers:
            forward = torch.compile(forward)
        if i in recompute:
            forward = _checkpointed(forward)
        if forward is not layer.forward:
            layer.forward = forward  # an instance attribute: nn.Module.__call__ (and its hooks) call it


def apply_fsdp(model: nn.Module, mesh: Any, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               explicit_prefetch: bool = True) -> nn.Module:
    """FSDP2: each decoder layer is one all-gather unit, the root (embedding, final norm, LM head) another.
    `param_dtype`: compute dtype of the gathered weights (bf16), the sharded fp32 ones being the master
    copy; gradients are reduced in fp32. Explicit prefetch issues layer i+1's all-gather as layer i starts
    (and i-1's in backward), so the gather overlaps layer i's compute even when the CPU is not ahead."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(decoder_layers(model))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if explicit_prefetch:
        for i, layer in enumerate(layers):
            if i + 1 < len(layers):
                layer.set_modules_to_forward_prefetch([layers[i + 1]])
            if i > 0:
                layer.set_modules_to_backward_prefetch([layers[i - 1]])
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def device_mesh(device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))
