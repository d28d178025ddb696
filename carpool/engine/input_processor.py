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
    def __init__(self, config: EngineConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        ids = list(config.model.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if tok_eos is not None and tok_eos not in ids:
            ids.append(tok_eos)
        self.eos_token_ids: tuple[int, ...] = tuple(ids)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Turn a prompt into (text, token ids), validating both."""
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
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
        vocab = self.config.model.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids: token id {t!r} is outside the vocabulary [0, {vocab})")
        return text, token_ids

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | None,
                arrival_time: float | None = None) -> ProcessedRequest:
        """Validate a request against the model's limits; raises ValueError naming the field. The KV
        capacity check (which needs the core's block count) is the core's."""
        text, token_ids = self.tokenize_prompt(prompt)
        params = (params or SamplingParams()).clone()
        params.eos_token_ids = self.eos_token_ids
        max_len = self.config.scheduler.max_model_len
        if len(token_ids) > max_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens exceed max_model_len={max_len}")
        if params.max_tokens is None:
            if len(token_ids) >= max_len:
                raise ValueError(f"prompt: {len(token_ids)} tokens leave no room to generate within "
                                 f"max_model_len={max_len}")
            params.max_tokens = max_len - len(token_ids)
        total = len(token_ids) + params.max_tokens
        if total > max_len:
            raise ValueError(f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens "
                             f"({params.max_tokens}) = {total} exceeds max_model_len={max_len}")
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
