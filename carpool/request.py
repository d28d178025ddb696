"""Request: the scheduler's view of one sequence being generated.

`num_computed_tokens` is the single progress counter the whole scheduler works from: tokens before it
have their K/V in the cache; tokens from it up to `num_tokens` still need a forward pass. Prefill,
chunked prefill, decode, prefix hits and recompute after preemption are all just different values of
that counter.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from carpool.core.sched_output import TokenLogprobs
from carpool.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def finished(self) -> bool:
        return self.value >= RequestStatus.FINISHED_STOPPED.value

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self.value)


_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED.value: "stop", RequestStatus.FINISHED_LENGTH.value: "length",
                   RequestStatus.FINISHED_ABORTED.value: "abort"}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens being sampled by a step still in flight (async scheduling): their positions are scheduled
    # and their K/V will be computed, but their values are not known on the host yet.
    num_output_placeholders: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit length at first admission; -1 until scheduled
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Chained content hashes of this request's full blocks (prefix caching); extended lazily.
    block_hashes: list[bytes] = field(default_factory=list)
    # Extra hash key: requests with different salts never share cached blocks (e.g. per tenant or adapter).
    cache_salt: str | None = None
    # Speculative decoding: the proposer's guesses of the tokens after output_token_ids, not yet verified.
    # They are never part of num_tokens (nor of any block hash); the next step may verify them.
    spec_token_ids: list[int] = field(default_factory=list)
    # Prompt logprobs gathered chunk by chunk (sampling_params.prompt_logprobs set): entry i scores prompt
    # token i + 1. Handed out once, with the first output token; None when not asked for.
    prompt_logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        if self.sampling_params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: prompt plus generated."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        assert self.sampling_params.max_tokens is not None
        return self.sampling_params.max_tokens

    def token_id(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]
