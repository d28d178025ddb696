"""Which Hugging Face architectures carpool runs, and the class that runs each."""

from __future__ import annotations

import importlib

from torch import nn

# HF architecture name -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("carpool.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("carpool.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("carpool.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("carpool.models.qwen3", "Qwen3ForCausalLM"),
}

SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def resolve_architecture(architectures: list[str]) -> str:
    for arch in architectures:
        if arch in _MODELS:
            return arch
    raise ValueError(f"model architecture {architectures or '(none given)'} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def get_model_class(architecture: str) -> type[nn.Module]:
    module, name = _MODELS[resolve_architecture([architecture])]
    return getattr(importlib.import_module(module), name)
