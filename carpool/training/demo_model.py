"""The trained demo models that ship inside the package: what an export must satisfy to ship, and where
the shipped copies live.

`carpool/demo_models/main/` is the default model of `carpool generate`/`chat`/`serve` once present (a
~25M-parameter Llama trained by scripts/train_demo.sh); `carpool/demo_models/draft/` is its ~2-5M
draft with the same tokenizer, for speculative decoding. Until they are committed,
`trained_demo_model_path()` returns None and callers fall back to carpool.demo's random byte-level
model (which the tests keep using either way).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from carpool.training.export import TOKENIZER_FILES

DEMO_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo_models")
ROLES = ("main", "draft")
# Limits of a shipped model (issue 20): the repository carries the weights.
MAX_PARAMS = {"main": 26_000_000, "draft": 5_500_000}
MAX_TOTAL_BYTES = 50 * 10 ** 6
MAX_SHARD_BYTES = 15 * 10 ** 6
_SHIPPED_FILES = (*TOKENIZER_FILES, "config.json", "generation_config.json", "README.md", "corpus_manifest.json.gz",
                  "model.safetensors.index.json")


@dataclass(frozen=True)
class DemoModelInfo:
    path: str
    num_params: int
    total_bytes: int
    largest_shard_bytes: int
    vocab_size: int


def check_demo_export(path: str, role: str = "main") -> DemoModelInfo:
    """Raise ValueError naming what keeps the export at `path` from shipping as the `role` demo model."""
    from safetensors import safe_open

    if role not in ROLES:
        raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
    for name in ("config.json", "tokenizer.json", "README.md"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"demo model: {path} has no {name}")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise ValueError(f"demo model: architecture {config.get('architectures')} is not LlamaForCausalLM")
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not shards:
        raise ValueError(f"demo model: no safetensors weights in {path}")
    sizes = [os.path.getsize(os.path.join(path, n)) for n in shards]
    num_params = 0
    for name in shards:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                num_params += _numel(f.get_slice(key).get_shape())
    if num_params > MAX_PARAMS[role]:
        raise ValueError(f"demo model: {num_params:,} parameters exceed the {role} limit {MAX_PARAMS[role]:,}")
    if sum(sizes) > MAX_TOTAL_BYTES:
        raise ValueError(f"demo model: weights are {sum(sizes):,} bytes, more than {MAX_TOTAL_BYTES:,}")
    if max(sizes) > MAX_SHARD_BYTES:
        raise ValueError(f"demo model: a shard of {max(sizes):,} bytes exceeds {MAX_SHARD_BYTES:,}")
    return DemoModelInfo(path, num_params, sum(sizes), max(sizes), int(config["vocab_size"]))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def trained_demo_model_path(role: str = "main") -> str | None:
    """The shipped trained model of `role`, or None when the package has none."""
    path = os.path.join(DEMO_MODELS_DIR, role)
    if os.path.isfile(os.path.join(path, "config.json")) and any(n.endswith(".safetensors") for n in os.listdir(path)):
        return path
    return None


def install_demo_model(export_dir: str, role: str = "main", dest_root: str = DEMO_MODELS_DIR) -> str:
    """Check an export and copy the files that ship into `dest_root/role` (replacing what was there)."""
    check_demo_export(export_dir, role)
    dest = os.path.join(dest_root, role)
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    for name in sorted(os.listdir(export_dir)):
        if name in _SHIPPED_FILES or name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(export_dir, name), os.path.join(dest, name))
    return dest
