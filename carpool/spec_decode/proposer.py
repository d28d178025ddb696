"""The proposer interface, and the factory that picks an implementation from the speculative config."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from carpool.config import EngineConfig

if TYPE_CHECKING:
    from carpool.worker.input_batch import InputBatch
    from carpool.worker.model_runner import ModelRunner


class Proposer(ABC):
    """Guesses the next tokens of requests whose tokens the target has just sampled.

    Called by the model runner once a step's tokens are on the host (`PendingStep.resolve`), with the
    rows that sampled. Every token of those rows in `batch.token_ids[row, :batch.num_tokens[row]]` is
    verified (the target's). A proposal is a guess only: it may be shorter than asked, or empty.
    """

    # Whether proposals come with the proposer's own distributions (a draft model sampling); otherwise
    # proposals are deterministic and verification treats them as one-hot (ngram, replay).
    has_draft_probs: bool = False

    @abstractmethod
    def propose(self, batch: "InputBatch", rows: np.ndarray, max_lens: np.ndarray) -> list[list[int]]:
        """At most max_lens[i] next tokens for each row rows[i] (0: propose nothing for it)."""

    def remove(self, row: int) -> None:
        """The request in `row` is gone (finished, aborted or preempted): forget what is kept for it."""

    def kv_bytes_per_block(self) -> int:
        """KV memory the proposer keeps per block of the shared block pool (a draft model's own K/V)."""
        return 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's KV memory for `num_blocks` blocks (the target's count and block ids)."""

    def describe(self) -> dict[str, Any]:
        """How the proposer runs, beyond the speculative config (for the runner's describe())."""
        return {}


def make_proposer(config: EngineConfig, runner: "ModelRunner") -> Proposer | None:
    spec = config.speculative_config
    if spec is None:
        return None
    if spec.method == "ngram":
        from carpool.spec_decode.ngram import NgramProposer

        assert spec.prompt_lookup_min is not None and spec.prompt_lookup_max is not None
        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    if spec.method == "replay":
        from carpool.spec_decode.replay import ReplayProposer

        assert spec.replay_path is not None and spec.acceptance_rate is not None
        return ReplayProposer.from_file(spec.replay_path, spec.acceptance_rate, config.model.vocab_size,
                                        seed=config.seed)
    if spec.method == "draft_model":
        from carpool.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(config, runner)
    raise ValueError(f"speculative_config.method: unknown {spec.method!r}")
