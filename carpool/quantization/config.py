"""What a checkpoint's `quantization_config` (or `--quantization`) asks for, as typed schemes.

Read once where the checkpoint's config.json enters (`parse_quantization_config`), so every variant
carpool cannot run is refused there with the field's name, before any weight is allocated. Three
families of checkpoints map onto two compute methods:

- `Fp8Scheme` (W8A8, e4m3): Hugging Face `quant_method: "fp8"` (the fine-grained format of the
  Qwen3/DeepSeek FP8 releases: 128x128 block scales `weight_scale_inv`, or one per-tensor scale without
  `weight_block_size`, named as transformers writes it, `weight_scale_inv` / `activation_scale`, or as
  AutoFP8 does, `weight_scale` / `input_scale`), compressed-tensors `float-quantized` (llm-compressor's
  FP8: per-channel, per-tensor or 128x128-block `weight_scale`, dynamic or static `input_scale`), and
  `--quantization fp8` on an unquantized checkpoint (per-channel scales computed while loading).
- `Int4Scheme` (W4A16): AutoAWQ GEMM (`quant_method: "awq"`), GPTQ (`quant_method: "gptq"`, v1 and v2
  zero points) and compressed-tensors `pack-quantized` int4.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Group sizes of 4-bit formats the int4 kernels are built for (a group spans whole 32-bit words of
# eight nibbles); -1 in a checkpoint means one group per output channel (the whole input dim).
SUPPORTED_GROUP_SIZES = (32, 64, 128)
CHANNEL_GROUP = -1
FP8_BLOCK = (128, 128)

# `--quantization` choices. "fp8" quantizes an unquantized checkpoint while loading, or names (and
# checks) a checkpoint that is already FP8.
QUANTIZATION_CHOICES = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(frozen=True)
class Fp8Scheme:
    """FP8 e4m3 weights, and activations quantized to e4m3 per token (per 128-column group with block
    weights) at run time, or with one static per-tensor scale from the checkpoint.

    Internally every weight scale is per output channel ([N]) or per 128x128 block ([N/128, K/128]):
    per-tensor checkpoint scales are expanded to channels while loading (a merged q/k/v layer has one
    per shard)."""
    checkpoint_format: str  # "fp8" (Hugging Face fine-grained), "compressed-tensors", "online"
    weight_strategy: str  # "tensor" | "channel" | "block" (as in the checkpoint)
    block_size: tuple[int, int] | None  # (rows, cols) of a weight-scale block; block strategy only
    dynamic_activations: bool  # False: a static per-tensor input scale in the checkpoint
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) left unquantized

    @property
    def name(self) -> str:
        return "fp8" if self.checkpoint_format != "compressed-tensors" else "compressed-tensors-fp8"

    def scale_suffix(self) -> str:
        """The checkpoint tensor holding the weight scales."""
        return "weight_scale_inv" if self.checkpoint_format == "fp8" else "weight_scale"

    def input_scale_suffix(self) -> str:
        return "activation_scale" if self.checkpoint_format == "fp8" else "input_scale"

    def tensor_aliases(self) -> dict[str, str]:
        """Other names a checkpoint may give its scale tensors -> the name they load under. Hugging Face
        "fp8" with one scale per tensor is written under two namings: transformers' (weight_scale_inv,
        activation_scale) and AutoFP8's, which vLLM reads (weight_scale, input_scale)."""
        if self.checkpoint_format != "fp8" or self.weight_strategy == "block":
            return {}
        return {"weight_scale": "weight_scale_inv", "input_scale": "activation_scale"}


@dataclass(frozen=True)
class Int4Scheme:
    """4-bit integer weights with a scale (and a zero point unless symmetric) per group of input
    columns; activations stay in the model dtype. Dequantized value: (q - zero) * scale with q, zero in
    [0, 15] (symmetric: zero = 8). `zero_offset` is what the checkpoint's stored zero misses: 1 for GPTQ
    v1, whose packer stored zero - 1 (gptq_v2 and AWQ store the zero itself)."""
    checkpoint_format: str  # "awq" | "gptq" | "pack-quantized"
    group_size: int  # input columns per scale; CHANNEL_GROUP = the whole input dim
    symmetric: bool
    zero_offset: int = 0
    ignore: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return {"awq": "awq", "gptq": "gptq", "pack-quantized": "compressed-tensors-w4a16"}[self.checkpoint_format]


QuantScheme = Fp8Scheme | Int4Scheme


@dataclass(frozen=True)
class KVCacheScheme:
    """The KV cache's storage: the model dtype ("auto") or e4m3 with one scale per layer for k and one
    for v (read from the checkpoint's k_scale / v_scale where it has them, else 1.0)."""
    dtype: str = "auto"  # "auto" | "fp8"
    checkpoint_scales: bool = False  # the checkpoint carries per-layer k_scale / v_scale tensors

    @property
    def is_fp8(self) -> bool:
        return self.dtype == "fp8"


def parse_kv_cache_dtype(kv_cache_dtype: str, hf_config: Mapping[str, Any] | None = None) -> KVCacheScheme:
    """`--kv-cache-dtype` (vLLM's choices: auto = the model dtype; fp8 = fp8_e4m3) and whether the
    checkpoint has KV scales (compressed-tensors `kv_cache_scheme`)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: unsupported value {kv_cache_dtype!r}; choose one of "
                         f"{', '.join(KV_CACHE_DTYPES)}")
    qc = (hf_config or {}).get("quantization_config") or {}
    # compressed-tensors' kv_cache_scheme (self_attn.k_scale / v_scale), or AutoFP8's kv_cache_quant_targets
    # (self_attn.k_proj.output_scale / v_proj.output_scale)
    has_scales = bool(qc.get("kv_cache_scheme") or qc.get("kv_cache_quant_targets"))
    if kv_cache_dtype == "auto":
        return KVCacheScheme("auto", has_scales)
    return KVCacheScheme("fp8", has_scales)


def describe_quantization(hf_config: Mapping[str, Any], quantization: str | None, kv_cache_dtype: str,
                          model_dtype: Any) -> dict[str, str | None]:
    """What a deployment runs, for describe() and /v1/models: the quantization method's name (None:
    unquantized) and the KV cache's storage dtype ("float8_e4m3fn", or the model dtype's name)."""
    scheme = parse_quantization_config(hf_config, quantization)
    kv = "float8_e4m3fn" if parse_kv_cache_dtype(kv_cache_dtype).is_fp8 else str(model_dtype).removeprefix("torch.")
    return {"quantization": scheme.name if scheme is not None else None, "kv_cache_dtype": kv}


def parse_quantization_config(hf_config: Mapping[str, Any], quantization: str | None = None) -> QuantScheme | None:
    """The scheme of a checkpoint whose config.json is `hf_config`, or of `--quantization` on an
    unquantized one; None: unquantized. Raises ValueError naming the field for anything carpool cannot
    run (an unknown quant_method, bits other than 4 or 8, act-order GPTQ, unsupported group sizes...)."""
    if quantization is not None and quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization: unsupported value {quantization!r}; choose one of "
                         f"{', '.join(QUANTIZATION_CHOICES)}")
    qc = hf_config.get("quantization_config")
    if qc is None:
        if quantization == "fp8":
            return Fp8Scheme("online", "channel", None, dynamic_activations=True)
        return None
    if not isinstance(qc, Mapping):
        raise ValueError(f"quantization_config: expected an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    parsers = {"fp8": _parse_hf_fp8, "awq": _parse_awq, "gptq": _parse_gptq,
               "compressed-tensors": _parse_compressed_tensors}
    if method not in parsers:
        raise ValueError(f"quantization_config.quant_method: unsupported {method!r}; carpool loads "
                         f"{', '.join(repr(m) for m in parsers)}")
    scheme = parsers[method](qc)
    if quantization == "fp8" and not isinstance(scheme, Fp8Scheme):
        raise ValueError(f"quantization: 'fp8' was asked for, but the checkpoint is already quantized "
                         f"with quant_method {method!r} ({scheme.name}); drop --quantization to run it as it is")
    return scheme


def _check_int4_group(group_size: Any, field: str) -> int:
    if not isinstance(group_size, int) or (group_size not in SUPPORTED_GROUP_SIZES and group_size != CHANNEL_GROUP):
        raise ValueError(f"{field}: group size {group_size!r} is not supported; carpool runs "
                         f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))} or -1 (per channel)")
    return group_size


def _check_bits(bits: Any, allowed: int, field: str) -> None:
    if bits != allowed:
        raise ValueError(f"{field}: {bits!r}-bit weights are not supported here; carpool runs {allowed}-bit")


def _ignore_list(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field}: expected a list of module names, got {value!r}")
    return tuple(value)


def _parse_hf_fp8(qc: Mapping[str, Any]) -> Fp8Scheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt: {fmt!r} is not supported; carpool runs 'e4m3' FP8")
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt not in (None, "float"):
        raise ValueError(f"quantization_config.scale_fmt: {scale_fmt!r} (e8m0 scales) is not supported; "
                         "carpool reads float32 weight_scale_inv")
    act = str(qc.get("activation_scheme", "dynamic")).lower()
    if act not in ("dynamic", "static"):
        raise ValueError(f"quantization_config.activation_scheme: {act!r} is not supported; "
                         "choose 'dynamic' or 'static'")
    block = qc.get("weight_block_size")
    if block is not None:
        if tuple(block) != FP8_BLOCK:
            raise ValueError(f"quantization_config.weight_block_size: {list(block)} is not supported; "
                             f"carpool runs {list(FP8_BLOCK)} blocks (or none: one scale per tensor)")
        if act != "dynamic":
            raise ValueError("quantization_config.activation_scheme: 'static' with weight_block_size is "
                             "not supported; block-scaled FP8 runs with dynamic activations")
    ignore = _ignore_list(qc.get("modules_to_not_convert", qc.get("ignored_layers")),
                          "quantization_config.modules_to_not_convert")
    return Fp8Scheme("fp8", "block" if block is not None else "tensor", FP8_BLOCK if block is not None else None,
                     dynamic_activations=act == "dynamic", ignore=ignore)


def _parse_awq(qc: Mapping[str, Any]) -> Int4Scheme:
    _check_bits(qc.get("bits", qc.get("w_bit")), 4, "quantization_config.bits")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version: AWQ {version!r} packing is not supported; carpool "
                         "loads AWQ 'gemm' checkpoints")
    if not qc.get("zero_point", True):
        raise ValueError("quantization_config.zero_point: AWQ without zero points is not supported")
    group = _check_int4_group(qc.get("group_size", qc.get("q_group_size")), "quantization_config.group_size")
    if group == CHANNEL_GROUP:
        raise ValueError("quantization_config.group_size: AWQ needs a group size (got -1)")
    ignore = _ignore_list(qc.get("modules_to_not_convert"), "quantization_config.modules_to_not_convert")
    return Int4Scheme("awq", group, symmetric=False, zero_offset=0, ignore=ignore)


def _parse_gptq(qc: Mapping[str, Any]) -> Int4Scheme:
    _check_bits(qc.get("bits"), 4, "quantization_config.bits")
    if qc.get("desc_act"):
        raise ValueError("quantization_config.desc_act: act-order GPTQ (desc_act true) is not supported; "
                         "carpool loads GPTQ checkpoints with desc_act false")
    group = _check_int4_group(qc.get("group_size"), "quantization_config.group_size")
    # transformers writes the format as `checkpoint_format` (legacy) or `format`; v1 is the default.
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config.checkpoint_format: {fmt!r} is not supported; carpool loads "
                         "'gptq' (v1) and 'gptq_v2'")
    ignore = _ignore_list(qc.get("modules_to_not_convert"), "quantization_config.modules_to_not_convert")
    # v1 (AutoGPTQ's packer) stored zero - 1 for every group; v2 stores the zero itself.
    return Int4Scheme("gptq", group, symmetric=bool(qc.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0,
                      ignore=ignore)


def _parse_compressed_tensors(qc: Mapping[str, Any]) -> QuantScheme:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(f"quantization_config.quantization_status: {status!r} checkpoints are not "
                         "supported; carpool loads 'compressed' ones")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError("quantization_config.config_groups: empty; nothing says how weights are quantized")
    schemes = []
    for name, group in groups.items():
        prefix = f"quantization_config.config_groups.{name}"
        fmt = group.get("format") or qc.get("format")
        ignore = _ignore_list(qc.get("ignore"), "quantization_config.ignore")
        schemes.append(_parse_ct_group(group, fmt, prefix, ignore))
    if any(s != schemes[0] for s in schemes[1:]):
        raise ValueError("quantization_config.config_groups: groups with different schemes are not "
                         "supported; carpool runs one scheme for every quantized layer")
    return schemes[0]


def _parse_ct_group(group: Mapping[str, Any], fmt: Any, prefix: str, ignore: tuple[str, ...]) -> QuantScheme:
    targets = group.get("targets") or []
    if list(targets) != ["Linear"]:
        raise ValueError(f"{prefix}.targets: {targets!r} is not supported; carpool runs schemes that "
                         "target every 'Linear' (with `ignore` for exceptions)")
    weights = group.get("weights")
    if not weights:
        raise ValueError(f"{prefix}.weights: missing; weight-less (activation-only) schemes are not supported")
    if group.get("output_activations"):
        raise ValueError(f"{prefix}.output_activations: output quantization is not supported")
    wtype, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if weights.get("actorder"):
        raise ValueError(f"{prefix}.weights.actorder: {weights['actorder']!r} is not supported; carpool "
                         "loads weights without activation ordering")
    if weights.get("dynamic"):
        raise ValueError(f"{prefix}.weights.dynamic: dynamic weight quantization is not supported")
    acts = group.get("input_activations")
    if wtype == "float":
        _check_bits(bits, 8, f"{prefix}.weights.num_bits")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ValueError(f"quantization_config.format: {fmt!r} is not supported for FP8 weights; carpool "
                             "loads 'float-quantized'")
        if not weights.get("symmetric", True):
            raise ValueError(f"{prefix}.weights.symmetric: asymmetric FP8 weights are not supported")
        block = None
        if strategy == "block":
            block = tuple(weights.get("block_structure") or ())
            if block != FP8_BLOCK:
                raise ValueError(f"{prefix}.weights.block_structure: {list(block)} is not supported; carpool "
                                 f"runs {list(FP8_BLOCK)} blocks")
        elif strategy not in ("tensor", "channel"):
            raise ValueError(f"{prefix}.weights.strategy: {strategy!r} is not supported for FP8; choose "
                             "'tensor', 'channel' or 'block'")
        dynamic = _parse_ct_fp8_activations(acts, strategy, prefix)
        return Fp8Scheme("compressed-tensors", strategy, block, dynamic_activations=dynamic, ignore=ignore)
    if wtype == "int":
        _check_bits(bits, 4, f"{prefix}.weights.num_bits")
        if fmt != "pack-quantized":
            raise ValueError(f"quantization_config.format: {fmt!r} is not supported for int4 weights; carpool "
                             "loads 'pack-quantized'")
        if acts:
            raise ValueError(f"{prefix}.input_activations: quantized activations with int4 weights are not "
                             "supported; carpool runs int4 weight-only (W4A16)")
        if strategy == "group":
            group_size = _check_int4_group(weights.get("group_size"), f"{prefix}.weights.group_size")
        elif strategy == "channel":
            group_size = CHANNEL_GROUP
        else:
            raise ValueError(f"{prefix}.weights.strategy: {strategy!r} is not supported for int4; choose "
                             "'group' or 'channel'")
        return Int4Scheme("pack-quantized", group_size, symmetric=bool(weights.get("symmetric", True)),
                          zero_offset=0, ignore=ignore)
    raise ValueError(f"{prefix}.weights.type: {wtype!r} is not supported; carpool loads 'float' (FP8) and "
                     "'int' (4-bit) weights")


def _parse_ct_fp8_activations(acts: Mapping[str, Any] | None, weight_strategy: str, prefix: str) -> bool:
    """True for dynamic activations, False for a static per-tensor input_scale."""
    if not acts:
        raise ValueError(f"{prefix}.input_activations: FP8 weight-only (W8A16) checkpoints are not supported; "
                         "carpool runs FP8 W8A8")
    if acts.get("type") != "float" or acts.get("num_bits") != 8:
        raise ValueError(f"{prefix}.input_activations: {acts.get('num_bits')}-bit {acts.get('type')} "
                         "activations are not supported; carpool runs 8-bit float")
    strategy = acts.get("strategy")
    if acts.get("dynamic"):
        allowed = ("group",) if weight_strategy == "block" else ("token",)
        if strategy not in allowed:
            raise ValueError(f"{prefix}.input_activations.strategy: dynamic {strategy!r} with {weight_strategy} "
                             f"weights is not supported; carpool runs {allowed[0]!r}")
        if strategy == "group" and acts.get("group_size") != FP8_BLOCK[1]:
            raise ValueError(f"{prefix}.input_activations.group_size: {acts.get('group_size')!r} is not "
                             f"supported; carpool runs {FP8_BLOCK[1]}")
        return True
    if strategy != "tensor" or weight_strategy == "block":
        raise ValueError(f"{prefix}.input_activations.strategy: static {strategy!r} activations with "
                         f"{weight_strategy} weights are not supported; carpool runs static per-tensor "
                         "scales with tensor or channel weights")
    return False


def is_ignored(scheme: QuantScheme, module_name: str, checkpoint_names: tuple[str, ...] = ()) -> bool:
    """True when the checkpoint leaves `module_name` (or, for a merged carpool layer, any of the
    checkpoint modules in `checkpoint_names` that it holds) unquantized. Entries are full module names,
    a name's last components (HF's `modules_to_not_convert` lists e.g. "lm_head"), or "re:" patterns
    (compressed-tensors)."""
    names = checkpoint_names or (module_name,)
    hits = [any(_ignore_matches(entry, n) for entry in scheme.ignore) for n in names]
    if any(hits) and not all(hits):
        ignored = [n for n, hit in zip(names, hits) if hit]
        quantized = [n for n, hit in zip(names, hits) if not hit]
        raise ValueError(f"quantization_config.ignore: {module_name} merges {len(names)} checkpoint modules, of "
                         f"which only some are left unquantized ({_first_names(ignored)}; quantized: "
                         f"{_first_names(quantized)}); carpool needs all or none of a merged layer quantized")
    return bool(hits) and all(hits)


def _first_names(names: list[str], most: int = 3) -> str:
    """Up to `most` names, then how many there are (a routed-experts layer merges hundreds of modules)."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def _ignore_matches(entry: str, name: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)
