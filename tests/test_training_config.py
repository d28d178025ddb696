"""TrainConfig from TOML and flags, and the errors that must come before any training step."""

from __future__ import annotations

import argparse

import pytest

from carpool.training.config import TrainConfig, add_config_args, config_from_args, preflight
from carpool.training.pretokenize import pretokenize


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def test_flags_override_the_toml_file_which_overrides_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('max_steps = 50\nseq_len = 64\n[data]\ntrain = "x.bin"\n[optim]\nlr = 1e-3\nbetas = [0.8, 0.9]\n')
    cfg = _parse(["--config", str(toml), "--max-steps", "7", "--optim.betas", "0.5,0.6",
                  "--parallel.reshard-after-forward", "false"])
    assert (cfg.max_steps, cfg.seq_len, cfg.optim.lr, cfg.optim.betas) == (7, 64, 1e-3, (0.5, 0.6))
    assert cfg.parallel.reshard_after_forward is False and cfg.micro_batch_size == TrainConfig().micro_batch_size


def test_a_yaml_config_gives_the_same_config_as_the_toml_file(tmp_path):
    toml, yaml = tmp_path / "run.toml", tmp_path / "run.yml"
    toml.write_text('max_steps = 50\n[data]\ntrain = "x.bin"\n[optim]\nlr = 1e-3\nbetas = [0.8, 0.9]\n'
                    '[parallel]\nstrategy = "fsdp"\nreshard_after_forward = false\n')
    yaml.write_text("max_steps: 50\ndata: {train: x.bin}\noptim: {lr: 0.001, betas: [0.8, 0.9]}\n"
                    "parallel: {strategy: fsdp, reshard_after_forward: false}\n")
    from_yaml = _parse(["--config", str(yaml)])
    assert from_yaml == _parse(["--config", str(toml)]) and from_yaml.optim.betas == (0.8, 0.9)
    assert from_yaml.parallel.reshard_after_forward is False and from_yaml.max_steps == 50


def test_a_wrong_typed_field_in_a_yaml_config_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {train: x.bin}\noptim: {warmup_steps: ten}\n")
    with pytest.raises(ValueError, match="^optim[.]warmup_steps: expected an integer"):
        _parse(["--config", str(path)])


@pytest.mark.parametrize("data, field", [
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"max_steps": 1.5}, "max_steps"),
    ({"compile": "yes"}, "compile"),
    ({"activation_checkpointing": "sometimes"}, "activation_checkpointing"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"model": {"hidden_sise": 8}}, "model.hidden_sise"),
])
def test_wrong_field_is_named_in_the_error(data, field):
    with pytest.raises(ValueError, match=f"^{field.replace('.', '[.]')}:"):
        TrainConfig.from_dict({"data": {"train": "x"}, **data})


def test_bad_flag_value_is_named_in_the_error():
    with pytest.raises(ValueError, match="^micro_batch_size:"):
        _parse(["--data.train", "x", "--micro-batch-size", "many"])


def test_inconsistent_shape_is_refused():
    with pytest.raises(ValueError, match="^model.num_key_value_heads:"):
        TrainConfig.from_dict({"data": {"train": "x"}, "model": {"num_attention_heads": 4,
                                                                 "num_key_value_heads": 3}})


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    from carpool.training.tokenizer_trainer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("data")
    train_bpe_tokenizer(["def f(x):\n    return x\n"] * 3, vocab_size=280).save_pretrained(str(root / "tok"))
    pretokenize(["def f(x):\n    return x\n"] * 3, str(root / "tok"), str(root / "train"))
    return str(root / "train")


def test_missing_data_file_is_named(tmp_path):
    cfg = TrainConfig.from_dict({"data": {"train": str(tmp_path / "nope.bin")}, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="^data.train:"):
        preflight(cfg)


def test_model_vocabulary_smaller_than_the_tokenizers_is_refused(token_file, tmp_path):
    cfg = TrainConfig.from_dict({"data": {"train": token_file}, "model": {"vocab_size": 100},
                                 "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="^model.vocab_size:"):
        preflight(cfg)


def test_unwritable_output_dir_is_named(token_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = TrainConfig.from_dict({"data": {"train": token_file}, "output_dir": str(blocker / "run")})
    with pytest.raises(ValueError, match="^output_dir:"):
        preflight(cfg)


def test_help_lists_every_field():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    text = parser.format_help()
    for flag in ("--optim.lr", "--optim.warmup-steps", "--parallel.strategy", "--parallel.reshard-after-forward",
                 "--activation-checkpointing", "--checkpoint.interval", "--micro-batch-size", "--precision"):
        assert flag in text, flag


def test_a_mixture_of_experts_checkpoint_is_refused_before_training(token_file, tmp_path, checkpoint_factory):
    """Training builds, trains and exports dense models only: an MoE checkpoint's fused experts would be
    exported under carpool's own names, which neither transformers nor carpool's loader reads."""
    cfg = TrainConfig.from_dict({"data": {"train": token_file}, "model": {"init_from": checkpoint_factory("qwen3_moe")},
                                 "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="^model.init_from: .*mixture-of-experts"):
        preflight(cfg)


def test_a_quantized_checkpoint_is_refused_before_training(token_file, tmp_path, llama_path):
    import json
    import shutil

    path = shutil.copytree(llama_path, tmp_path / "fp8", ignore=shutil.ignore_patterns("*.safetensors"))
    hf_config = json.loads((path / "config.json").read_text())
    hf_config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(hf_config))
    cfg = TrainConfig.from_dict({"data": {"train": token_file}, "model": {"init_from": str(path)},
                                 "output_dir": str(tmp_path / "out")})
    with pytest.raises(ValueError, match="^model.init_from: .*quantized checkpoint \\(fp8\\)"):
        preflight(cfg)
