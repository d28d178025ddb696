"""Load a Hugging Face checkpoint into a carpool model, tensor by tensor.

Each checkpoint tensor is read lazily from its safetensors file and handed to the parameter's own
`weight_loader`, which copies in only this rank's part: no second full copy of the model is ever held
in memory, and a tensor-parallel rank reads only its slices.
"""

from __future__ import annotations

import json
import logging
import os
import zlib

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from carpool.config import ModelConfig
from carpool.layers.attention import Attention
from carpool.layers.linear import LinearBase, default_weight_loader
from carpool.layers.moe import FusedExperts
from carpool.models.registry import get_model_class
from carpool.models.runtime import ModelRuntime

logger = logging.getLogger(__name__)

def resolve_model_path(model: str) -> str:
    """A local directory as is; anything else is a Hugging Face repo id, fetched (or found in the
    local hub cache) with huggingface_hub."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"model: {model!r} is a file, not a checkpoint directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                        "*.jinja", "tokenizer*"])
    except Exception as e:  # network down, unknown repo, gated model...
        raise ValueError(f"model: {model!r} is not a local directory and could not be fetched from the "
                         f"Hugging Face Hub ({type(e).__name__}: {e})") from e


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(path)
                       if n.endswith(".safetensors") and not n.startswith("consolidated"))
    if not names:
        raise ValueError(f"model: no *.safetensors weights found in {path}")
    return [os.path.join(path, n) for n in names]


def build_model(config: ModelConfig, runtime: ModelRuntime, device: torch.device | str) -> nn.Module:
    """The model class of config's architecture, built on `device` with no weights loaded."""
    cls = get_model_class(config.architecture)
    with torch.device(device):
        return cls(config, runtime)


def load_model(config: ModelConfig, runtime: ModelRuntime, device: torch.device | str,
               load_format: str = "auto") -> nn.Module:
    model = build_model(config, runtime, device)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, config.path)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights where no checkpoint is needed (benchmarks of a model shape): norms at 1, the rest
    normal(0, std). Drawn on the parameters' own device, so an 8B model takes seconds, not a disk write."""
    for name, param in model.named_parameters():
        gen = torch.Generator(device=param.device).manual_seed(seed + zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif not param.dtype.is_floating_point:  # packed quantized words (random bits), GPTQ's g_idx
            param.random_(generator=gen)
        elif param.element_size() == 1:  # FP8 weights: normal values, rounded to e4m3
            param.copy_(torch.empty(param.shape, device=param.device).normal_(0.0, 1.0, generator=gen))
        else:
            param.normal_(0.0, std, generator=gen)


def load_weights(model: nn.Module, path: str) -> None:
    """Each checkpoint tensor goes where the model's `checkpoint_name_map` says, through the parameter's
    own weight_loader; then each linear method may repack what it loaded."""
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    name_map = model.checkpoint_name_map  # type: ignore[operator]
    loaded: set[str] = set()
    files = checkpoint_files(path)
    total_bytes = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total_bytes, desc="Loading weights", unit="B", unit_scale=True,
              disable=total_bytes < (1 << 30)) as progress:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    mapped = name_map(name)
                    if mapped is None:
                        continue
                    target, shard_id = mapped
                    param = params.get(target)
                    if param is None:
                        raise ValueError(f"checkpoint tensor {name!r} matches no parameter of "
                                         f"{type(model).__name__}")
                    loader = getattr(param, "weight_loader", None)
                    sl = f.get_slice(name)
                    try:
                        if shard_id is not None:
                            loader(param, sl, shard_id)
                        elif loader is not None:
                            loader(param, sl)
                        else:
                            default_weight_loader(param, sl)
                    except ValueError as e:  # name the tensor: a wrong shape, dtype or scale is the checkpoint's
                        raise ValueError(f"checkpoint tensor {name!r}: {e}") from e
                    loaded.add(target)
            progress.update(os.path.getsize(file))
    # (A quantized layer's derived or optional parameters, such as online FP8 scales or GPTQ's g_idx,
    # are not required of the checkpoint: quantization/methods.py.)
    missing = sorted(n for n in set(params) - loaded if getattr(params[n], "checkpoint_required", True))
    if missing:
        raise ValueError(f"checkpoint at {path} lacks weights for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    for module_name, module in model.named_modules():
        try:
            if isinstance(module, (LinearBase, FusedExperts)):
                module.method.process_weights_after_loading(module)
            elif isinstance(module, Attention):
                module.backend.process_weights_after_loading(module)
        except ValueError as e:
            raise ValueError(f"{module_name}: {e}") from e
