"""Evaluation of an exported (Hugging Face format) model: held-out perplexity, and whether its
continuations of Python functions parse.

Perplexity runs the model class directly with the training runtime (dense causal attention over packed
sequences, the chunked cross-entropy), so it scores every position of the held-out token file. The
function-completion check runs through carpool's serving engine (`LLM`), greedy, as a user would.
"""

from __future__ import annotations

import ast
import math
import random
import textwrap
from dataclasses import dataclass
from typing import Any

import torch

from carpool.training.corpus import Manifest, read_document
from carpool.training.data import eval_batches
from carpool.training.pretokenize import open_tokens


def load_for_eval(model_dir: str, device: torch.device) -> Any:
    """The exported model as a CausalLMLoss in fp32 (bf16 matmuls under autocast on GPU)."""
    import json
    import os

    from carpool.config import ModelConfig
    from carpool.models.loader import build_model, load_weights
    from carpool.models.runtime import ModelRuntime
    from carpool.training.trainer import CausalLMLoss

    with open(os.path.join(model_dir, "config.json")) as f:
        hf_config = json.load(f)
    mc = ModelConfig.from_hf_config(hf_config, path=model_dir, dtype="float32")
    model = build_model(mc, ModelRuntime.for_training(), device)
    load_weights(model, model_dir)
    return CausalLMLoss(model, loss_chunk_size=1024).eval(), hf_config


@torch.no_grad()
def heldout_perplexity(model_dir: str, data: str, seq_len: int = 1024, batch_size: int = 8,
                       max_sequences: int | None = None, device: str | None = None) -> dict[str, float]:
    """Mean token cross-entropy and perplexity of the model on a token file (all of it by default)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module, hf_config = load_for_eval(model_dir, dev)
    tokens, meta = open_tokens(data)
    if meta.vocab_size > int(hf_config["vocab_size"]):
        raise ValueError(f"data: tokenized with a vocabulary of {meta.vocab_size}, larger than the model's "
                         f"{hf_config['vocab_size']}")
    max_pos = int(hf_config.get("max_position_embeddings", seq_len))
    if seq_len > max_pos:
        raise ValueError(f"seq_len: {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    total, count = 0.0, 0
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for b in eval_batches(tokens, seq_len, batch_size, pad_id=meta.pad_token_id, max_sequences=max_sequences):
        with autocast:
            total += float(module(b.input_ids.to(dev), b.labels.to(dev)))
        count += b.num_label_tokens
    loss = total / max(count, 1)
    del module
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the serving engine that may follow sizes its KV cache from free memory
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "seq_len": seq_len}


# ---------------------------------------------------------------------------------------------------------
# Python function completions


@dataclass(frozen=True)
class FunctionPrompt:
    file: str        # corpus path of the held-out file
    name: str        # the function's name
    prompt: str      # its decorators-free header (def line(s)), dedented to column 0, without the final newline


def function_prompts(manifest: Manifest, count: int = 100, seed: int = 0, max_header_lines: int = 6
                     ) -> list[FunctionPrompt]:
    """`count` function headers from the manifest's held-out files, chosen deterministically by seed."""
    found: list[FunctionPrompt] = []
    for file in manifest.files_of("heldout"):
        text = read_document(manifest, file)
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first_body = node.body[0].lineno
            if first_body <= node.lineno or first_body - node.lineno > max_header_lines:
                continue  # one-line def, or a header too long to be a prompt
            header = "".join(lines[node.lineno - 1:first_body - 1])
            prompt = textwrap.dedent(header)
            if not prompt.endswith("\n") or not prompt.lstrip().startswith(("def ", "async def ")):
                continue
            # The prompt stops at the header's last character: a byte-level BPE merges a newline with the
            # indentation after it, so a prompt ending in a bare newline token tells the model "column 0
            # next", which no function body starts with.
            found.append(FunctionPrompt(file.path, node.name, prompt[:-1]))
    if len(found) < count:
        raise ValueError(f"code prompts: only {len(found)} functions in the held-out files, {count} asked")
    return random.Random(seed).sample(found, count)


def cut_at_function_end(header: str, completion: str) -> tuple[str, bool]:
    """The function a completion of a column-0 `header` (ending mid-line, at its colon) writes: the
    header's lines and the body lines after them, up to the first non-blank line at column 0 (where the
    function ended). Without such a line the last, possibly unfinished, line is dropped. Returns
    (source, ended)."""
    lines = (header + completion).splitlines(keepends=True)
    first_body = header.count("\n") + 1
    for i in range(first_body, len(lines)):
        if lines[i].strip() and not lines[i][0].isspace():
            return "".join(lines[:i]), True
    if len(lines) > first_body and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    return "".join(lines), False


def parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def function_completion_parse_rate(model_dir: str, manifest: Manifest, count: int = 100, max_tokens: int = 64,
                                   seed: int = 0, device: str | None = None, examples: int = 3
                                   ) -> dict[str, Any]:
    """The fraction of greedy completions (header + body cut at the function's end) that `ast.parse`
    accepts, over `count` held-out function headers."""
    from carpool import LLM, SamplingParams

    prompts = function_prompts(manifest, count, seed)
    kwargs: dict[str, Any] = {"device": device} if device else {}
    llm = LLM(model=model_dir, **kwargs)
    outs = llm.generate([p.prompt for p in prompts], SamplingParams(temperature=0.0, max_tokens=max_tokens),
                        use_tqdm=False)
    ok = ended = 0
    shown = []
    for p, out in zip(prompts, outs):
        source, did_end = cut_at_function_end(p.prompt, out.outputs[0].text)
        good = parses(source)
        body = source[len(p.prompt):]
        ok += good
        ended += did_end
        if len(shown) < examples:
            shown.append({"file": p.file, "prompt": p.prompt, "completion": body, "parses": good})
    return {"prompts": count, "max_tokens": max_tokens, "parse_fraction": ok / count,
            "ended_within_budget": ended / count, "examples": shown}
