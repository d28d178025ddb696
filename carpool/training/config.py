"""TrainConfig: every knob of a training run, from a TOML or YAML file and/or command-line flags.

Precedence: dataclass defaults < config file < flags. A TOML table (a YAML mapping) is a section
(`[optim] lr = 3e-4`, or `optim: {lr: 3.0e-4}`); the flag of the same field is `--optim.lr 3e-4`; top-level
fields are plain (`--max-steps 100`). Both file formats go through the same typed parsing.

Validation happens in two places, both before the model is built or a step runs:
- `TrainConfig.from_dict` / `parse_value`: types and ranges, naming the field (`optim.lr: ...`).
- `preflight(cfg)`: the config against the machine — token files exist and match the model's
  vocabulary, the output directory is writable, a checkpoint to start from is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Precision = Literal["bf16", "fp32"]
ActivationCheckpointing = Literal["off", "on", "selective"]
Strategy = Literal["none", "ddp", "fsdp"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ModelShapeConfig:
    """The model to train: a shape from scratch, or `init_from` a Hugging Face checkpoint directory (then
    the shape fields are read from its config.json and the ones here are ignored)."""

    init_from: str | None = field(default=None, metadata=_help(
        "Hugging Face checkpoint directory to start from (its weights and shape)"))
    architecture: str = field(default="LlamaForCausalLM", metadata=_help("HF architecture name"))
    vocab_size: int | None = field(default=None, metadata=_help(
        "vocabulary size (default: the train token file's)"))
    hidden_size: int = field(default=256, metadata=_help("model width"))
    intermediate_size: int = field(default=704, metadata=_help("MLP width"))
    num_hidden_layers: int = field(default=4, metadata=_help("decoder layers"))
    num_attention_heads: int = field(default=4, metadata=_help("query heads"))
    num_key_value_heads: int = field(default=4, metadata=_help("key/value heads (GQA when fewer)"))
    head_dim: int | None = field(default=None, metadata=_help("per-head width (default hidden/heads)"))
    max_position_embeddings: int = field(default=2048, metadata=_help("longest sequence the model supports"))
    rope_theta: float = field(default=10000.0, metadata=_help("RoPE base"))
    rms_norm_eps: float = field(default=1e-5, metadata=_help("RMSNorm epsilon"))
    tie_word_embeddings: bool = field(default=False, metadata=_help("share the embedding and LM head"))
    init_std: float = field(default=0.02, metadata=_help("std of the normal init (HF Llama's initializer_range)"))


@dataclass(frozen=True)
class DataConfig:
    train: str = field(default="", metadata=_help("train token file (`carpool pretokenize` output: prefix, "
                                                  ".bin or .json)"))
    heldout: str | None = field(default=None, metadata=_help("held-out token file for perplexity"))
    tokenizer: str | None = field(default=None, metadata=_help(
        "tokenizer directory (checked against the token files; copied into exports)"))


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = field(default=3e-4, metadata=_help("peak learning rate (AdamW)"))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=_help("AdamW betas, e.g. 0.9,0.95"))
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    weight_decay: float = field(default=0.1, metadata=_help("decoupled weight decay (not on norms)"))
    warmup_steps: int = field(default=100, metadata=_help("linear warmup steps"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("cosine decays to lr x this at the last step"))
    grad_clip: float = field(default=1.0, metadata=_help("clip the global gradient norm (0 = off)"))
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = field(default="auto", metadata=_help(
        "AdamW kernel: auto = fused on GPU, foreach on CPU"))


@dataclass(frozen=True)
class ParallelismConfig:
    strategy: Strategy = field(default="none", metadata=_help(
        "none | ddp | fsdp (FSDP2 fully_shard per decoder layer and root)"))
    reshard_after_forward: bool = field(default=True, metadata=_help(
        "FSDP: free gathered layer weights after forward (ZeRO-3); false keeps them (ZeRO-2-like)"))
    explicit_prefetch: bool = field(default=True, metadata=_help(
        "FSDP: layer i issues layer i+1's all-gather as it starts (i-1's in backward); false leaves the "
        "order to FSDP2 (forward gathers on demand, backward prefetches by the recorded forward order)"))
    nproc_per_node: int = field(default=1, metadata=_help(
        "processes to launch on this machine (`carpool train` spawns them like torchrun)"))


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = field(default=0, metadata=_help("save every N steps (0 = only at the end)"))
    dir: str | None = field(default=None, metadata=_help("checkpoint directory (default OUTPUT_DIR/checkpoints)"))
    keep: int = field(default=2, metadata=_help("complete checkpoints to keep (older ones are deleted)"))
    resume: bool = field(default=True, metadata=_help("resume from the latest complete checkpoint in dir"))


@dataclass(frozen=True)
class TrainConfig:
    model: ModelShapeConfig = field(default_factory=ModelShapeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seq_len: int = field(default=512, metadata=_help("tokens per sequence"))
    micro_batch_size: int = field(default=8, metadata=_help("sequences per rank per forward"))
    grad_accum_steps: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    max_steps: int = field(default=1000, metadata=_help("optimizer steps (the schedule's length)"))
    stop_after_steps: int | None = field(default=None, metadata=_help(
        "end this invocation after N steps without changing the schedule (to split a run)"))
    max_minutes: float | None = field(default=None, metadata=_help(
        "wall-clock limit: stop, evaluate and export after this many minutes even before max_steps"))
    precision: Precision = field(default="bf16", metadata=_help(
        "bf16: bf16 compute, fp32 master weights and optimizer states; fp32: all fp32"))
    activation_checkpointing: ActivationCheckpointing = field(default="off", metadata=_help(
        "recompute decoder layers in backward: off | on (every layer) | selective (every other layer)"))
    compile: bool = field(default=False, metadata=_help("torch.compile each decoder layer"))
    loss_chunk_size: int = field(default=1024, metadata=_help("tokens per chunk of the chunked cross-entropy"))
    eval_interval: int = field(default=0, metadata=_help("held-out perplexity every N steps (0 = only at the end)"))
    eval_sequences: int = field(default=128, metadata=_help("held-out sequences per evaluation"))
    log_interval: int = field(default=10, metadata=_help("metrics line every N steps"))
    seed: int = field(default=0, metadata=_help("seed of the init and the data order"))
    output_dir: str = field(default="runs/train", metadata=_help("metrics, loss curve, checkpoints, export"))
    device: str | None = field(default=None, metadata=_help("cpu | cuda (default: cuda when available)"))
    export: bool = field(default=True, metadata=_help("export a HF checkpoint to OUTPUT_DIR/export at the end"))
    export_max_shard_mb: int = field(default=15, metadata=_help("largest safetensors shard of the export (MB)"))
    profile_steps: int = field(default=0, metadata=_help(
        "profile N steps after 2 warm-up steps; chrome trace to OUTPUT_DIR/profile"))
    peak_flops: float | None = field(default=None, metadata=_help(
        "device peak FLOP/s for MFU (default: a table of known GPUs; none on CPU)"))
    progress_bar: bool = field(default=True, metadata=_help("tqdm progress bar on rank 0"))

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints")

    @property
    def tokens_per_step(self) -> int:
        """Per rank."""
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "TrainConfig":
        cfg = _build(TrainConfig, data, "")
        validate(cfg)
        return cfg

    @staticmethod
    def from_file(path: str) -> "TrainConfig":
        """TOML, or YAML when the name ends in .yaml/.yml."""
        return TrainConfig.from_dict(load_config_file(path))


# ---------------------------------------------------------------------------------------------------------
# Typed parsing


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list of " + ", ".join(_describe(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return {type(None): "none", bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def parse_value(tp: Any, value: Any, name: str, from_text: bool = False) -> Any:
    """`value` as type `tp`, or ValueError naming the field. `from_text`: value is a command-line string."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_text and str(value).lower() in ("none", "null", ""))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(a, value, name, from_text)
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"{name}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{name}: must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if origin is tuple:
        items = [v.strip() for v in value.split(",")] if from_text and isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{name}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(args[0], v, f"{name}[{i}]", from_text) for i, v in enumerate(items))
        if len(items) != len(args):
            raise ValueError(f"{name}: expected {len(args)} values, got {len(items)} ({value!r})")
        return tuple(parse_value(a, v, f"{name}[{i}]", from_text) for i, (a, v) in enumerate(zip(args, items)))
    if tp is bool:
        if from_text and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0",
                                                                      "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected a boolean (true/false), got {value!r} ({type(value).__name__})")
    if tp is int:
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"{name}: unsupported config type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {data!r}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field; known in "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = parse_value(tp, value, prefix + name)
    return cls(**kwargs)


def load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {path} is not valid TOML ({e})") from None


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config: {path} is not valid YAML ({e})") from None
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def load_config_file(path: str) -> dict[str, Any]:
    """The fields of a config file: YAML for .yaml/.yml, TOML otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"config: no such file {path!r}")
    return load_yaml(path) if path.lower().endswith((".yaml", ".yml")) else load_toml(path)


def validate(cfg: TrainConfig) -> None:
    """Ranges and consistency of the values themselves (no file system access)."""
    positive = {"seq_len": cfg.seq_len, "micro_batch_size": cfg.micro_batch_size,
                "grad_accum_steps": cfg.grad_accum_steps, "max_steps": cfg.max_steps,
                "loss_chunk_size": cfg.loss_chunk_size, "log_interval": cfg.log_interval,
                "eval_sequences": cfg.eval_sequences, "parallel.nproc_per_node": cfg.parallel.nproc_per_node,
                "checkpoint.keep": cfg.checkpoint.keep, "export_max_shard_mb": cfg.export_max_shard_mb}
    m = cfg.model
    if m.init_from is None:
        positive.update({"model.hidden_size": m.hidden_size, "model.intermediate_size": m.intermediate_size,
                         "model.num_hidden_layers": m.num_hidden_layers,
                         "model.num_attention_heads": m.num_attention_heads,
                         "model.num_key_value_heads": m.num_key_value_heads,
                         "model.max_position_embeddings": m.max_position_embeddings})
    for name, v in positive.items():
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    non_negative = {"optim.warmup_steps": cfg.optim.warmup_steps, "optim.weight_decay": cfg.optim.weight_decay,
                    "optim.grad_clip": cfg.optim.grad_clip, "checkpoint.interval": cfg.checkpoint.interval,
                    "eval_interval": cfg.eval_interval, "profile_steps": cfg.profile_steps}
    for name, v in non_negative.items():
        if v < 0:
            raise ValueError(f"{name}: must be >= 0, got {v}")
    o = cfg.optim
    if not o.lr > 0:
        raise ValueError(f"optim.lr: must be > 0, got {o.lr}")
    for i, b in enumerate(o.betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"optim.betas[{i}]: must be in [0, 1), got {b}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise ValueError(f"max_minutes: must be > 0, got {cfg.max_minutes}")
    if cfg.stop_after_steps is not None and cfg.stop_after_steps < 1:
        raise ValueError(f"stop_after_steps: must be >= 1, got {cfg.stop_after_steps}")
    if m.init_from is None:
        if m.head_dim is None and m.hidden_size % m.num_attention_heads:
            raise ValueError(f"model.num_attention_heads: {m.num_attention_heads} does not divide "
                             f"model.hidden_size {m.hidden_size} (or set model.head_dim)")
        if m.num_attention_heads % m.num_key_value_heads:
            raise ValueError(f"model.num_key_value_heads: {m.num_key_value_heads} does not divide "
                             f"model.num_attention_heads {m.num_attention_heads}")
        if cfg.seq_len > m.max_position_embeddings:
            raise ValueError(f"seq_len: {cfg.seq_len} exceeds model.max_position_embeddings "
                             f"{m.max_position_embeddings}")
        if not m.init_std > 0:
            raise ValueError(f"model.init_std: must be > 0, got {m.init_std}")
    if cfg.device is not None and cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise ValueError(f"device: must be 'cpu' or 'cuda', got {cfg.device!r}")
    if not cfg.data.train:
        raise ValueError("data.train: required (a token file written by `carpool pretokenize`)")


# ---------------------------------------------------------------------------------------------------------
# Command line


def _flag_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, type, field) of every leaf field."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_flag_fields(tp, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, tp, f))
    return out


# Short spellings of flags people type often (torchrun's name for the process count).
_ALIASES = {"parallel.nproc_per_node": ("--nproc-per-node",), "parallel.strategy": ("--parallelism",)}


def flag_name(dotted: str) -> str:
    return "--" + dotted.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--optim.lr`, `--max-steps`), each defaulting to 'not given'."""
    parser.add_argument("--config", metavar="FILE", help="TOML file (or YAML: .yaml/.yml) of the fields below, "
                        "sections as tables: [optim] lr = 3e-4 (flags override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for dotted, tp, f in _flag_fields():
        section = dotted.rsplit(".", 1)[0] if "." in dotted else "training"
        group = groups.setdefault(section, parser.add_argument_group(section))
        default: Any = defaults
        for part in dotted.split("."):
            default = getattr(default, part)
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        group.add_argument(flag_name(dotted), *_ALIASES.get(dotted, ()), dest=dotted, default=argparse.SUPPRESS,
                           metavar=_metavar(tp), help=f"{f.metadata.get('help', '')} (default: {default})")


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return next(_metavar(a) for a in typing.get_args(tp) if a is not type(None))
    return {bool: "BOOL", int: "N", float: "X", str: "STR"}.get(tp, "A,B")


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The config file (if --config) overlaid with the flags that were given."""
    data: dict[str, Any] = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    for dotted, tp, _ in _flag_fields():
        if dotted not in vars(ns):
            continue
        target = data
        *sections, leaf = dotted.split(".")
        for s in sections:
            target = target.setdefault(s, {})
        target[leaf] = parse_value(tp, getattr(ns, dotted), dotted, from_text=True)
    return TrainConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------------
# Preflight: the config against the machine


@dataclass(frozen=True)
class Preflight:
    """What preflight learned: the HF-style model config to build, and the token files' headers."""

    hf_config: dict[str, Any]
    train_meta: Any                 # pretokenize.TokenFileMeta
    heldout_meta: Any | None


def llama_hf_config(m: ModelShapeConfig, vocab_size: int, bos_token_id: int, eos_token_id: int,
                    dtype: str = "bfloat16") -> dict[str, Any]:
    """A Hugging Face config.json for a model trained from scratch (the export writes the same dict)."""
    cfg: dict[str, Any] = {
        "architectures": [m.architecture], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "head_dim": m.head_dim or m.hidden_size // m.num_attention_heads,
        "max_position_embeddings": m.max_position_embeddings, "rope_theta": m.rope_theta,
        "rms_norm_eps": m.rms_norm_eps, "tie_word_embeddings": m.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": m.init_std,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": dtype,
    }
    return cfg


def _check_writable(path: str, name: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{name}: {path!r} is not a writable directory ({e.strerror or e})") from None


def preflight(cfg: TrainConfig, check_writable: bool = True) -> Preflight:
    """Everything that can be checked before building the model, raised as ValueError naming the field."""
    from carpool.training.pretokenize import read_meta, tokenizer_sha256

    try:
        train_meta = read_meta(cfg.data.train)
    except ValueError as e:
        raise ValueError(f"data.train: {e}") from None
    heldout_meta = None
    if cfg.data.heldout:
        try:
            heldout_meta = read_meta(cfg.data.heldout)
        except ValueError as e:
            raise ValueError(f"data.heldout: {e}") from None
        if heldout_meta.tokenizer_sha256 != train_meta.tokenizer_sha256:
            raise ValueError("data.heldout: tokenized with a different tokenizer than data.train")
    if cfg.data.tokenizer:
        if not os.path.isfile(os.path.join(cfg.data.tokenizer, "tokenizer.json")):
            raise ValueError(f"data.tokenizer: no tokenizer.json in {cfg.data.tokenizer!r}")
        if tokenizer_sha256(cfg.data.tokenizer) != train_meta.tokenizer_sha256:
            raise ValueError(f"data.tokenizer: {cfg.data.tokenizer} is not the tokenizer data.train was "
                             "written with (tokenizer.json hash differs)")
    m = cfg.model
    if m.init_from is not None:
        path = os.path.join(m.init_from, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"model.init_from: no config.json in {m.init_from!r}")
        with open(path) as f:
            hf_config = json.load(f)
        from carpool.config import ModelConfig

        if ModelConfig.from_hf_config(hf_config, m.init_from).moe is not None:
            # (the export writes dense Hugging Face names; fused experts would be written under carpool's)
            raise ValueError(f"model.init_from: {m.init_from!r} is a mixture-of-experts checkpoint "
                             f"({hf_config.get('model_type')}); training supports dense models only")
        if hf_config.get("quantization_config") is not None:
            # (training runs plain float weights: a quantized checkpoint's packed tensors have no parameter)
            raise ValueError(f"model.init_from: {m.init_from!r} is a quantized checkpoint "
                             f"({hf_config['quantization_config'].get('quant_method')}); train from float weights")
        max_pos = int(hf_config.get("max_position_embeddings", 2048))
        if cfg.seq_len > max_pos:
            raise ValueError(f"seq_len: {cfg.seq_len} exceeds the checkpoint's max_position_embeddings {max_pos}")
    else:
        vocab = m.vocab_size if m.vocab_size is not None else train_meta.vocab_size
        hf_config = llama_hf_config(m, vocab, train_meta.bos_token_id, train_meta.eos_token_id,
                                    "bfloat16" if cfg.precision == "bf16" else "float32")
    model_vocab = int(hf_config["vocab_size"])
    if train_meta.vocab_size > model_vocab:
        field_name = "model.init_from" if m.init_from else "model.vocab_size"
        raise ValueError(f"{field_name}: the model's vocabulary ({model_vocab}) is smaller than the tokenizer's "
                         f"({train_meta.vocab_size}) that wrote data.train; token ids would be out of range")
    if check_writable:
        _check_writable(cfg.output_dir, "output_dir")
        _check_writable(cfg.checkpoint_dir, "checkpoint.dir")
    return Preflight(hf_config, train_meta, heldout_meta)
