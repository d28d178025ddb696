"""Tiny training inputs shared by the training tests: a BPE tokenizer and token files built from a few
standard-library files, and a config of a tiny Llama over them."""

from __future__ import annotations

import os
from typing import Any

from carpool.training.config import TrainConfig

TINY_MODEL: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128)


def build_token_files(root: str, vocab_size: int = 320, num_docs: int = 12) -> dict[str, str]:
    """tokenizer dir and train/heldout token-file prefixes under `root` (built once per root)."""
    from carpool.training.corpus import build_manifest, iter_documents
    from carpool.training.pretokenize import pretokenize
    from carpool.training.tokenizer_trainer import train_bpe_tokenizer

    paths = {"tokenizer": os.path.join(root, "tok"), "train": os.path.join(root, "train"),
             "heldout": os.path.join(root, "heldout"), "manifest": os.path.join(root, "manifest.json")}
    if os.path.exists(paths["heldout"] + ".json"):
        return paths
    manifest = build_manifest(heldout_fraction=0.05)
    manifest.save(paths["manifest"])
    # small files only: the tests want many short documents, not one long one
    docs = [d for d in iter_documents(manifest, "train") if 2000 < len(d) < 8000][:num_docs]
    heldout = [d for d in iter_documents(manifest, "heldout") if len(d) < 8000][:3]
    train_bpe_tokenizer(docs, vocab_size).save_pretrained(paths["tokenizer"])
    pretokenize(docs, paths["tokenizer"], paths["train"], "train", manifest.corpus_sha256)
    pretokenize(heldout, paths["tokenizer"], paths["heldout"], "heldout", manifest.corpus_sha256)
    return paths


def tiny_config(paths: dict[str, str], output_dir: str, **overrides: Any) -> TrainConfig:
    data: dict[str, Any] = {
        "data": {"train": paths["train"], "heldout": paths["heldout"], "tokenizer": paths["tokenizer"]},
        "model": dict(TINY_MODEL), "seq_len": 32, "micro_batch_size": 4, "max_steps": 8, "precision": "fp32",
        "optim": {"lr": 3e-3, "warmup_steps": 2}, "output_dir": output_dir, "progress_bar": False,
        "eval_sequences": 8, "log_interval": 1, "export": False,
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return TrainConfig.from_dict(data)


def join_gloo_group(rank: int, world: int, out_dir: str) -> None:
    """Make this spawned process rank `rank` of a gloo group of `world`, as torchrun would (RANK,
    WORLD_SIZE, LOCAL_RANK), one CPU thread each. A file rendezvous in out_dir: no port to pick, so
    nothing else on the machine can take it between pick and bind."""
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world)
