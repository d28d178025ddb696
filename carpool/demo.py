"""The built-in demo model: a tiny Llama-architecture checkpoint with random weights and a byte-level
tokenizer, so carpool runs end to end with no download.

It is made deterministically (fixed seed, weights drawn by carpool itself rather than by transformers'
initializers) on first use and cached under $CARPOOL_CACHE_DIR (default ~/.cache/carpool). Its output is
random bytes: it exists to exercise the engine, not to say anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch

DEMO_VERSION = 2
BYTE_VOCAB = 256
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"
BOS_ID, EOS_ID = 256, 257

DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": BYTE_VOCAB + 2,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_root() -> str:
    root = os.environ.get("CARPOOL_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "carpool")
    return root


def default_model_path() -> str:
    """The model used when none is named: the trained demo model shipped in carpool/demo_models/main when
    the package has it, else the random byte-level demo model (built on first use). Tests that depend on
    the random model's byte tokenizer name `demo_model_path()` explicitly."""
    from carpool.training.demo_model import trained_demo_model_path

    return trained_demo_model_path("main") or demo_model_path()


def demo_model_path() -> str:
    """Path of the demo checkpoint, building it on first use (atomically, so concurrent first uses
    cannot see half a checkpoint)."""
    path = os.path.join(cache_root(), f"demo-v{DEMO_VERSION}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=cache_root())
    try:
        write_demo_checkpoint(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            pass
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_byte_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level tokenizer whose token id is the byte value (0..255), plus <s> (256) and </s> (257);
    it prepends <s> when encoding with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab[BOS_TOKEN], vocab[EOS_TOKEN] = BOS_ID, EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                       special_tokens=[(BOS_TOKEN, BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   chat_template=chat_template)


def random_llama_state_dict(config: dict[str, Any], seed: int, std: float = 0.02,
                            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights with Hugging Face Llama names, drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    sd = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": torch.ones(h, dtype=dtype)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = normal(heads * hd, h)
        sd[p + "self_attn.k_proj.weight"] = normal(kv_heads * hd, h)
        sd[p + "self_attn.v_proj.weight"] = normal(kv_heads * hd, h)
        sd[p + "self_attn.o_proj.weight"] = normal(h, heads * hd)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, h)
        sd[p + "mlp.up_proj.weight"] = normal(inter, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, inter)
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    if not config.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = normal(v, h)
    return sd


def _prefer_printable_bytes(sd: dict[str, torch.Tensor], num_layers: int) -> None:
    """Make the random model emit printable ASCII: hidden dimension 0 of the residual stream is held at a
    constant (every token embeds 1.0 there and no layer writes to it), so after the final norm it is
    always positive, and the LM head rows of unprintable bytes point away from it."""
    sd["model.embed_tokens.weight"][:, 0] = 0.3
    for i in range(num_layers):
        sd[f"model.layers.{i}.self_attn.o_proj.weight"][0, :] = 0.0
        sd[f"model.layers.{i}.mlp.down_proj.weight"][0, :] = 0.0
    printable = set(range(32, 127)) | {10}
    unprintable = [t for t in range(BYTE_VOCAB + 2) if t not in printable and t != EOS_ID]
    sd["lm_head.weight"][:, 0] = 0.0
    sd["lm_head.weight"][unprintable, 0] = -30.0
    sd["lm_head.weight"][EOS_ID, 0] = -8.0  # end-of-sequence: possible in principle, rare in practice


def write_demo_checkpoint(path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(DEMO_CONFIG, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}, f, indent=2)
    # A larger std than usual init makes the random model's distributions peaked, so its greedy output
    # varies from prompt to prompt instead of repeating one token.
    sd = random_llama_state_dict(DEMO_CONFIG, seed=0, std=0.08)
    _prefer_printable_bytes(sd, DEMO_CONFIG["num_hidden_layers"])
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    build_byte_tokenizer().save_pretrained(path)
