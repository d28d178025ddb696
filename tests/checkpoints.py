"""Tiny random Hugging Face checkpoints built on the fly (transformers config classes, save_pretrained)
with the byte-level tokenizer, loaded by tests through carpool's real loader."""

from __future__ import annotations

import os
from typing import Any

import torch

VOCAB = 258  # 256 bytes + <s> + </s>, matching the byte tokenizer

COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                              bos_token_id=256, eos_token_id=None, initializer_range=0.1)

ARCHS: dict[str, dict[str, Any]] = {
    # Llama with llama3 rope scaling (a short original context so the scaling changes positions < 200)
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2: q/k/v biases, tied embeddings
    "qwen2": dict(tie_word_embeddings=True),
    # Qwen3: q/k norms, explicit head_dim different from hidden / heads, linear rope scaling
    "qwen3": dict(head_dim=24, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(sliding_window=None, num_key_value_heads=1),
    # Mixture of experts (8 experts, not all chosen by every step):
    # Qwen3-MoE: top-3 renormalized, layer 1 dense (mlp_only_layers) with the dense intermediate_size
    "qwen3_moe": dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                      norm_topk_prob=True, mlp_only_layers=[1], head_dim=24),
    # Qwen2-MoE: a shared expert with its sigmoid gate, top-2 not renormalized, every 2nd layer sparse
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
                      shared_expert_intermediate_size=48, decoder_sparse_step=2),
    # Mixtral: experts of intermediate_size, top-2 always renormalized
    "mixtral": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
}


def config_for(arch: str, **overrides: Any) -> Any:
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "mixtral": transformers.MixtralConfig}[arch]
    kwargs = {**COMMON, **ARCHS[arch], **overrides}
    return cls(**kwargs)


def build_checkpoint(path: str, arch: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, **overrides: Any) -> str:
    """Save a random model of `arch` (and the byte tokenizer) to `path`; returns path."""
    from transformers import AutoModelForCausalLM

    from carpool.demo import build_byte_tokenizer

    config = config_for(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "attention_bias", False) or arch in ("qwen2", "qwen2_moe"):
        # HF initializes biases to zero; random biases make sure they are loaded and used.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    build_byte_tokenizer().save_pretrained(path)
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, **load_kwargs: Any) -> list[list[int]]:
    """Hugging Face transformers' greedy continuation of each prompt, one prompt at a time (float32);
    load_kwargs go to from_pretrained (MoE references: experts_implementation="eager")."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load_kwargs).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(prompt):].tolist())
    return outs


def prompts_of_lengths(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def exists(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def copy_without_weight(src: str, dst: str, name: str) -> str:
    """A copy of checkpoint `src` at `dst` whose safetensors file lacks the tensor `name`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    del weights[name]
    save_file(weights, os.path.join(dst, "model.safetensors"))
    return dst
