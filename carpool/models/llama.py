"""Llama-family decoder (Llama, Mistral, Qwen2) over a packed batch and a paged KV cache.

Read top to bottom: embedding -> N x (RMSNorm, attention with RoPE, RMSNorm, gated MLP) -> RMSNorm ->
LM head. Differences between the families are flags read from the config: Qwen2 has q/k/v biases;
Qwen3 (qwen3.py) adds a per-head RMSNorm on q and k.
"""

from __future__ import annotations

import torch
from torch import nn

from carpool.config import ModelConfig
from carpool.distributed import SINGLE, TPGroup
from carpool.forward_batch import ForwardBatch
from carpool.layers.activation import SiluAndMul
from carpool.layers.attention import Attention
from carpool.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from carpool.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from carpool.layers.norm import RMSNorm
from carpool.layers.rotary import RotaryEmbedding
from carpool.ops import KernelOps


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, ops: KernelOps, tp: TPGroup) -> None:
        super().__init__()
        dtype = config.dtype
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias,
                                          dtype=dtype, tp=tp)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Qwen2 puts biases on q/k/v only; Llama's attention_bias covers o_proj too.
        o_bias = config.attention_bias and config.architecture != "Qwen2ForCausalLM"
        # Without a bias o_proj returns partial sums: post_attention_layernorm all-reduces them (fused).
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                        bias=o_bias, dtype=dtype, tp=tp, reduce_results=o_bias)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, ops)

    def qk_norm_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(q weight, k weight, eps) of a per-head q/k RMSNorm before RoPE; none here (Qwen3 has one)."""
        return None, None, 0.0

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        q_norm, k_norm, eps = self.qk_norm_weights()
        q = None
        if q_norm is None and k_norm is None:  # a batch-1 step: projection, RoPE and store in one kernel
            q = self.qkv_proj.fused_rope_and_store_kv(hidden, positions, self.rotary_emb.cos_sin_cache,
                                                      self.attn.k_cache, self.attn.v_cache, batch.attn.slot_mapping)
        if q is None:
            qkv = self.qkv_proj(hidden)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            # RoPE and the KV-cache store in one op; attention then reads this step's k and v from the cache.
            q = self.attn.rope_and_store_kv(positions, q, k, v, self.rotary_emb.cos_sin_cache, batch,
                                            q_norm, k_norm, eps)
        out = self.attn(q, None, None, batch)
        return self.o_proj(out.view(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: KernelOps, tp: TPGroup) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       dtype=config.dtype, tp=tp)
        # Partial sums: the next RMSNorm (the next layer's input_layernorm, or the final norm) reduces them.
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           dtype=config.dtype, tp=tp, reduce_results=False)
        self.act_fn = SiluAndMul(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.gate_up_proj.fused_silu_and_mul(x)  # batch-1 steps on GPU: one kernel
        if act is None:
            act = self.act_fn(self.gate_up_proj(x))
        return self.down_proj(act)


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: ModelConfig, ops: KernelOps, tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, ops, tp)
        self.mlp = LlamaMLP(config, ops, tp)
        # Each norm that takes a residual first all-reduces the row-parallel output before it.
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, config.dtype, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, config.dtype,
                                                SINGLE if self.self_attn.o_proj.reduce_results else tp)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, ops: KernelOps, tp: TPGroup,
                 layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, config.dtype, tp)
        self.layers = nn.ModuleList([layer_cls(config, ops, tp) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, config.dtype, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden, residual = self.embed_tokens.forward_with_residual(input_ids)
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, ops: KernelOps, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ops, tp, self.layer_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, config.dtype, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
