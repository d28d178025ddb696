"""EngineArgs: the user-facing knobs, one field per CLI flag (vLLM's names), turned into an EngineConfig.

`LLM(model, **kwargs)` takes the same names in snake_case, so a flag and a keyword never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from carpool.config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from carpool.models.registry import SUPPORTED_ARCHITECTURES
from carpool.platform import default_device, kernel_backend_for
from carpool.quantization.config import (
    FP8_BLOCK,
    KV_CACHE_DTYPES,
    QUANTIZATION_CHOICES,
    Fp8Scheme,
    QuantScheme,
    parse_kv_cache_dtype,
    parse_quantization_config,
)
from carpool.worker.kv_cache import DEFAULT_CPU_KV_CACHE_BYTES

KERNEL_FLAG_HELP: dict[str, str] = {
    "fused_gemv_silu": "batch-1 steps (FP8/INT4 weights: 1-8 rows): the gate/up GEMV with SiLU-and-mul in one kernel",
    "fused_qkv_rope": "batch-1 steps: the q/k/v GEMV with RoPE and the KV-cache store in one kernel",
    "lm_head_gemv": "batch-1 steps: the LM head through the Triton GEMV rather than cuBLAS",
    "kernel_host_io": "small CUDA-graph replays read inputs and write tokens through pinned memory by kernel",
    "pdl": "programmatic dependent launch of the Triton kernels (Hopper and newer)",
    "fused_all_reduce_norm": "tensor parallel: the all-reduce before each residual add + RMSNorm fused with it",
    "push_all_reduce": "tensor parallel, batch-1 steps: row-parallel GEMVs push their outputs to every rank",
    "push_logits": "tensor parallel, batch-1 steps: the LM head's logits gathered by push, not NCCL",
    "fused_act_quant": "FP8 W8A8 layers on the GEMM path: the RMSNorm or SiLU-and-mul before the layer writes "
                       "its output as FP8 activations, not the model dtype for a separate quantization",
    "fused_moe_routing": "mixture of experts: routing (softmax, top-k, renormalize) in one Triton kernel, not "
                         "torch's five",
    "small_batch_gemv": "steps of 2-16 rows: unquantized projections through the multi-row Triton GEMV rather "
                        "than cuBLAS (default off: unmeasured)",
    "short_query_decode": "steps of 2-16 query tokens per request (verification): attention as split-K decode, "
                          "one row per query token (default off: unmeasured)",
}


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    disable_custom_all_reduce: bool = False
    enable_expert_parallel: bool = False  # MoE: whole experts per rank (ParallelConfig)
    enforce_eager: bool = False
    seed: int = 0
    max_num_queued_reqs: int | None = None
    kernel_backend: str | None = None  # "torch" | "triton"; default follows the device
    load_format: str = "auto"
    async_scheduling: bool | None = None  # default: on for GPUs
    # vLLM's --speculative-config: a dict or its JSON string (SpeculativeConfig); None: off
    speculative_config: dict[str, Any] | str | None = None
    quantization: str | None = None  # "fp8": quantize an unquantized checkpoint while loading
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) | "fp8" (= "fp8_e4m3")
    # GPU fast paths (KernelConfig; each field's flag is --X / --no-X with X its name in kebab case)
    fused_gemv_silu: bool = True
    fused_qkv_rope: bool = True
    lm_head_gemv: bool = True
    kernel_host_io: bool = True
    pdl: bool = True
    fused_all_reduce_norm: bool = True
    push_all_reduce: bool = True
    push_logits: bool = True
    fused_act_quant: bool = True
    fused_moe_routing: bool = True
    small_batch_gemv: bool = False
    short_query_decode: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "EngineArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)  # type: ignore[arg-type]

    def _validate(self) -> None:
        positive = {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                    "block_size": self.block_size, "tensor_parallel_size": self.tensor_parallel_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes: must be >= 1, got {self.kv_cache_memory_bytes}")
        if self.max_num_queued_reqs is not None and self.max_num_queued_reqs < 1:
            raise ValueError(f"max_num_queued_reqs: must be >= 1, got {self.max_num_queued_reqs}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device: must be 'cpu' or 'cuda', got {self.device!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATION_CHOICES)} or unset, got "
                             f"{self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")

    def create_engine_config(self) -> EngineConfig:
        self._validate()
        from carpool.demo import default_model_path
        from carpool.models.loader import resolve_model_path

        device = self.device or default_device()
        path = resolve_model_path(self.model) if self.model else default_model_path()
        model = ModelConfig.from_pretrained(path, self.dtype, self.max_model_len, device="cpu"
                                            if device == "cpu" else "cuda")
        speculative = self._speculative_config(model)
        # A checkpoint quantized in a way carpool cannot run is refused here, before anything is built.
        scheme = parse_quantization_config(model.hf_config, self.quantization)
        if scheme is not None and model.moe is not None:
            check_moe_quantization(scheme, model, self.tensor_parallel_size, self.enable_expert_parallel)
        if self.enable_expert_parallel and model.moe is None:
            raise ValueError(f"enable_expert_parallel: the model ({model.architecture}) is dense, it has no experts "
                             "to divide among the ranks; leave expert parallelism off")
        return EngineConfig(
            model=model,
            cache=CacheConfig(block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                              kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=model.max_model_len,
                                      max_num_queued_reqs=self.max_num_queued_reqs),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                    disable_custom_all_reduce=self.disable_custom_all_reduce,
                                    enable_expert_parallel=self.enable_expert_parallel),
            device=device,
            kernel_backend=self.kernel_backend or kernel_backend_for(device),
            seed=self.seed,
            kernels=KernelConfig(**{f.name: getattr(self, f.name) for f in fields(KernelConfig)}),
            enforce_eager=self.enforce_eager,
            tokenizer=self.tokenizer,
            load_format=self.load_format,
            async_scheduling=device != "cpu" if self.async_scheduling is None else self.async_scheduling,
            speculative_config=speculative,
            quantization=self.quantization,
            kv_cache_dtype=parse_kv_cache_dtype(self.kv_cache_dtype).dtype,
        )

    def _speculative_config(self, target: ModelConfig) -> SpeculativeConfig | None:
        """Parse and check the speculative config against the target: a draft model must exist, share the
        target's vocabulary and reach max_model_len; it runs split over the target's tensor-parallel ranks
        (draft_tensor_parallel_size None, vLLM's default, becomes the target's size) or whole on rank 0
        (1), and must split that many ways."""
        if self.speculative_config is None:
            return None
        spec = SpeculativeConfig.from_dict(self.speculative_config)
        if spec.method != "draft_model":
            return spec
        from carpool.models.loader import resolve_model_path
        from carpool.worker.multiproc_executor import check_tensor_parallel

        tp = self.tensor_parallel_size
        draft_tp = tp if spec.draft_tensor_parallel_size is None else spec.draft_tensor_parallel_size
        if draft_tp not in (1, tp):
            raise ValueError(f"speculative_config.draft_tensor_parallel_size: must be 1 (the draft whole on rank 0) "
                             f"or the target's tensor_parallel_size={tp}, got {draft_tp}")
        assert spec.model is not None
        try:
            path = resolve_model_path(spec.model)
            draft = ModelConfig.from_pretrained(path, "float32", target.max_model_len)
            parse_quantization_config(draft.hf_config)  # the draft loads with its checkpoint's own scheme
        except (ValueError, OSError) as e:
            raise ValueError(f"speculative_config.model: {spec.model!r} is not a usable draft model ({e})") from e
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config.model: the draft's vocab_size {draft.vocab_size} differs from "
                             f"the target's {target.vocab_size}; a draft model must share the tokenizer")
        check_tensor_parallel(draft, draft_tp, setting="speculative_config.draft_tensor_parallel_size",
                              whose="the draft's")
        return dataclasses.replace(spec, model=path, draft_tensor_parallel_size=draft_tp)

    # ---- CLI -----------------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, model_flag: bool = True) -> argparse.ArgumentParser:
        g = parser.add_argument_group("engine")
        if model_flag:
            g.add_argument("--model", default=None,
                           help="checkpoint directory or Hugging Face repo id (default: the built-in demo model); "
                                f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
        g.add_argument("--tokenizer", default=None, help="tokenizer directory or repo id (default: the model's)")
        g.add_argument("--dtype", default="auto",
                       choices=["auto", "float32", "float16", "bfloat16", "half", "float"],
                       help="weight and activation dtype; auto = the checkpoint's (float32 on CPU)")
        g.add_argument("--device", default=None, choices=["cpu", "cuda"],
                       help="where to run (default: cuda if available, else cpu)")
        g.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + output in tokens (default: the model's max_position_embeddings)")
        g.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step (default: 256)")
        g.add_argument("--max-num-batched-tokens", type=int, default=8192,
                       help="token budget of one step; longer prompts are chunked (default: 8192)")
        g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default: 16)")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
        g.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                       help=f"KV cache size in bytes (CPU default: {DEFAULT_CPU_KV_CACHE_BYTES // 2**20} MiB; "
                            "GPU default: what gpu-memory-utilization leaves)")
        g.add_argument("--num-kv-blocks", type=int, default=None,
                       help="exact number of KV blocks (overrides the memory-based sizing)")
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV blocks of shared prompt prefixes (default: on)")
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="number of GPUs (or CPU processes) to split the model over (default: 1)")
        g.add_argument("--disable-custom-all-reduce", action="store_true",
                       help="tensor parallel on GPUs: all-reduce through NCCL only, not the one-shot "
                            "symmetric-memory kernel used for small (decode) messages")
        g.add_argument("--enable-expert-parallel", action="store_true",
                       help="mixture-of-experts models: each rank holds num_experts / tensor-parallel-size whole "
                            "experts instead of a slice of every expert (attention and shared experts stay "
                            "split); the routing is computed on every rank and the all-reduce sums the experts' "
                            "outputs (default: off)")
        g.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs")
        g.add_argument("--seed", type=int, default=0, help="random seed for unseeded sampling (default: 0)")
        g.add_argument("--max-num-queued-reqs", type=int, default=None,
                       help="most requests waiting to be scheduled; more are refused (QueueFullError; "
                            "HTTP 503 in the server) (default: unbounded)")
        g.add_argument("--kernel-backend", default=None, choices=["torch", "triton"],
                       help="kernels: torch reference or Triton (default: triton on GPU, torch on CPU)")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="schedule the next step while the device runs the current one, hiding host work "
                            "(default: on for GPUs, off on CPU)")
        g.add_argument("--quantization", "-q", default=None, choices=list(QUANTIZATION_CHOICES),
                       help="fp8: quantize an unquantized checkpoint to FP8 (e4m3, per-channel scales) while loading. "
                            "Quantized checkpoints (FP8, compressed-tensors, AWQ, GPTQ) are detected from their "
                            "quantization_config without it (default: none)")
        g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                       help="KV cache storage: auto = the model dtype; fp8 (= fp8_e4m3) = e4m3 with per-layer "
                            "scales (the checkpoint's k_scale/v_scale, else 1.0), twice the tokens per byte "
                            "(default: auto)")
        g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="auto: load the checkpoint's safetensors; dummy: random weights from config.json "
                            "only (for benchmarks)")
        g.add_argument("--speculative-config", default=None,
                       help='speculative decoding, as JSON: {"method": "ngram" | "draft_model", '
                            '"num_speculative_tokens": k, "prompt_lookup_min": ..., "prompt_lookup_max": ..., '
                            '"model": draft checkpoint, "disable_by_batch_size": ...} (default: off)')
        k = parser.add_argument_group("kernels", "GPU fast paths, on by default unless marked; each is exact, "
                                                 "and --no-X / --X turns one off / on (ablations, workarounds)")
        defaults = {f.name: f.default for f in fields(KernelConfig)}
        for name, help_text in KERNEL_FLAG_HELP.items():
            k.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                           default=defaults[name], help=help_text)
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        return cls(**values)

    def replace(self, **changes: object) -> "EngineArgs":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def check_moe_quantization(scheme: QuantScheme, model: ModelConfig, tp_size: int, expert_parallel: bool) -> None:
    """Refuse a quantized mixture-of-experts model carpool cannot run, before anything is built: experts
    split along their intermediate dimension must keep whole 128-row FP8 blocks, or whole 4-bit groups
    and packed words, on every rank."""
    assert model.moe is not None
    inter = model.moe.moe_intermediate_size
    if not isinstance(scheme, Fp8Scheme):
        from carpool.quantization.moe_methods import check_int4_expert_split

        check_int4_expert_split(scheme, inter, tp_size, expert_parallel)
        return
    if scheme.weight_strategy == "block" and not expert_parallel and tp_size > 1 and (inter // tp_size) % FP8_BLOCK[0]:
        raise ValueError(f"tensor_parallel_size: the model's moe_intermediate_size={inter} split over "
                         f"tensor_parallel_size={tp_size} ranks leaves {inter // tp_size} rows per rank, which cuts "
                         f"the experts' {FP8_BLOCK[0]}x{FP8_BLOCK[1]} FP8 weight blocks; use enable_expert_parallel "
                         "(whole experts per rank) or fewer ranks")
