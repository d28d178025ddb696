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

from carpool.config import MoEConfig


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


def _qwen2_moe_biases(cfg: dict[str, Any]) -> tuple[bool, bool]:
    """Qwen2-MoE spells its q/k/v biases `qkv_bias` (on unless set false); none on o_proj."""
    return bool(cfg.get("qkv_bias", True)), False


def _dense(cfg: dict[str, Any]) -> MoEConfig | None:
    return None


def _qwen_moe(cfg: dict[str, Any]) -> MoEConfig | None:
    """Qwen2-MoE and Qwen3-MoE: softmax top-k, renormalized when norm_topk_prob; sparse layers chosen by
    decoder_sparse_step and mlp_only_layers; Qwen2-MoE adds a shared expert. No experts: every layer
    dense, as transformers builds it. (transformers >= 5 writes Qwen3-MoE's num_experts as
    num_local_experts.)"""
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if num_experts == 0:
        return None
    step = cfg.get("decoder_sparse_step")  # (0 is refused by MoEConfig, not read as the default)
    return MoEConfig(num_experts=num_experts,
                     num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                     moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                     norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), router_weights_in_model_dtype=True,
                     shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
                     decoder_sparse_step=1 if step is None else int(step),
                     mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()))


def _mixtral_moe(cfg: dict[str, Any]) -> MoEConfig:
    """Mixtral: every layer sparse, experts of intermediate_size, top-k always renormalized, float32 weights."""
    return MoEConfig(num_experts=int(cfg.get("num_local_experts", 8)),
                     num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
                     moe_intermediate_size=int(cfg["intermediate_size"]), norm_topk_prob=True,
                     router_weights_in_model_dtype=False)


@dataclass(frozen=True)
class ModelFamily:
    module: str
    class_name: str
    # config.json -> (q/k/v bias, o_proj bias)
    attention_biases: Callable[[dict[str, Any]], tuple[bool, bool]] = _llama_biases
    # config.json -> the attention window in tokens, or None for full attention
    sliding_window: Callable[[dict[str, Any]], int | None] = _window
    # config.json -> the mixture-of-experts settings, or None for a dense model
    moe: Callable[[dict[str, Any]], MoEConfig | None] = _dense

    def model_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.class_name)


_FAMILIES: dict[str, ModelFamily] = {
    "LlamaForCausalLM": ModelFamily("carpool.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ModelFamily("carpool.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ModelFamily("carpool.models.llama", "LlamaForCausalLM", _qwen2_biases, _no_window),
    "Qwen3ForCausalLM": ModelFamily("carpool.models.qwen3", "Qwen3ForCausalLM", sliding_window=_no_window),
    "Qwen2MoeForCausalLM": ModelFamily("carpool.models.moe", "Qwen2MoeForCausalLM", _qwen2_moe_biases, _no_window,
                                       moe=_qwen_moe),
    "Qwen3MoeForCausalLM": ModelFamily("carpool.models.moe", "Qwen3MoeForCausalLM", sliding_window=_no_window,
                                       moe=_qwen_moe),
    "MixtralForCausalLM": ModelFamily("carpool.models.moe", "MixtralForCausalLM", moe=_mixtral_moe),
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
