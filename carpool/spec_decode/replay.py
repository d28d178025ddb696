"""Replay proposer (benchmarks): proposes the target's own recorded greedy continuation, each token
kept with probability `acceptance_rate` and otherwise replaced by a token greedy verification rejects.

It measures the mechanics of speculation (verification cost, bookkeeping, scheduling) against a known
per-token acceptance probability, independent of any proposer's quality. Under greedy sampling the
target's output equals the recording, so a kept token is always accepted and a replaced one never.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from carpool.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from carpool.worker.input_batch import InputBatch


class ReplayProposer(Proposer):
    def __init__(self, recordings: dict[tuple[int, ...], list[int]], acceptance_rate: float, vocab_size: int,
                 seed: int = 0) -> None:
        self.recordings = recordings
        self.acceptance_rate = acceptance_rate
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def from_file(path: str, acceptance_rate: float, vocab_size: int, seed: int = 0) -> "ReplayProposer":
        """`path`: JSON {"prompt_token_ids": [[...], ...], "output_token_ids": [[...], ...]}."""
        with open(path) as f:
            data = json.load(f)
        recordings = {tuple(p): list(o) for p, o in zip(data["prompt_token_ids"], data["output_token_ids"])}
        return ReplayProposer(recordings, acceptance_rate, vocab_size, seed)

    def propose(self, batch: "InputBatch", rows: np.ndarray, max_lens: np.ndarray) -> list[list[int]]:
        out: list[list[int]] = []
        for row, k in zip(rows.tolist(), max_lens.tolist()):
            recorded = self.recordings.get(tuple(batch.prompt_token_ids(row))) if k > 0 else None
            if recorded is None:
                out.append([])
                continue
            num_out = int(batch.num_tokens[row] - batch.num_prompt_tokens[row])
            # Off the recording (sampled, or another model): no guess. The last token tells, cheaply.
            if num_out > len(recorded) or (num_out and batch.token_ids[row, batch.num_tokens[row] - 1]
                                           != recorded[num_out - 1]):
                out.append([])
                continue
            guess = np.asarray(recorded[num_out:num_out + k], dtype=np.int64)
            wrong = self.rng.random(len(guess)) >= self.acceptance_rate
            guess[wrong] = (guess[wrong] + 1) % self.vocab_size
            out.append(guess.tolist())
        return out
