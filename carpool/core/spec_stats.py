"""Speculative decoding's counters (vLLM's spec_decode metrics), kept by the scheduler: plain data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodingStats:
    """Cumulative since the engine started. Acceptance rate = num_accepted_tokens / num_draft_tokens;
    mean accepted length per verification = num_accepted_tokens / num_drafts (the target adds one token
    of its own to each); num_accepted_tokens_per_pos[i] counts verifications that accepted position i."""

    num_speculative_tokens: int = 0
    num_drafts: int = 0  # verifications: a request checking its proposed tokens in one step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_speculative_tokens

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        assert 0 <= num_accepted_tokens <= num_draft_tokens <= self.num_speculative_tokens
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for pos in range(num_accepted_tokens):
            self.num_accepted_tokens_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
