"""N-gram prompt lookup: a request that repeats or edits text already in its context (code, documents,
quotes) often continues as it did before. Plain numpy on the host; no model, no device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from carpool.spec_decode.proposer import Proposer

if TYPE_CHECKING:
    from carpool.worker.input_batch import InputBatch


def ngram_propose(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The k tokens that followed the longest suffix n-gram of `tokens` (max_n >= n >= min_n) seen earlier.

    Among earlier occurrences of the longest matching suffix, the most recent wins (recent context is
    what a request is most likely repeating). Fewer than k tokens come back when the match sits near the
    end; none when no suffix of min_n tokens occurs earlier.

    One pass per suffix length m: `alive[j]` says the tokens ending at j match the last m tokens, so a
    candidate's match length is how long it stays alive (O(len * max_n), vectorized).
    """
    length = len(tokens)
    max_n = min(max_n, length - 1)
    if k < 1 or max_n < min_n:
        return tokens[:0]
    # Candidate n-grams end at j = 0 .. length - 2 (each has at least one following token).
    ends = np.arange(length - 1)
    match = np.zeros(length - 1, dtype=np.int64)
    alive = np.ones(length - 1, dtype=bool)
    for m in range(max_n):
        idx = ends - m
        alive &= idx >= 0
        alive &= tokens[np.maximum(idx, 0)] == tokens[length - 1 - m]
        if not alive.any():
            break
        match += alive
    best = int(match.max())
    if best < min_n:
        return tokens[:0]
    j = int(length - 2 - np.argmax(match[::-1] == best))  # the latest end with the longest match
    return tokens[j + 1:j + 1 + k]


class NgramProposer(Proposer):
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, batch: "InputBatch", rows: np.ndarray, max_lens: np.ndarray) -> list[list[int]]:
        out: list[list[int]] = []
        for row, k in zip(rows.tolist(), max_lens.tolist()):
            tokens = batch.token_ids[row, :batch.num_tokens[row]]
            out.append(ngram_propose(tokens, self.min_n, self.max_n, k).tolist() if k > 0 else [])
        return out
