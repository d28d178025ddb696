"""Which Hugging Face architectures carpool runs: one adapter per model family.

A family adapter says which class runs the architecture and how the family reads the parts of its
config.json that families spell differently (biases, sliding windows). Adding a family (an MoE, say) is
a new entry here and a model class; nothing else checks architecture names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn


def _no_window(cfg: dict[str, Any]) -> int | None:
    """Qwen configs carry a sliding_window that applies only when use_sliding_window is set."""
    return cfg.get("sliding_window") if cfg.get("use_sliding_window") else None


def _window(cfg: dict[str, Any]) -> int | None:
    return cfg.get("sliding_window")


def _llama_biases(cfg: dict[str, Any]) -> tuple[bool, bool]:
    """Llama's (and Qwen3's) attention_bias puts biases on q, k, v and o."""
    bias = bool(cfg.get("attention_bias", False))
    return bias, bias


def _qwen2_biases(cfg: dict[str, Any]) -> tuple[bool, bool]:
    """Qwen2 has q/k/v biases and none on o_proj."""
    return bool(cfg.get("attention_bias", True)), False


@dataclass(frozen=True)
class ModelFamily:
    module: str
    class_name: str
    # config.json -> (q/k/v bias, o_proj bias)
    attention_biases: Callable[[dict[str, Any]], tuple[bool, bool]] = _llama_biases
    # config.json -> the attention window in tokens, or None for full attention
    sliding_window: Callable[[dict[str, Any]], int | None] = _window

    def model_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.class_name)


_FAMILIES: dict[str, ModelFamily] = {
    "LlamaForCausalLM": ModelFamily("carpool.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ModelFamily("carpool.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ModelFamily("carpool.models.llama", "LlamaForCausalLM", _qwen2_biases, _no_window),
    "Qwen3ForCausalLM": ModelFamily("carpool.models.qwen3", "Qwen3ForCausalLM", sliding_window=_no_window),
}

SUPPORTED_ARCHITECTURES = tuple(_FAMILIES)


def resolve_architecture(architectures: list[str]) -> str:
    for arch in architectures:
        if arch in _FAMILIES:
            return arch
    raise ValueError(f"model architecture {architectures or '(none given)'} is not supported; "
                     f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def get_family(architecture: str) -> ModelFamily:
    return _FAMILIES[resolve_architecture([architecture])]


def get_model_class(architecture: str) -> type[nn.Module]:
    return get_family(architecture).model_class()
