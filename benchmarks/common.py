"""Shared pieces of the benchmarks: model shapes, random checkpoints, the two hardware ceilings measured
in the same run (copy bandwidth, bf16 matmul rate), and the roofline arithmetic."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

# Shapes named in the issues (random weights: only the arithmetic and the bytes matter).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0),
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                      hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "qwen3-14b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                      hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                      max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0),
    # mixture of experts: every layer sparse, 128 experts of intermediate 768, top-8 renormalized
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[],
                          max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0),
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# quantization_config of random (--load-format dummy) checkpoints of a quantized format (--quant-format)
QUANT_FORMATS: dict[str, dict[str, Any]] = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                  "weight_block_size": [128, 128]},
    "fp8-channel": {"quant_method": "compressed-tensors", "format": "float-quantized",
                    "quantization_status": "compressed",
                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                        "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
}
# bytes per linear-layer weight a decode step reads, by --quant-format / --quantization (None: bf16):
# 4 bits plus a bf16 scale and a 4-bit zero point per group of 128
LINEAR_BYTES: dict[str | None, float] = {None: 2.0, "fp8": 1.0, "fp8-block": 1.0, "fp8-channel": 1.0,
                                         "awq": 0.5 + 2.5 / 128, "gptq": 0.5 + 2.5 / 128}


def write_config(path: str, shape: str, dtype: str = "bfloat16", quant_format: str | None = None) -> str:
    os.makedirs(path, exist_ok=True)
    cfg = {**SHAPES[shape], "torch_dtype": dtype, "bos_token_id": 0, "eos_token_id": 1}
    if quant_format is not None:
        cfg["quantization_config"] = QUANT_FORMATS[quant_format]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def write_random_checkpoint(path: str, shape: str, seed: int = 0, std: float = 0.02) -> str:
    """A real safetensors checkpoint with Hugging Face names and random bf16 weights, drawn on the GPU
    when there is one (fast) and saved to disk, so the engine loads it through its real loader."""
    from safetensors.torch import save_file

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    cfg = SHAPES[shape]
    if cfg.get("num_experts"):
        raise SystemExit(f"{shape}: no checkpoint is written for mixture-of-experts shapes (tens of GB); "
                         "pass --load-format dummy")
    write_config(path, shape)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rnd(*shape_: int) -> torch.Tensor:
        return (torch.randn(*shape_, generator=gen, device=dev) * std).to(torch.bfloat16).cpu()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": ones(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": rnd(nh * hd, h), p + "self_attn.k_proj.weight": rnd(nkv * hd, h),
                   p + "self_attn.v_proj.weight": rnd(nkv * hd, h), p + "self_attn.o_proj.weight": rnd(h, nh * hd),
                   p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                   p + "mlp.down_proj.weight": rnd(h, inter), p + "input_layernorm.weight": ones(h),
                   p + "post_attention_layernorm.weight": ones(h)})
        if cfg["model_type"] == "qwen3":
            sd[p + "self_attn.q_norm.weight"] = ones(hd)
            sd[p + "self_attn.k_norm.weight"] = ones(hd)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rnd(v, h)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


@dataclass
class ModelArithmetic:
    """Bytes and FLOPs of one model shape, from its config.

    Mixture of experts: a decode step reads every weight except the routed experts no token of the step
    chose. `weight_bytes` are the weights every step reads (for a dense model: all of them, less the
    embedding table); `expert_bytes` one routed expert's weights summed over the sparse layers, read once
    per step for each distinct expert the step's tokens select (`decode_weight_bytes`)."""

    weight_bytes: int
    kv_bytes_per_token: int
    linear_flops_per_token: int  # all decoder-layer matmuls, per token (MoE: the top_k chosen experts)
    lm_head_flops: int  # per sampled token
    attn_flops_per_key: int  # per (query token, key) pair: QK^T and PV
    expert_bytes: int = 0
    num_experts: int = 0
    top_k: int = 0

    @staticmethod
    def of(shape: str, linear_bytes: float = 2, kv_dtype_bytes: int = 2) -> "ModelArithmetic":
        """linear_bytes: bytes per weight of the decoder layers' linear projections and experts (2 bf16,
        1 FP8, about 0.52 for 4 bits with group-128 scales and zeros: LINEAR_BYTES); routers, the embedding
        and the LM head stay bf16, as the quantized checkpoints keep them. kv_dtype_bytes: bytes per cached K
        or V element (2 bf16, 1 FP8)."""
        c = SHAPES[shape]
        h, inter, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
        hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
        attention = h * (nh + 2 * nkv) * hd + nh * hd * h
        num_experts, top_k = c.get("num_experts", 0), c.get("num_experts_per_tok", 0)
        mlp_only, step = c.get("mlp_only_layers", []), c.get("decoder_sparse_step", 1)
        sparse = sum(1 for i in range(L) if num_experts and i not in mlp_only and (i + 1) % step == 0)
        shared = c.get("shared_expert_intermediate_size", 0)
        # read by every step: attention, dense MLPs, shared experts (linear) and routers, shared-expert gates
        always_linear = L * attention + (L - sparse) * 3 * h * inter + sparse * 3 * h * shared
        always_bf16 = sparse * (num_experts * h + (h if shared else 0))
        expert = sparse * 3 * h * c.get("moe_intermediate_size", 0)  # one routed expert, every sparse layer
        embed = v * h
        head = 0 if c["tie_word_embeddings"] else v * h
        # a decode step reads every layer, the LM head (the embedding too when tied), not the lookup table
        head_params = embed if c["tie_word_embeddings"] else head
        weight_bytes = always_linear * linear_bytes + (always_bf16 + head_params) * 2
        return ModelArithmetic(weight_bytes=int(weight_bytes),
                               kv_bytes_per_token=2 * L * nkv * hd * kv_dtype_bytes,
                               linear_flops_per_token=2 * (always_linear + always_bf16 + top_k * expert),
                               lm_head_flops=2 * v * h,
                               attn_flops_per_key=4 * L * nh * hd, expert_bytes=int(expert * linear_bytes),
                               num_experts=num_experts, top_k=top_k)

    def expected_distinct_experts(self, batch: int) -> float:
        """Distinct experts per sparse layer that `batch` tokens select when each picks top_k of
        num_experts uniformly at random: E (1 - (1 - k/E)^batch) (k at batch 1; 125.9 of 128 at batch 64,
        all 128 at 256 for Qwen3-30B-A3B). Random (dummy) weights route close to uniformly."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** batch)

    def decode_weight_bytes(self, batch: int) -> float:
        """Weight bytes a decode step of `batch` tokens reads."""
        return self.weight_bytes + self.expert_bytes * self.expected_distinct_experts(batch)


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 32) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return nbytes / times[len(times) // 2]


def measure_matmul_flops(device: str = "cuda", n: int = 8192) -> float:
    """bf16 matmul n^3 on random data, FLOP/s (median of 10 after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2]


def emit(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


class Timer:
    def __enter__(self) -> "Timer":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def add_engine_flags(ap: argparse.ArgumentParser) -> None:
    """The engine settings the latency and throughput benchmarks both expose (vLLM's flag names), and
    every GPU fast path as the engine's own --X / --no-X flag (KernelConfig): an ablation is a field."""
    from dataclasses import fields

    from carpool.config import KernelConfig
    from carpool.engine.arg_utils import KERNEL_FLAG_HELP

    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    ap.add_argument("--disable-custom-all-reduce", action="store_true", help="TP: NCCL for every all-reduce")
    ap.add_argument("--enable-expert-parallel", action="store_true",
                    help="TP, mixture of experts: whole experts per rank instead of a slice of every expert")
    ap.add_argument("--quantization", default=None, choices=["fp8"],
                    help="fp8: quantize the (bf16) checkpoint to FP8 while loading")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="fp8: an e4m3 KV cache")
    ap.add_argument("--quant-format", default=None, choices=sorted(QUANT_FORMATS),
                    help="random weights (--load-format dummy, no --model) of a quantized checkpoint format")
    # each fast path's default is the engine's (KernelConfig): a path that is off until measured stays off
    defaults = {f.name: f.default for f in fields(KernelConfig)}
    for name, help_text in KERNEL_FLAG_HELP.items():
        ap.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                        default=defaults[name], help=help_text)


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """add_engine_flags' values as LLM keyword arguments."""
    from carpool.engine.arg_utils import KERNEL_FLAG_HELP

    return dict(enforce_eager=args.enforce_eager, tensor_parallel_size=args.tensor_parallel_size,
                disable_custom_all_reduce=args.disable_custom_all_reduce,
                enable_expert_parallel=args.enable_expert_parallel, quantization=args.quantization,
                kv_cache_dtype=args.kv_cache_dtype,
                **{name: getattr(args, name) for name in KERNEL_FLAG_HELP})
