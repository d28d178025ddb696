"""Prompt + SamplingParams -> validated `Request`s, before anything reaches the scheduler.

Kept apart from the core so that validation runs wherever the caller is: in the server's frontend
process a bad request is refused (ValueError naming the field -> HTTP 400) without a round trip to the
engine core, and the core only ever sees requests that passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Union

from carpool.config import EngineConfig
from carpool.request import Request
from carpool.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict[str, Any]]


def child_request_id(parent_id: str, index: int, n: int) -> str:
    """The scheduler's id for sequence `index` of a request with n > 1 sequences."""
    return parent_id if n == 1 else f"{index}_{parent_id}"


@dataclass
class ProcessedRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # a copy, with eos_token_ids and max_tokens filled in
    arrival_time: float
    sequences: list[Request]  # the n sequences, as the scheduler will hold them


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any | None, num_kv_blocks: int | None = None) -> None:
        """`num_kv_blocks`: the core's KV cache size once known, so that a request too long for it is
        refused here with the numbers (the core re-checks it either way)."""
        self.config = config
        self.tokenizer = tokenizer
        self.num_kv_blocks = num_kv_blocks
        ids = list(config.model.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if tok_eos is not None and tok_eos not in ids:
            ids.append(tok_eos)
        self.eos_token_ids: tuple[int, ...] = tuple(ids)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Turn a prompt into (text, token ids), validating both. A dict with both "prompt" and
        "prompt_token_ids" is a prompt the caller tokenized itself (the server does, off its event loop)."""
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt") if isinstance(prompt.get("prompt"), str) else None
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids instead of text")
            text = prompt
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
        else:
            raise ValueError(f"prompt: must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        max_len = self.config.scheduler.max_model_len
        if len(token_ids) > max_len:  # (before checking each id of what may be a very long list)
            raise ValueError(f"prompt: {len(token_ids)} tokens exceed max_model_len={max_len}")
        vocab = self.config.model.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                shown = repr(t) if not isinstance(t, int) or t.bit_length() <= 128 else f"of {t.bit_length()} bits"
                raise ValueError(f"prompt_token_ids: token id {shown[:40]} is outside the vocabulary [0, {vocab})")
        return text, token_ids

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                arrival_time: float | None = None) -> ProcessedRequest:
        """Validate a request against the model's limits; raises ValueError naming the field. The KV
        capacity check (which needs the core's block count) is the core's."""
        text, token_ids = self.tokenize_prompt(prompt)
        params = (params or SamplingParams()).clone()
        params.eos_token_ids = self.eos_token_ids
        self._check_length(len(token_ids), params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        sequences = []
        for i in range(params.n):
            seq_params = params
            if params.n > 1 and params.seed is not None:
                seq_params = params.clone()
                seq_params.seed = params.seed + i
            sequences.append(Request(child_request_id(request_id, i, params.n), token_ids, seq_params,
                                     arrival_time=arrival))
        return ProcessedRequest(request_id, text, token_ids, params, arrival, sequences)

    def _check_length(self, num_prompt: int, params: SamplingParams) -> None:
        """The prompt, then prompt + max_tokens, against max_model_len and the KV cache; an omitted
        max_tokens becomes all the room left. Each refusal names the field to change and the limit."""
        max_len = self.config.scheduler.max_model_len
        bs = self.config.cache.block_size
        capacity, kv = max_len, ""
        if self.num_kv_blocks is not None and self.num_kv_blocks * bs < max_len:
            capacity = self.num_kv_blocks * bs
            kv = f"the KV cache holds {self.num_kv_blocks} blocks of {bs} tokens ({capacity} tokens)"
        if num_prompt > max_len:
            raise ValueError(f"prompt: {num_prompt} tokens exceed max_model_len={max_len}")
        if num_prompt >= capacity:  # no room for even one output token
            raise ValueError(f"prompt: {num_prompt} tokens leave no room to generate a token: "
                             f"{kv or f'max_model_len={max_len}'}")
        if params.max_tokens is None:
            params.max_tokens = capacity - num_prompt
        total = num_prompt + params.max_tokens
        if total > max_len:
            raise ValueError(f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{total} exceeds max_model_len={max_len}; at most {max_len - num_prompt} fit")
        if total > capacity:
            raise ValueError(f"max_tokens: prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) needs "
                             f"{-(-total // bs)} KV blocks but {kv}; at most {capacity - num_prompt} fit")
