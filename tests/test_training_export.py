"""The Hugging Face export: sharding, names that carpool's loader maps back, and the demo-model limits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from carpool.training.config import ModelShapeConfig, llama_hf_config
from carpool.training.export import export_hf_checkpoint

HF = llama_hf_config(ModelShapeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2), 300, 0, 1)


def _model():
    from carpool.config import ModelConfig
    from carpool.models.loader import build_model, init_dummy_weights
    from carpool.models.runtime import ModelRuntime

    model = build_model(ModelConfig.from_hf_config(HF, dtype="float32"), ModelRuntime.for_training(), "cpu")
    init_dummy_weights(model, seed=3)
    return model


def test_sharded_export_loads_back_into_the_same_weights(tmp_path):
    from carpool.models.loader import load_weights

    model = _model()
    limit = 80_000  # above the largest tensor (the 76,800-byte embedding)
    export_hf_checkpoint(model.state_dict(), HF, str(tmp_path), None, torch.float32, max_shard_bytes=limit)
    shards = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    assert len(shards) > 1 and all(os.path.getsize(tmp_path / n) <= limit for n in shards)
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)
    reloaded = _model()
    with torch.no_grad():
        for p in reloaded.parameters():
            p.zero_()
    load_weights(reloaded, str(tmp_path))
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_splits_fused_projections_into_hugging_face_names(tmp_path):
    from safetensors import safe_open

    export_hf_checkpoint(_model().state_dict(), HF, str(tmp_path), None)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == torch.bfloat16
    layer = {n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0.")}
    assert layer == {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}


def test_demo_model_check_refuses_a_shard_over_the_limit(tmp_path, monkeypatch):
    from carpool.training import demo_model

    export_hf_checkpoint(_model().state_dict(), HF, str(tmp_path), None)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "README.md").write_text("card")
    assert demo_model.check_demo_export(str(tmp_path)).num_params == sum(p.numel() for p in _model().parameters())
    monkeypatch.setattr(demo_model, "MAX_SHARD_BYTES", 10_000)
    with pytest.raises(ValueError, match="shard"):
        demo_model.check_demo_export(str(tmp_path))
