"""Tiny quantized checkpoints in the formats users download, and their dequantized twins.

`write_quantized(src, dst, fmt)` quantizes the float32 checkpoint at `src` (tests/checkpoints.py) into
`dst`, with the format's own tooling where it installs on CPU:
- compressed-tensors (`ct-w4a16`, `ct-w4a16-sym`, `ct-fp8-channel`, `ct-fp8-tensor-static`, `ct-fp8-block`): its own
  QuantizationConfig, qparams and ModelCompressor, as llm-compressor uses them;
- Hugging Face fine-grained FP8 (`fp8-block`; `fp8-tensor`: one scale per tensor): transformers' own
  quantizer (Fp8Quantize);
- AutoFP8's per-tensor FP8 with static activation scales and k/v output scales (`autofp8-static`, the
  neuralmagic FP8 releases' format: quant_method "fp8" with `weight_scale` / `input_scale`): a transcription
  of AutoFP8's per_tensor_quantize (AutoFP8 needs a GPU to calibrate);
- AWQ (`awq`) and GPTQ (`gptq`, `gptq-asym`, `gptq-v2-asym`): carpool.quantization.writers' small packers
  (the tools, AutoAWQ and AutoGPTQ, need CUDA builds), which follow the packing code named in each
  docstring.

`write_dequantized_reference(quantized, dst)` writes the same model with every quantized weight
dequantized by the format's reference (compressed-tensors' decompressors, transformers' FP8
dequantization, AutoAWQ's / AutoGPTQ's dequantization as quantization/formats.py transcribes them): a
plain float32 checkpoint that transformers runs as the exactness oracle;
`write_online_fp8_reference(src, dst)` the same for `--quantization fp8` on a float checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from carpool.quantization.writers import (
    INT4_FORMATS,
    LINEARS,
    copy_side_files,
    linear_modules,
    set_quantization_config,
    write_int4,
)

# Model dimensions for quantized tests: every projection's input is a multiple of the 128-column group
# and every output a multiple of 8 (packed words); q/k/v/gate/up outputs of FP8 block checkpoints are
# whole 128-row blocks when num_key_value_heads = 4.
QUANT_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
FORMATS = ("awq", "gptq", "gptq-asym", "gptq-v2-asym", "ct-w4a16", "ct-w4a16-sym", "ct-fp8-channel",
           "ct-fp8-tensor-static", "ct-fp8-block", "fp8-block", "fp8-tensor", "autofp8-static")
FAMILIES = ("llama", "qwen2", "qwen3")
# (family, format) cells the whole engine runs with chunked prefill, preemption and prefix hits
# (test_quant_engine.py): every format and every family at least once. The other cells of
# FAMILIES x FORMATS run through the model alone (test_quant_methods.py), so every format meets every
# family's layers (Qwen2's q/k/v biases, Qwen3's q/k norms and explicit head_dim).
ENGINE_CELLS = (("llama", "awq"), ("qwen2", "gptq"), ("qwen3", "gptq-v2-asym"), ("qwen2", "ct-w4a16"),
                ("qwen3", "ct-w4a16-sym"), ("llama", "ct-fp8-channel"), ("qwen2", "ct-fp8-tensor-static"),
                ("qwen3", "fp8-block"), ("llama", "gptq-asym"))


def quant_overrides(arch: str, fmt: str) -> dict:
    """Config overrides of a float checkpoint that `fmt` can quantize (Qwen3's default test head_dim of
    24 makes o_proj's input 96 columns: no whole 128-column group). Experts of 256 intermediate rows:
    two 128-row blocks per projection, and down projections of two 128-column blocks (one per rank of
    two)."""
    dims = dict(QUANT_DIMS)
    if arch == "qwen3":
        dims["head_dim"] = 32
    if arch == "qwen3_moe":  # q/k/v outputs of 2 x 128 rows: whole blocks on each of two ranks
        dims["head_dim"] = 64
    if arch in ("qwen3_moe", "qwen2_moe"):
        dims["moe_intermediate_size"] = 256
    if arch == "qwen2_moe":
        dims["shared_expert_intermediate_size"] = 128
    if arch == "mixtral":
        dims["intermediate_size"] = 256
    if fmt in ("fp8-block", "ct-fp8-block"):
        dims["num_key_value_heads"] = 4
    return dims


# --- compressed-tensors, with its own tooling ------------------------------------------------------------

def _ct_scheme(fmt: str, group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if fmt.startswith("ct-w4a16"):
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group,
                                   symmetric=fmt == "ct-w4a16-sym")
        return QuantizationScheme(targets=["Linear"], weights=weights), "pack-quantized"
    if fmt == "ct-fp8-block":  # llm-compressor's FP8_BLOCK: 128x128 weight blocks, dynamic 128-column groups
        weights = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128],
                                   symmetric=True)
        acts = QuantizationArgs(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts), "float-quantized"
    strategy = "channel" if fmt == "ct-fp8-channel" else "tensor"
    weights = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    acts = (QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True) if fmt == "ct-fp8-channel"
            else QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False))
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts), "float-quantized"


def _set_min_max_qparams(model: torch.nn.Module) -> None:
    """Each quantized module's weight scale (and zero point) from its weight's min / max per group,
    channel or tensor, and static activation scales as a calibration would set them (seeded)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    gen = torch.Generator().manual_seed(1)
    for _, m in model.named_modules():
        if not hasattr(m, "quantization_scheme"):
            continue
        w = m.weight.data
        args = m.quantization_scheme.weights
        if args.strategy == "group":
            w = w.unflatten(-1, (-1, args.group_size))
            lo, hi = w.amin(-1), w.amax(-1)
        elif args.strategy == "block":  # (whole 128x128 blocks: every test dimension is a multiple of 128)
            bn, bk = args.block_structure
            blocks = w.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))
            lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
        elif args.strategy == "channel":
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        else:
            lo, hi = w.amin(), w.amax()
        scale, zero = calculate_qparams(lo, hi, args)
        m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zero.reshape(m.weight_zero_point.shape))
        if hasattr(m, "input_scale"):
            m.input_scale.data.fill_(0.01 + 0.02 * torch.rand((), generator=gen).item())


def _write_compressed_tensors(src: str, dst: str, fmt: str, group: int) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    scheme, ct_format = _ct_scheme(fmt, group)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    _set_min_max_qparams(model)
    compressor = ModelCompressor.from_pretrained_model(model, ct_format)
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def _moe_linear_modules(weights: dict[str, torch.Tensor]) -> list[str]:
    """The projections of a mixture-of-experts checkpoint, Mixtral's w1/w2/w3 experts included."""
    names = (*LINEARS, "w1", "w2", "w3")
    return sorted(name[:-len(".weight")] for name in weights
                  if name.endswith(".weight") and name.split(".")[-2] in names)


def _write_compressed_tensors_per_tensor(src: str, dst: str, fmt: str, group: int, ignore: list[str]) -> None:
    """compressed-tensors with its own tooling on a checkpoint whose linear weights are not all nn.Linear
    modules of the transformers model (mixture-of-experts stacks): each weight of the safetensors file
    becomes an nn.Linear of the same name in a container module, which is quantized (qparams from its own
    min/max: `_set_min_max_qparams`), compressed by ModelCompressor and written back under the
    checkpoint's names. llm-compressor does the same by unfusing the experts into Linear modules."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    scheme, ct_format = _ct_scheme(fmt, group)
    weights = load_file(os.path.join(src, "model.safetensors"))
    container = torch.nn.Module()
    modules = _moe_linear_modules(weights)
    for module in modules:
        w = weights.pop(f"{module}.weight")
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data.copy_(w)
        parent = container
        *path, last = module.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, linear)
    apply_quantization_config(container, QuantizationConfig(config_groups={"group_0": scheme}), show_progress=False)
    _set_min_max_qparams(container)
    compressor = ModelCompressor.from_pretrained_model(container, ct_format)
    compressor.compress_model(container)
    for name, t in container.state_dict().items():
        # (FP8's all-zero zero points are not checkpoint tensors; 4-bit ones, packed, are)
        if name.rsplit(".", 1)[0] in modules and not (name.endswith("zero_point") and t.dtype != torch.int32):
            weights[name] = t.contiguous()
    copy_side_files(src, dst)
    save_file(weights, os.path.join(dst, "model.safetensors"))
    compressor.quantization_config.ignore = ignore
    compressor.update_config(dst)


def _ct_decompress(weights: dict[str, torch.Tensor], qc: dict) -> dict[str, torch.Tensor]:
    """Each compressed module's weight, decompressed by compressed-tensors' own compressor."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group = next(iter(qc["config_groups"].values()))
    scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.load_from_registry(qc["format"])
    out: dict[str, torch.Tensor] = {}
    modules = sorted({n.rsplit(".", 1)[0] for n in weights if n.endswith((".weight_packed", ".weight_scale"))})
    for module in modules:
        local = {n[len(module) + 1:]: t for n, t in weights.items()
                 if n.startswith(module + ".") and not n.endswith(".bias")}
        for n in local:
            weights.pop(f"{module}.{n}")
        out[f"{module}.weight"] = compressor.decompress(local, scheme)["weight"].float()
    return out


# --- Hugging Face fine-grained FP8, with transformers' own quantizer ------------------------------------------

def _hf_fp8_quantizer(block: tuple[int, int] | None = (128, 128)):
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    return Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block)))


def _write_hf_fp8(src: str, dst: str, block: tuple[int, int] | None = (128, 128)) -> None:
    """Every linear weight (MoE checkpoints: each expert's three, not the routers) quantized by
    transformers' Fp8Quantize: to 128x128 blocks, as the Qwen3 FP8 releases are, or (block None) with one
    scale per tensor."""
    quantize = _hf_fp8_quantizer(block)
    weights = load_file(os.path.join(src, "model.safetensors"))
    for module in linear_modules(weights):
        name = f"{module}.weight"
        weights.update(quantize._quantize_one(name, weights.pop(name)))
    copy_side_files(src, dst)
    save_file(weights, os.path.join(dst, "model.safetensors"))
    set_quantization_config(dst, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                            "weight_block_size": list(block) if block is not None else None})


def _write_autofp8_static(src: str, dst: str) -> None:
    """AutoFP8's static checkpoint (auto_fp8/quantize.py): each projection's `weight` e4m3 with `weight_scale`
    = amax / 448 of the whole tensor (per_tensor_quantize), a calibrated `input_scale` (seeded here), and
    k_proj / v_proj `output_scale` (its kv_cache_quant_layers), under {"quant_method": "fp8",
    "activation_scheme": "static", "ignored_layers": [...], "kv_cache_scheme": "static"}."""
    gen = torch.Generator().manual_seed(1)
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    weights = load_file(os.path.join(src, "model.safetensors"))
    for module in linear_modules(weights):
        w = weights.pop(f"{module}.weight")
        scale = fp8_max / w.abs().amax().clamp(min=1e-12)
        weights[f"{module}.weight"] = (w * scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        weights[f"{module}.weight_scale"] = scale.float().reciprocal()
        weights[f"{module}.input_scale"] = torch.tensor(0.01 + 0.02 * torch.rand((), generator=gen).item())
        if module.endswith(("k_proj", "v_proj")):
            weights[f"{module}.output_scale"] = torch.tensor(0.05 + 0.1 * torch.rand((), generator=gen).item())
    copy_side_files(src, dst)
    save_file(weights, os.path.join(dst, "model.safetensors"))
    set_quantization_config(dst, {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"],
                                  "kv_cache_scheme": "static"})


def _is_moe(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return bool(cfg.get("num_experts") or cfg.get("num_local_experts"))


# --- entry points -----------------------------------------------------------------------------------------------

def write_quantized(src: str, dst: str, fmt: str, group: int = 128) -> str:
    if fmt in INT4_FORMATS:
        write_int4(src, dst, fmt, group)
    elif fmt.startswith("ct-") and _is_moe(src):
        _write_compressed_tensors_per_tensor(src, dst, fmt, group, ["lm_head", "re:.*mlp.gate$",
                                                                    "re:.*shared_expert_gate$"])
    elif fmt.startswith("ct-"):
        _write_compressed_tensors(src, dst, fmt, group)
    elif fmt == "fp8-block":
        _write_hf_fp8(src, dst)
    elif fmt == "fp8-tensor":
        _write_hf_fp8(src, dst, block=None)
    elif fmt == "autofp8-static":
        _write_autofp8_static(src, dst)
    else:
        raise ValueError(f"unknown test format {fmt!r}; known: {', '.join(FORMATS)}")
    return dst


def write_dequantized_reference(quantized: str, dst: str) -> str:
    """The quantized checkpoint at `quantized` as a plain float32 checkpoint (see the module docstring)."""
    from carpool.quantization.formats import dequantize_awq, dequantize_fp8, dequantize_gptq

    with open(os.path.join(quantized, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    weights = load_file(os.path.join(quantized, "model.safetensors"))
    method = qc["quant_method"]
    out: dict[str, torch.Tensor] = {}
    if method == "compressed-tensors":
        out = _ct_decompress(weights, qc)
    else:
        modules = sorted({n.rsplit(".", 1)[0] for n in weights
                          if n.endswith((".qweight", ".weight_scale_inv", ".weight_scale"))})
        for m in modules:
            if method == "awq":
                w = dequantize_awq(weights.pop(f"{m}.qweight"), weights.pop(f"{m}.qzeros"), weights.pop(f"{m}.scales"),
                                   qc["group_size"])
            elif method == "gptq":
                offset = 1 if qc.get("checkpoint_format", "gptq") == "gptq" else 0
                w = dequantize_gptq(weights.pop(f"{m}.qweight"), weights.pop(f"{m}.qzeros"), weights.pop(f"{m}.scales"),
                                    weights.pop(f"{m}.g_idx"), offset)
            elif f"{m}.weight_scale" in weights:  # AutoFP8: W = weight * weight_scale (static input scales unused)
                w = weights.pop(f"{m}.weight").float() * weights.pop(f"{m}.weight_scale").float()
                for extra in ("input_scale", "output_scale"):
                    weights.pop(f"{m}.{extra}", None)
            else:
                # carpool's torch dequantization, checked bit for bit against transformers' on CPU
                # (test_fp8_block_dequantization_matches_transformers)
                w = dequantize_fp8(weights.pop(f"{m}.weight"), weights.pop(f"{m}.weight_scale_inv"),
                                   qc["weight_block_size"])
            out[f"{m}.weight"] = w.float().contiguous()
    out.update(weights)
    copy_side_files(quantized, dst)
    save_file(out, os.path.join(dst, "model.safetensors"))
    set_quantization_config(dst, None)
    return dst


def write_online_fp8_reference(src: str, dst: str) -> str:
    """The float checkpoint at `src` as `--quantization fp8` runs it: every projection (LINEARS, each
    expert's included; routers and embeddings not) replaced by its weight rounded to e4m3 with a
    per-output-channel scale (max |row| / 448), dequantized back to float."""
    from carpool.quantization.formats import quantize_fp8_per_channel

    shutil.copytree(src, dst)
    weights = load_file(os.path.join(src, "model.safetensors"))
    for name, w in weights.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q, scale = quantize_fp8_per_channel(w)
            weights[name] = q.float() * scale[:, None]
    save_file(weights, os.path.join(dst, "model.safetensors"))
    return dst


_made: dict[tuple, tuple[str, str]] = {}


def make_quant_checkpoint(tmp_path_factory, arch: str, fmt: str, group: int = 128, **overrides) -> tuple[str, str]:
    """(quantized checkpoint, its dequantized reference) of a tiny random `arch` model, made once per
    session (tmp_path_factory: pytest's). fmt "float": the float32 checkpoint itself, twice."""
    from checkpoints import build_checkpoint

    key = (arch, fmt, group, tuple(sorted(overrides.items())))
    if key not in _made:
        dims = {**quant_overrides(arch, fmt), **overrides}
        src = build_checkpoint(str(tmp_path_factory.mktemp(f"float-{arch}")), arch, **dims)
        if fmt == "float":
            _made[key] = (src, src)
        else:
            q = write_quantized(src, str(tmp_path_factory.mktemp(f"{fmt}-{arch}")), fmt, group)
            _made[key] = (q, write_dequantized_reference(q, str(tmp_path_factory.mktemp(f"{fmt}-{arch}-ref"))))
    return _made[key]


def run_prompt_logits(model, layers, prompt: list[int], chunk: int, cache_dtype: torch.dtype) -> torch.Tensor:
    """Logits of every position of `prompt`, prefilled in chunks of `chunk` tokens through one request's
    paged cache (block size 4)."""
    from carpool.forward_batch import AttentionMetadata, ForwardBatch

    block_size, num_blocks = 4, -(-len(prompt) // 4)
    for layer in layers:
        shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape, dtype=cache_dtype)
        layer.v_cache = torch.zeros(shape, dtype=cache_dtype)
    table = torch.arange(num_blocks, dtype=torch.int32)[None]
    logits = []
    for start in range(0, len(prompt), chunk):
        ids = prompt[start:start + chunk]
        end = start + len(ids)
        meta = AttentionMetadata(torch.tensor([0, len(ids)], dtype=torch.int32), torch.tensor([end], dtype=torch.int32),
                                 table, torch.arange(start, end), len(ids), end, [0, len(ids)], [end])
        batch = ForwardBatch(torch.tensor(ids), torch.arange(start, end), meta)
        with torch.no_grad():
            logits.append(model.compute_logits(model(batch.input_ids, batch.positions, batch)))
    return torch.cat(logits)


def hf_agrees_with_greedy(path: str, prompts: list[list[int]], outputs: list[list[int]], **load_kwargs) -> bool:
    """Whether `outputs` are transformers' greedy continuations of `prompts` on the checkpoint at `path`
    (float32): one forward over each prompt + output, whose argmax at every position must be the next
    output token. The same verdict as comparing with `generate` (greedy is determined by its prefixes),
    at one forward per prompt instead of one per token. load_kwargs go to from_pretrained (MoE references:
    experts_implementation="eager", the loop carpool's CPU path computes in the same order)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load_kwargs).eval()
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs):
            ids = torch.tensor([prompt + out[:-1]])
            logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0]
            if logits[len(prompt) - 1:].argmax(-1).tolist() != out:
                return False
    return True


# How far (in log-probability, nats) a token of the quantized GPU run may fall behind the greedy choice of
# the dequantized reference on the same prefix. FP8 checkpoints quantize activations on the GPU (e4m3 per
# token or per 128-column group, 2^-4 relative rounding) for prefill rows and GEMMs, which the reference
# does not, and bf16 rounding moves activations across e4m3 rounding boundaries: on these tiny random
# models (logits of standard deviation ~1.1, near-ties of a few hundredths) that moves a token by up to
# ~0.45 nats (an MoE routing flip; the CPU emulation of the GPU's W8A8 arithmetic shows the same). A wrong
# activation or weight scale (a scale of another row or channel, or twice the scale) puts tokens 1.5 to 4
# nats behind: well outside this bound.
MAX_DEFICIT = 0.75


def greedy_logprob_deficits(llm, prompts: list[list[int]], outputs: list[list[int]]) -> list[list[float]]:
    """For every token of `outputs`: how far it falls behind the greedy choice of the engine `llm` (an
    `LLM`, the reference), in log-probability, given its prompt and the outputs before it: the top-1
    logprob minus the token's, 0 where the token is the top-1. Teacher forcing (one prefill of prompt +
    outputs per request, read through prompt_logprobs) checks every output token against the same prefix
    the run under test saw, so one early near-tie does not make every later token differ."""
    from carpool import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    results = llm.generate([{"prompt_token_ids": p + o} for p, o in zip(prompts, outputs)], params, use_tqdm=False)
    deficits = []
    for prompt, out, result in zip(prompts, outputs, results):
        per_token = []
        for j, token in enumerate(out):
            at = result.prompt_logprobs[len(prompt) + j]  # the token itself and the top-1
            per_token.append(max(v.logprob for v in at.values()) - at[token].logprob)
        deficits.append(per_token)
    return deficits
