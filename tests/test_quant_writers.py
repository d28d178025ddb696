"""carpool.quantization.writers: quantized checkpoints written from a float checkpoint. The FP8 writer's
checkpoint is compressed-tensors' own, bit for bit; the INT4 writer reads a sharded bf16 export (the
layout `carpool train` writes) and quantizes every projection to the nearest grid point."""

from __future__ import annotations

import json
import os

import pytest
import torch
from checkpoints import build_checkpoint
from quant_checkpoints import QUANT_DIMS, write_quantized
from safetensors.torch import load_file

from carpool.quantization.config import parse_quantization_config
from carpool.quantization.formats import dequantize_awq
from carpool.quantization.writers import LINEARS, read_checkpoint, write_fp8_channel, write_int4


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def test_fp8_writer_matches_compressed_tensors_own_compressor(checkpoint_factory, tmp_path):
    src = checkpoint_factory("llama", **QUANT_DIMS)
    ours = load_file(os.path.join(write_fp8_channel(src, str(tmp_path / "ours")), "model.safetensors"))
    theirs = load_file(os.path.join(write_quantized(src, str(tmp_path / "ct"), "ct-fp8-channel"), "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape, name
        raw = (lambda x: x.view(torch.uint8)) if t.dtype == torch.float8_e4m3fn else (lambda x: x)
        assert torch.equal(raw(ours[name]), raw(t)), name
    assert (parse_quantization_config(_config(str(tmp_path / "ours")))
            == parse_quantization_config(_config(str(tmp_path / "ct"))))


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sharded-bf16"))
    build_checkpoint(path, "llama", dtype=torch.bfloat16, max_shard_size="200KB", tie_word_embeddings=True,
                     **QUANT_DIMS)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return path


def test_int4_writer_quantizes_every_projection_of_a_sharded_bf16_checkpoint(sharded_bf16, tmp_path):
    src = read_checkpoint(sharded_bf16)
    dst = write_int4(sharded_bf16, str(tmp_path / "awq"), "awq", group=128)
    out = load_file(os.path.join(dst, "model.safetensors"))
    side_files = [n for n in os.listdir(sharded_bf16) if not n.endswith((".safetensors", ".index.json"))]
    assert sorted(os.listdir(dst)) == sorted(side_files + ["model.safetensors"])
    projections = [n for n in src if n.split(".")[-2] in LINEARS]
    assert len(projections) == 2 * len(LINEARS)
    for name, w in src.items():
        if name not in projections:
            assert torch.equal(out[name], w), name  # embeddings and norms: untouched, still bf16
            continue
        m = name[:-len(".weight")]
        scales = out[f"{m}.scales"]
        got = dequantize_awq(out[f"{m}.qweight"], out[f"{m}.qzeros"], scales, 128)
        # round to nearest on a grid whose rounded zero point may cut the range's ends by half a step (as
        # AutoAWQ's pseudo_quantize_tensor): within one step of the group's scale, half a step on average
        step = scales.float().t().repeat_interleave(128, 1)
        err = (got - w.float()).abs() / step
        assert err.max() <= 1 + 1e-3 and err.mean() <= 0.3, name
    qc = _config(dst)["quantization_config"]
    assert parse_quantization_config(_config(dst)).name == "awq" and qc["group_size"] == 128


def test_writing_over_the_source_checkpoint_is_refused(sharded_bf16):
    with pytest.raises(ValueError, match="^dst: "):
        write_fp8_channel(sharded_bf16, sharded_bf16)


@pytest.mark.parametrize("group", [0, -1, 100])
def test_int4_writer_refuses_a_group_size_the_checkpoint_could_not_load_with(sharded_bf16, tmp_path, group):
    with pytest.raises(ValueError, match="group_size: must be one of 32, 64, 128"):
        write_int4(sharded_bf16, str(tmp_path / "awq"), "awq", group)
    assert not os.path.exists(tmp_path / "awq")
