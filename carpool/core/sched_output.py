"""Plain-data messages between the scheduler and the model runner.

No tensors and no objects with behaviour: these cross a process boundary under tensor parallelism,
where they are encoded as JSON (never pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from carpool.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has no state for: first scheduled, or resumed after preemption."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty only when resuming after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request scheduled in an earlier step too; only what changed is sent."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Set when rejected drafts freed blocks at the end of the request's table since it was last scheduled:
    # the runner cuts the table to this many blocks before appending new_block_ids.
    num_blocks_kept: int | None = None


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step, in batch order (cached requests first, then new).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the runner must forget: finished, aborted or preempted since the previous step.
    finished_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding (vLLM's name): req_id -> proposed tokens scheduled for verification. Each is
    # counted in num_scheduled_tokens after the request's known tokens; the runner computes logits at
    # the last known token and at every proposed one.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprobs:
    """Top-N alternatives for one sampled token plus the sampled token itself (first entry)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class PromptLogprobs:
    """Logprobs of a run of prompt tokens, from the hidden states of one prefill chunk: entry i scores
    prompt token `start + i` given the tokens before it (TokenLogprobs: that token first, then the
    top-N). Prompt token 0 has no entry: nothing comes before it."""

    start: int
    logprobs: list[TokenLogprobs]


@dataclass
class ModelRunnerOutput:
    # Requests that produced a token this step (those whose scheduled tokens reached the end of
    # their known tokens), with the token each sampled. A request that verified proposed tokens appears
    # once per token it emits (its accepted tokens, then the target's own), consecutively and in order.
    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    # Speculative decoding: req_id -> the proposer's guesses of the tokens after this step's.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Requests with prompt_logprobs whose chunk this step covered prompt tokens.
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's progress in one step, as the scheduler saw it."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs | None]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # With the request's first token, when it asked for prompt_logprobs: one entry per prompt token
    # after the first (complete, and sent once).
    new_prompt_logprobs: list[TokenLogprobs] | None = None
