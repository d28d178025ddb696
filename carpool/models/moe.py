"""Mixture-of-experts decoders: Qwen3-MoE, Qwen2-MoE and Mixtral.

Each is the Llama-family decoder (Qwen3's attention for Qwen3-MoE) whose MLP hook builds, per layer,
either a `SparseMoeBlock` or, for a layer the config keeps dense (decoder_sparse_step, mlp_only_layers),
the dense `LlamaMLP` of the config's intermediate_size. A sparse block is the router (a replicated
[num_experts, hidden] projection), the family's top-k routing (layers/moe/routing.py), the routed experts
computed by the kernel backend's `fused_moe` (the torch expert loop on CPU, the fused Triton op on GPU)
and, for Qwen2-MoE, a shared expert scaled by a sigmoid gate. Like every MLP it returns this rank's
partial sums, which the decoder layer reduces. Under tensor parallelism the routed experts are split
along their intermediate dimension, or with expert parallelism (`ModelRuntime.expert_parallel`) divided
whole among the ranks (layers/moe/experts.py); `expert_layout` states which. Under a quantization
scheme the routed experts take the runtime's experts method (FP8 or 4-bit stacks with their scales,
quantization/moe_methods.py), the dense projections their linear methods, and the routers none.

What differs between the families is data: the MoEConfig the registry's adapter read from config.json,
and the checkpoint's names for the experts (`checkpoint_name_map`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from carpool.config import ModelConfig
from carpool.distributed import PartialSums
from carpool.layers.activation import SiluAndMul
from carpool.layers.linear import LinearBase, MergedColumnParallelLinear, RowParallelLinear
from carpool.layers.moe import FusedExperts, Routing
from carpool.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from carpool.models.qwen3 import Qwen3DecoderLayer
from carpool.models.runtime import ModelRuntime

logger = logging.getLogger(__name__)

# What an expert projection's checkpoint tensors end in: the weight, and the tensors of quantized formats
# (stacked under the same suffix: `experts.3.up_proj.weight_scale_inv` -> `experts.w13_weight_scale_inv`):
# FP8 scales; AWQ / GPTQ qweight, qzeros, scales, g_idx; compressed-tensors pack-quantized.
EXPERT_TENSOR_SUFFIXES = ("weight", "weight_scale_inv", "weight_scale", "input_scale", "qweight", "qzeros", "scales",
                          "g_idx", "weight_packed", "weight_zero_point", "weight_shape")


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert: a gated MLP split across ranks like a dense one. Returns a plain
    tensor of this rank's partial sums (never pushed to the other ranks: the block adds them to the
    routed experts' partial sums before the one reduction)."""

    def __init__(self, config: ModelConfig, runtime: ModelRuntime, intermediate_size: int, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [intermediate_size] * 2,
                                                       dtype=config.dtype, comm=runtime.comm,
                                                       method=runtime.linear_method(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(intermediate_size, config.hidden_size, dtype=config.dtype,
                                           comm=runtime.comm, method=runtime.linear_method(f"{prefix}.down_proj"))
        self.act_fn = SiluAndMul(runtime.ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj.silu_and_mul(x, self.act_fn)
        return self.down_proj.method.apply(self.down_proj, h, None)


class SparseMoeBlock(nn.Module):
    """router -> top-k routing -> routed experts (+ sigmoid(shared_expert_gate(x)) * shared_expert(x)).

    Everything runs on the device with shapes fixed by the token count (no host sync on the Triton
    backend), so a decode step's block is captured in its CUDA graph like a dense MLP. On the Triton
    backend (KernelConfig.fused_moe_routing) one Triton kernel routes from the router logits: a
    batch-1 Qwen3-MoE block is then four kernels (router GEMV, routing, gate/up GEMV, down GEMV), all
    under PDL, where torch's routing added five that are not."""

    def __init__(self, config: ModelConfig, runtime: ModelRuntime, layer_index: int) -> None:
        super().__init__()
        moe = config.moe
        if moe is None:
            raise ValueError(f"model: {config.architecture} layer {layer_index} is sparse but the config has no "
                             "mixture-of-experts settings")
        if runtime.ops.fused_moe is None:
            raise ValueError(f"kernel backend {runtime.ops.name!r} has no fused_moe op")
        prefix = f"model.layers.{layer_index}.mlp"
        h, dtype = config.hidden_size, config.dtype
        self.routing = Routing(moe.num_experts, moe.num_experts_per_tok, renormalize=moe.norm_topk_prob,
                               weights_in_logits_dtype=moe.router_weights_in_model_dtype)
        # Routers stay in the model dtype under any quantization: their logits choose the experts, and the
        # formats leave them so (transformers' FP8 quantizer converts nn.Linear modules only, which its
        # routers are not; llm-compressor's MoE recipes ignore `mlp.gate`).
        self.gate = LinearBase(h, moe.num_experts, False, dtype, runtime.unquantized_linear_method())
        # (an ignore list is matched against Qwen's expert module names; Mixtral's lists name no experts)
        experts_method = runtime.experts_method(f"{prefix}.experts", moe.num_experts,
                                                ("gate_proj", "up_proj", "down_proj"))
        routed = runtime.ops.fused_moe_routed if runtime.kernels.fused_moe_routing else None
        self.experts = FusedExperts(moe.num_experts, h, moe.moe_intermediate_size, dtype, runtime.ops.fused_moe,
                                    runtime.comm, expert_parallel=runtime.expert_parallel, method=experts_method,
                                    fused_moe_routed=routed)
        self.shared_expert: SharedExpert | None = None
        self.shared_expert_gate: LinearBase | None = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(config, runtime, moe.shared_expert_intermediate_size,
                                              f"{prefix}.shared_expert")
            self.shared_expert_gate = LinearBase(h, 1, False, dtype, runtime.unquantized_linear_method())

    def input_quantization(self, num_tokens: int, dtype: torch.dtype) -> None:
        """None: the router reads the model-dtype input (and the experts quantize their own)."""
        return None

    def forward(self, x: torch.Tensor) -> PartialSums:
        router_logits = self.gate(x)
        if self.experts.fused_moe_routed is not None:
            out = self.experts.forward_routed(x, router_logits, self.routing.kernel_routing)
        else:
            topk_weights, topk_ids = self.routing.select(router_logits)
            out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            # a per-token scale of this rank's partial sums is a partial sum of the scaled whole
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return PartialSums(out)


def sparse_or_dense_mlp(config: ModelConfig, runtime: ModelRuntime, layer_index: int) -> nn.Module:
    """The MLP of layer `layer_index`: a SparseMoeBlock where the config makes the layer sparse, else the
    dense gated MLP of config.intermediate_size (as transformers builds it)."""
    if config.moe is not None and config.moe.is_moe_layer(layer_index):
        return SparseMoeBlock(config, runtime, layer_index)
    return LlamaMLP(config, runtime, layer_index)


class MoeDecoderLayer(LlamaDecoderLayer):
    mlp_cls = staticmethod(sparse_or_dense_mlp)  # type: ignore[assignment]


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    mlp_cls = staticmethod(sparse_or_dense_mlp)  # type: ignore[assignment]


def parameter_counts(config: ModelConfig, qk_norm: bool) -> tuple[int, int]:
    """(total, active per token) parameters of the whole model, over all tensor-parallel ranks: a token
    uses every weight except the routed experts it was not sent to (num_experts - top_k per sparse layer).
    qk_norm: the attention has per-head q/k RMSNorm weights (Qwen3)."""
    h, hd, moe = config.hidden_size, config.head_dim, config.moe
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    attention = (h * (q + 2 * kv) + q * h + (q + 2 * kv) * config.qkv_bias + h * config.o_proj_bias
                 + 2 * hd * qk_norm)
    total = active = config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + h  # + the final norm
    for i in range(config.num_hidden_layers):
        common = attention + 2 * h  # + the two norms
        if moe is None or not moe.is_moe_layer(i):
            total += common + 3 * h * config.intermediate_size
            active += common + 3 * h * config.intermediate_size
            continue
        common += moe.num_experts * h  # router
        if moe.shared_expert_intermediate_size:
            common += 3 * h * moe.shared_expert_intermediate_size + h  # shared expert and its gate
        expert = 3 * h * moe.moe_intermediate_size
        total += common + moe.num_experts * expert
        active += common + moe.num_experts_per_tok * expert
    return total, active


def expert_layout(config: ModelConfig, tp_size: int, expert_parallel: bool) -> dict[str, Any] | None:
    """How the routed experts are divided among `tp_size` ranks (None for a dense model): whole experts
    per rank under expert parallelism (rank r holds global experts r * experts_per_rank onwards), else
    every expert on every rank with a 1 / tp_size slice of its intermediate dimension."""
    moe = config.moe
    if moe is None:
        return None
    if expert_parallel:
        return {"expert_parallel": True, "num_experts": moe.num_experts,
                "experts_per_rank": moe.num_experts // tp_size,
                "moe_intermediate_size_per_rank": moe.moe_intermediate_size}
    return {"expert_parallel": False, "num_experts": moe.num_experts, "experts_per_rank": moe.num_experts,
            "moe_intermediate_size_per_rank": moe.moe_intermediate_size // tp_size}


def _describe_layout(layout: dict[str, Any], tp_size: int) -> str:
    if layout["expert_parallel"]:
        per = layout["experts_per_rank"]
        return (f"; expert parallel over {tp_size} rank(s): {per} whole experts per rank (rank r holds experts "
                f"{per}r..{per}r+{per - 1})")
    if tp_size > 1:
        return (f"; every expert on each of {tp_size} ranks, {layout['moe_intermediate_size_per_rank']} of its "
                "intermediate rows per rank")
    return ""


def _human(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


class MoeForCausalLM(LlamaForCausalLM):
    """The decoder with sparse MLPs; subclasses name their checkpoint's expert tensors."""

    layer_cls = MoeDecoderLayer
    qk_norm = False
    # the checkpoint's name of a layer's MLP module, and of each expert projection -> our shard kind
    checkpoint_mlp_name = "mlp"
    checkpoint_expert_names: dict[str, str] = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def __init__(self, config: ModelConfig, runtime: ModelRuntime | None = None) -> None:
        runtime = runtime or ModelRuntime.plain()
        super().__init__(config, runtime)
        mlp = re.escape(self.checkpoint_mlp_name)
        self._expert_name = re.compile(rf"^(model\.layers\.\d+)\.{mlp}\.experts\.(\d+)\.(\w+)\."
                                       rf"({'|'.join(EXPERT_TENSOR_SUFFIXES)})$")
        self._quantized_router = re.compile(rf"\.{mlp}\.(gate|shared_expert_gate)\.(weight_scale|weight_scale_inv|"
                                            rf"input_scale|qweight|weight_packed)$")
        moe = config.moe
        if moe is not None and runtime.comm.rank == 0:
            total, active = parameter_counts(config, self.qk_norm)
            sparse = sum(moe.is_moe_layer(i) for i in range(config.num_hidden_layers))
            layout = expert_layout(config, runtime.comm.size, runtime.expert_parallel)
            assert layout is not None
            logger.info("%s: %d of %d layers mixture-of-experts, %d experts, top-%d%s; %s parameters, %s active "
                        "per token%s", config.architecture, sparse, config.num_hidden_layers, moe.num_experts,
                        moe.num_experts_per_tok, " + a shared expert" if moe.shared_expert_intermediate_size else "",
                        _human(total), _human(active), _describe_layout(layout, runtime.comm.size))

    def checkpoint_name_map(self, name: str) -> tuple[str, Any] | None:
        match = self._expert_name.match(name)
        if match is not None:
            layer, expert, projection, suffix = match.groups()
            kind = self.checkpoint_expert_names.get(projection)
            if kind is None:
                raise ValueError(f"checkpoint tensor {name!r}: unknown expert projection {projection!r}")
            return f"{layer}.mlp.experts.{'w2' if kind == 'w2' else 'w13'}_{suffix}", (kind, int(expert))
        if self._quantized_router.search(name):
            raise ValueError(f"checkpoint tensor {name!r}: this checkpoint quantizes a router; carpool runs routers "
                             "in the model dtype (the quantization_config's ignore list should name it)")
        if self.checkpoint_mlp_name != "mlp":
            name = name.replace(f".{self.checkpoint_mlp_name}.", ".mlp.")
        return super().checkpoint_name_map(name)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
    qk_norm = True


class Qwen2MoeForCausalLM(MoeForCausalLM):
    pass


class MixtralForCausalLM(MoeForCausalLM):
    checkpoint_mlp_name = "block_sparse_moe"
    checkpoint_expert_names = {"w1": "w1", "w3": "w3", "w2": "w2"}
