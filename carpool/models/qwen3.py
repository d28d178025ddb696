"""Qwen3: the Llama decoder plus a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

import torch

from carpool.config import ModelConfig
from carpool.layers.norm import RMSNorm
from carpool.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from carpool.models.runtime import ModelRuntime


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, runtime: ModelRuntime, layer_index: int) -> None:
        super().__init__(config, runtime, layer_index)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, runtime.ops, config.dtype)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, runtime.ops, config.dtype)

    def qk_norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
