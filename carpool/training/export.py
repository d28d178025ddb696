"""Export a trained model as a Hugging Face checkpoint directory.

The directory holds config.json (architectures LlamaForCausalLM), generation_config.json, the
tokenizer's files, and the weights as safetensors in the export dtype (bf16 by default), split into
shards of at most `max_shard_bytes` with a `model.safetensors.index.json` when more than one. carpool's
loader and `transformers.AutoModelForCausalLM` both read it.

carpool's Llama fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; the export splits them back
into Hugging Face's names (the inverse of the loader's `packed_modules_mapping`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

# A safetensors header entry (name, dtype, shape, offsets) is well under this many bytes.
_HEADER_BYTES_PER_TENSOR = 256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def to_hf_state_dict(state: dict[str, torch.Tensor], hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """carpool Llama parameter names -> Hugging Face Llama names (fused projections split)."""
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // heads)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    tied = bool(hf_config.get("tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if ".qkv_proj." in name:
            suffix = name.rsplit(".", 1)[1]  # weight | bias
            base = name.split(".qkv_proj.")[0]
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split([q_size, kv_size, kv_size], dim=0)):
                out[f"{base}.{part}.{suffix}"] = piece
        elif ".gate_up_proj." in name:
            base = name.split(".gate_up_proj.")[0]
            gate, up = t.chunk(2, dim=0)
            out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"] = gate, up
        elif tied and name == "lm_head.weight":
            continue
        else:
            out[name] = t
    return out


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order, so that each file (tensors plus its JSON header) stays within the
    limit; a single tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        n = state[name].numel() * state[name].element_size() + _HEADER_BYTES_PER_TENSOR
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += n
    return shards


def save_safetensors(state: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file({k: v.contiguous() for k, v in shard.items()}, os.path.join(out_dir, name),
                  metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, name), 0o644)  # safetensors creates it owner-only
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return names


def export_hf_checkpoint(state: dict[str, torch.Tensor], hf_config: dict[str, Any], out_dir: str,
                         tokenizer_dir: str | None, dtype: torch.dtype = torch.bfloat16,
                         max_shard_bytes: int = 15 * 10 ** 6) -> str:
    """Write the full (unsharded, CPU) carpool state dict `state` as a HF checkpoint in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    hf_state = {k: v.detach().to("cpu", dtype) for k, v in to_hf_state_dict(state, hf_config).items()}
    # Shards are replaced whole: stale shards of an earlier export must not mix with these.
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, name))
    save_safetensors(hf_state, out_dir, max_shard_bytes)
    config = {**hf_config, "torch_dtype": str(dtype).replace("torch.", "")}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id")}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    return out_dir
