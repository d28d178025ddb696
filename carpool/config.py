"""Engine configuration: frozen dataclasses, built once from EngineArgs and passed down explicitly.

Every part of the engine reads its limits from here, so a limit checked at admission (for example
`max_model_len`) is the same number the scheduler and the KV cache were sized with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype: unsupported value {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts part of a checkpoint (Qwen2-MoE, Qwen3-MoE, Mixtral), filled by the family's
    adapter (models/registry.py) under Hugging Face's names; None in ModelConfig for dense models.

    Invariants: 1 <= num_experts_per_tok <= num_experts; a layer is sparse iff `is_moe_layer` says so, and
    a dense layer of an MoE model is the gated MLP of ModelConfig.intermediate_size."""

    num_experts: int
    num_experts_per_tok: int  # top-k
    moe_intermediate_size: int  # of each routed expert
    norm_topk_prob: bool  # divide the k chosen probabilities by their sum
    # the routing weights are cast to the router logits' dtype (Qwen) or stay float32 (Mixtral)
    router_weights_in_model_dtype: bool
    shared_expert_intermediate_size: int = 0  # an always-on expert with a sigmoid gate (Qwen2-MoE); 0: none
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"model: num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"model: num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        if self.moe_intermediate_size < 1 or self.shared_expert_intermediate_size < 0:
            raise ValueError(f"model: moe_intermediate_size must be >= 1 and shared_expert_intermediate_size "
                             f">= 0, got {self.moe_intermediate_size} and {self.shared_expert_intermediate_size}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"model: decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")

    def is_moe_layer(self, layer_index: int) -> bool:
        return layer_index not in self.mlp_only_layers and (layer_index + 1) % self.decoder_sparse_step == 0


@dataclass(frozen=True)
class ModelConfig:
    """What the executor needs to know about a checkpoint, read from its config.json.

    Field names follow Hugging Face's config so a reader can map them one to one. Whatever differs
    between model families is decided by the family's adapter (models/registry.py), never by checking
    the architecture name here.
    """

    path: str
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on the q, k and v projections
    o_proj_bias: bool  # a bias on the attention output projection
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    hf_config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    moe: MoEConfig | None = None  # mixture-of-experts models only

    @staticmethod
    def from_pretrained(path: str, dtype: str = "auto", max_model_len: int | None = None,
                        device: str = "cpu") -> "ModelConfig":
        with open(os.path.join(path, "config.json")) as f:
            cfg: dict[str, Any] = json.load(f)
        eos_extra: list[int] = []
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                gen_eos = json.load(f).get("eos_token_id")
            if gen_eos is not None:
                eos_extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        return ModelConfig.from_hf_config(cfg, path, dtype, max_model_len, device, eos_extra)

    @staticmethod
    def from_hf_config(cfg: dict[str, Any], path: str = "", dtype: str = "auto", max_model_len: int | None = None,
                       device: str = "cpu", extra_eos_token_ids: list[int] | None = None) -> "ModelConfig":
        """A ModelConfig from a Hugging Face config dict (config.json's contents); the family adapter of
        its architecture decides the family-specific fields."""
        from carpool.models.registry import get_family, resolve_architecture

        architecture = resolve_architecture(cfg.get("architectures") or [])
        family = get_family(architecture)
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        # transformers >= 5 nests rope settings in `rope_parameters`; 4.x uses rope_theta + rope_scaling.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rope_type == "default":
                rope_scaling = None
            else:
                rope_scaling["rope_type"] = rope_type
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        if cfg.get("mlp_bias"):
            raise ValueError("model: checkpoints with mlp_bias=true are not supported")
        # Attention here is full (no sliding window): cap the length where a window would start to bite.
        window = family.sliding_window(cfg)
        if window:
            if max_model_len is not None and max_model_len > window:
                raise ValueError(f"max_model_len: {max_model_len} exceeds the model's sliding_window "
                                 f"({window}), which carpool does not implement")
            max_pos = min(max_pos, int(window))
        if max_model_len is None:
            max_model_len = max_pos
        elif max_model_len < 1:
            raise ValueError(f"max_model_len: must be >= 1, got {max_model_len}")
        elif max_model_len > max_pos:
            raise ValueError(
                f"max_model_len: {max_model_len} exceeds the model's max_position_embeddings ({max_pos})")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        eos_ids = tuple(dict.fromkeys([*eos_ids, *(extra_eos_token_ids or [])]))
        qkv_bias, o_proj_bias = family.attention_biases(cfg)
        return ModelConfig(
            path=path,
            architecture=architecture,
            dtype=_resolve_dtype(dtype, cfg, device),
            max_model_len=int(max_model_len),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=cfg.get("bos_token_id"),
            hf_config=cfg,
            moe=family.moe(cfg),
        )


def _resolve_dtype(dtype: str, cfg: dict[str, Any], device: str) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    ckpt = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    resolved = parse_dtype(ckpt)
    # Half precision matmuls on CPU are slow or missing; CPU serving runs in float32 unless asked.
    if device == "cpu" and resolved != torch.float32:
        return torch.float32
    return resolved


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # exact override; otherwise sized from memory
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    max_num_queued_reqs: int | None = None


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # Small all-reduces of a multi-GPU rank go through symmetric memory (carpool/distributed/symmetric.py)
    # unless this is set; NCCL carries the rest, and everything when the fast path is unavailable.
    disable_custom_all_reduce: bool = False
    # vLLM's enable_expert_parallel: the routed experts of a mixture-of-experts model are divided whole
    # among the ranks (num_experts / tensor_parallel_size each) instead of each rank holding a slice of
    # every expert; attention, dense layers and shared experts stay split as without it.
    enable_expert_parallel: bool = False


@dataclass(frozen=True)
class KernelConfig:
    """Which GPU fast paths a deployment uses (all on by default; a field off is an ablation or a
    workaround). What the model computes is the same either way: every path is tested against the plain
    one. Read once when the model is built (layers receive the choice) and carried to TP ranks by the
    codec; nothing reads these from the environment."""

    # batch-1 steps (FP8 / INT4 weights: 1-8 rows): silu(x @ gate.T) * (x @ up.T) in one GEMV kernel, not GEMV
    # then silu_and_mul
    fused_gemv_silu: bool = True
    # batch-1 steps: the q/k/v GEMV with RoPE and the KV-cache store in its epilogue (models without q/k norm)
    fused_qkv_rope: bool = True
    # batch-1 steps: the LM head through the GEMV (under PDL) rather than cuBLAS
    lm_head_gemv: bool = True
    # small CUDA-graph replays read their inputs from pinned memory by kernel, and small steps write their
    # tokens to pinned memory by kernel, instead of the copy engine (ops/triton/host_io)
    kernel_host_io: bool = True
    # Triton kernels on Hopper+: programmatic dependent launch (ops/triton/utils.py)
    pdl: bool = True
    # TP on GPUs: the all-reduce before each residual add + RMSNorm fused into one symmetric-memory kernel
    fused_all_reduce_norm: bool = True
    # TP on GPUs, batch-1 steps: row-parallel GEMVs (and the embedding) push their outputs to every rank
    push_all_reduce: bool = True
    # TP on GPUs, batch-1 steps: the LM head's logits gathered by push instead of an NCCL all-gather
    push_logits: bool = True
    # FP8 W8A8 layers on the GEMM path (more than 8 rows): the RMSNorm or SiLU-and-mul before the layer writes
    # its output as FP8 activations (values and per-token or per-group scales) in its own pass, instead of
    # writing the model dtype for a second kernel to read and quantize (ops/triton/elementwise.py
    # rms_norm_fp8, silu_and_mul_fp8; the same bytes either way)
    fused_act_quant: bool = True
    # mixture-of-experts layers: softmax, top-k and renormalization in Triton (ops/triton/moe.py
    # fused_moe_routed), one kernel before the expert kernels, instead of torch's five kernels (softmax,
    # topk, sum, divide, cast)
    fused_moe_routing: bool = True
    # steps of 2-16 rows (small-batch decode, speculative verification): unquantized linear layers through
    # the multi-row GEMV (ops/triton/gemv.py gemv_rows; with fused_gemv_silu, gate/up with SiLU-and-mul in
    # it) rather than cuBLAS. Off until a GPU run shows it faster (benchmarks/bench_gemv.py --rows).
    small_batch_gemv: bool = False
    # Triton attention, steps whose longest query has 2-16 tokens (speculative verification, a draft's
    # catch-up): attention as split-K decode, one decode row per query token with its own causal context
    # (attention/triton_paged.py), instead of the prefill kernel's one program per query tile and head.
    # Off until a GPU run shows it faster (benchmarks/bench_spec_decode.py part 1 and the demo pair).
    short_query_decode: bool = False


SPEC_METHODS = ("ngram", "draft_model", "replay")
# Speculation stops for steps with at least this many running requests (vLLM's disable_by_batch_size).
# Verifying k + 1 tokens for each of 32 requests keeps a Llama-3-8B-sized step under the H100/H200 ridge
# point (~300 tokens per read of the bf16 weights), where extra tokens are nearly free; past it a step pays
# compute for tokens it may throw away. benchmarks/bench_spec_decode.py measures the crossover (replay at
# batch 1, 8, 32, 256).
DEFAULT_DISABLE_BY_BATCH_SIZE = 32
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding as vLLM configures it (`--speculative-config '{"method": "ngram", ...}'`).

    A proposer guesses up to `num_speculative_tokens` next tokens of a request; the target model verifies
    them in one step and keeps the longest prefix its own sampling agrees with, so the output is the
    target's (carpool/spec_decode/). Methods:
    - "ngram": prompt lookup: the longest suffix n-gram (prompt_lookup_max down to prompt_lookup_min
      tokens) found earlier in prompt + output proposes the tokens that followed it;
    - "draft_model": a smaller checkpoint `model` with the target's vocabulary runs k greedy steps, split
      over `draft_tensor_parallel_size` ranks: the target's tensor_parallel_size (vLLM's default, what
      None becomes in EngineArgs) or 1 (the draft whole on rank 0);
    - "replay" (benchmarks): proposes the continuation recorded in `replay_path` (JSON
      {"prompt_token_ids": [[...]], "output_token_ids": [[...]]}, the target's own greedy outputs), each
      token kept with probability `acceptance_rate` and otherwise replaced by a token greedy rejects.
    Built with `from_dict` (what the CLI flag and `LLM(speculative_config=...)` pass), which refuses
    unknown keys and fills vLLM's defaults; every field is checked, the message naming it.
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE  # None: never disabled
    acceptance_rate: float | None = None
    replay_path: str | None = None
    draft_tensor_parallel_size: int | None = None  # "draft_model" only; None: the target's TP size

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"speculative_config.{name}: {why}")

        def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, f"must be an integer, got {value!r}")
            assert isinstance(value, int)
            if value < low or (high is not None and value > high):
                fail(name, f"must be in [{low}, {high if high is not None else 'inf'}], got {value}")

        if self.method not in SPEC_METHODS:
            fail("method", f"must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}")
        check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        if self.disable_by_batch_size is not None:
            check_int("disable_by_batch_size", self.disable_by_batch_size, 1)
        ngram = self.method == "ngram"
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if ngram:
                check_int(name, value, 1)
            elif value is not None:
                fail(name, f"applies to method 'ngram' only, not {self.method!r}")
        if ngram and self.prompt_lookup_min > self.prompt_lookup_max:  # type: ignore[operator]
            fail("prompt_lookup_min", f"must be <= prompt_lookup_max={self.prompt_lookup_max}, "
                                      f"got {self.prompt_lookup_min}")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                fail("model", "method 'draft_model' needs the draft checkpoint's directory")
        elif self.model is not None:
            fail("model", f"applies to method 'draft_model' only, not {self.method!r}")
        if self.draft_tensor_parallel_size is not None:
            if self.method != "draft_model":
                fail("draft_tensor_parallel_size", f"applies to method 'draft_model' only, not {self.method!r}")
            check_int("draft_tensor_parallel_size", self.draft_tensor_parallel_size, 1)
        if self.method == "replay":
            rate = self.acceptance_rate
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
                fail("acceptance_rate", f"method 'replay' needs a number in [0, 1], got {rate!r}")
            if not isinstance(self.replay_path, str) or not os.path.isfile(self.replay_path):
                fail("replay_path", f"method 'replay' needs an existing JSON file, got {self.replay_path!r}")
        else:
            for name in ("acceptance_rate", "replay_path"):
                if getattr(self, name) is not None:
                    fail(name, f"applies to method 'replay' only, not {self.method!r}")

    @staticmethod
    def from_dict(value: "SpeculativeConfig | dict[str, Any] | str") -> "SpeculativeConfig":
        """From vLLM's JSON (a string, as the CLI flag gives it) or the same as a dict."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from e
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(SpeculativeConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown key; known keys: {', '.join(sorted(known))}")
        d = dict(value)
        if d.get("method") is None:
            if d.get("model") is None:
                raise ValueError(f"speculative_config.method: required, one of {', '.join(SPEC_METHODS)}")
            d["method"] = "draft_model"  # vLLM infers a draft model from `model` alone
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config.num_speculative_tokens: required")
        if d["method"] == "ngram":  # vLLM's defaults: one bound gives the other; neither gives 5 and 5
            lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
            d["prompt_lookup_min"] = lo if lo is not None else (hi if hi is not None else 5)
            d["prompt_lookup_max"] = hi if hi is not None else d["prompt_lookup_min"]
        return SpeculativeConfig(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots a request holds beyond its scheduled tokens: a draft model writes its own K/V for the
        tokens it proposes (positions up to k - 1 past the verified tokens) into the request's blocks."""
        return self.num_speculative_tokens if self.method == "draft_model" else 0

    @property
    def draft_on_every_rank(self) -> bool:
        """Whether a draft model is split over the target's tensor-parallel ranks (every rank runs its
        shard of each draft step, in lockstep) rather than held whole by rank 0."""
        return self.method == "draft_model" and (self.draft_tensor_parallel_size or 1) > 1


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: str
    kernel_backend: str  # "torch" | "triton"
    kernels: KernelConfig = field(default_factory=KernelConfig)
    seed: int = 0
    enforce_eager: bool = False
    tokenizer: str | None = None
    async_scheduling: bool = False  # schedule step N+1 while the device runs step N
    load_format: str = "auto"  # "auto": safetensors from the checkpoint; "dummy": random weights (benchmarks)
    speculative_config: SpeculativeConfig | None = None  # None: no speculative decoding
    # `--quantization`: "fp8" quantizes an unquantized checkpoint while loading; None runs the checkpoint
    # as it is (quantized or not, quantization/config.py reads its quantization_config)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # "auto": the model dtype; "fp8": e4m3 with per-layer scales
