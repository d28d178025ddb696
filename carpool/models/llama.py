"""Llama-family decoder (Llama, Mistral, Qwen2) over a packed batch.

Read top to bottom: embedding -> N x (RMSNorm, attention with RoPE, RMSNorm, gated MLP) -> RMSNorm ->
LM head. What differs between families is read from the config (biases: models/registry.py) or is a
subclass hook: `attention_cls` (Qwen3 adds a per-head q/k RMSNorm) and `mlp_cls` (where a mixture of
experts replaces the gated MLP).

Under tensor parallelism the exchanges are explicit: a row-parallel projection (and the embedding)
returns this rank's `PartialSums`, and each norm that follows reduces them through the runtime's
communicator. How the model runs (kernels, attention backend, linear methods) is the `ModelRuntime`'s.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carpool.config import ModelConfig
from carpool.distributed import PartialSums
from carpool.forward_batch import ForwardBatch
from carpool.layers.activation import SiluAndMul
from carpool.layers.attention import Attention
from carpool.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from carpool.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from carpool.layers.linear_method import QuantizedActivation
from carpool.layers.norm import RMSNorm
from carpool.layers.rotary import RotaryEmbedding
from carpool.models.runtime import ModelRuntime

if TYPE_CHECKING:
    from carpool.ops.triton.quant_gemm import Fp8ActivationPlan

# A checkpoint's KV-cache scales: compressed-tensors' `self_attn.k_scale` / `v_scale`, or the
# `self_attn.k_proj.output_scale` / `v_proj.output_scale` of older FP8 checkpoints.
_KV_SCALE = re.compile(r"^(.*\.self_attn)\.(k|v)(?:_scale|_proj\.output_scale)$")


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, runtime: ModelRuntime, layer_index: int) -> None:
        super().__init__()
        dtype, comm, prefix = config.dtype, runtime.comm, f"model.layers.{layer_index}.self_attn"
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.qkv_bias, dtype=dtype, comm=comm,
                                          method=runtime.linear_method(f"{prefix}.qkv_proj"))
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                        bias=config.o_proj_bias, dtype=dtype, comm=comm,
                                        method=runtime.linear_method(f"{prefix}.o_proj"))
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                              runtime.attention)

    def qk_norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(q weight, k weight, eps) of a per-head q/k RMSNorm before RoPE; none here (Qwen3 has one)."""
        return None, None, 0.0

    def input_quantization(self, num_tokens: int, dtype: torch.dtype) -> Fp8ActivationPlan | None:
        """How the q/k/v projection would quantize its input (LinearMethod.input_quantization)."""
        return self.qkv_proj.input_quantization(num_tokens, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor | QuantizedActivation,
                batch: ForwardBatch) -> PartialSums:
        """hidden: the normed residual stream, or as input_quantization asked."""
        q_norm, k_norm, eps = self.qk_norm_weights()
        cos_sin = self.rotary_emb.cos_sin_cache
        out = None
        # a batch-1 GPU step: projection, RoPE and store in one kernel
        if q_norm is None and k_norm is None and isinstance(hidden, torch.Tensor):
            out = self.attn.fused_qkv_forward(self.qkv_proj, hidden, positions, cos_sin, batch)
        if out is None:
            q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            out = self.attn(positions, q.view(-1, self.num_heads, self.head_dim),
                            k.view(-1, self.num_kv_heads, self.head_dim), v.view(-1, self.num_kv_heads, self.head_dim),
                            cos_sin, batch, q_norm, k_norm, eps)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); returns this rank's partial sums of the down projection."""

    def __init__(self, config: ModelConfig, runtime: ModelRuntime, layer_index: int) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_index}.mlp"
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       dtype=config.dtype, comm=runtime.comm,
                                                       method=runtime.linear_method(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, dtype=config.dtype,
                                           comm=runtime.comm, method=runtime.linear_method(f"{prefix}.down_proj"))
        self.act_fn = SiluAndMul(runtime.ops)

    def input_quantization(self, num_tokens: int, dtype: torch.dtype) -> Fp8ActivationPlan | None:
        """How the gate/up projection would quantize its input (LinearMethod.input_quantization)."""
        return self.gate_up_proj.input_quantization(num_tokens, dtype)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> PartialSums:
        """x: the normed residual stream, or as input_quantization asked."""
        if isinstance(x, QuantizedActivation):
            num_tokens, dtype = x.num_tokens, x.plan.dtype
        else:
            num_tokens, dtype = x.shape[0], x.dtype
        down_input = self.down_proj.input_quantization(num_tokens, dtype)
        return self.down_proj(self.gate_up_proj.silu_and_mul(x, self.act_fn, down_input))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[nn.Module] = LlamaAttention
    mlp_cls: type[nn.Module] = LlamaMLP

    def __init__(self, config: ModelConfig, runtime: ModelRuntime, layer_index: int) -> None:
        super().__init__()
        self.comm = runtime.comm
        self.self_attn = self.attention_cls(config, runtime, layer_index)
        self.mlp = self.mlp_cls(config, runtime, layer_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime.ops, config.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime.ops, config.dtype)

    def forward(self, positions: torch.Tensor, partial: PartialSums, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[PartialSums, torch.Tensor]:
        """partial: the previous layer's MLP output (or the embedding), unreduced; returns this layer's."""
        num_tokens, dtype = partial.value.shape[0], partial.value.dtype
        # (a projection that quantizes its input may have the norm before it write it quantized)
        hidden, residual = self.comm.reduce_add_rms_norm(partial, residual, self.input_layernorm,
                                                         self.self_attn.input_quantization(num_tokens, dtype))
        attn = self.self_attn(positions, hidden, batch)
        hidden, residual = self.comm.reduce_add_rms_norm(attn, residual, self.post_attention_layernorm,
                                                         self.mlp.input_quantization(num_tokens, dtype))
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, runtime: ModelRuntime,
                 layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer) -> None:
        super().__init__()
        self.comm = runtime.comm
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, config.dtype, runtime.comm)
        self.layers = nn.ModuleList([layer_cls(config, runtime, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, runtime.ops, config.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        partial, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            partial, residual = layer(positions, partial, residual, batch)
        hidden, _ = self.comm.reduce_add_rms_norm(partial, residual, self.norm)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter, shard id)
    packed_modules_mapping: dict[str, tuple[str, Any]] = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, runtime: ModelRuntime | None = None) -> None:
        super().__init__()
        runtime = runtime or ModelRuntime.plain()
        self.config = config
        self.model = LlamaModel(config, runtime, self.layer_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, config.dtype, runtime.comm,
                                      runtime.lm_head_gemv())
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def checkpoint_name_map(self, name: str) -> tuple[str, Any] | None:
        """(our parameter's name, shard id for its weight_loader) of checkpoint tensor `name`; None for a
        tensor this model does not load (rotary caches; the head when tied to the embedding)."""
        if name.endswith(("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")):
            return None
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            return None
        kv_scale = _KV_SCALE.match(name)
        if kv_scale is not None:  # an FP8 KV cache's per-layer scale, on the layer's Attention when it has one
            attn = self.get_submodule(f"{kv_scale[1]}.attn")
            target = f"{kv_scale[1]}.attn.{kv_scale[2]}_scale"
            return (target, None) if hasattr(attn, f"{kv_scale[2]}_scale") else None
        for ckpt_part, (ours, shard) in self.packed_modules_mapping.items():
            if f".{ckpt_part}." in name:
                return name.replace(ckpt_part, ours), shard
        return name, None
