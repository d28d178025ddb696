"""Packed sequences from a token file: fixed length, shuffled by seed, sharded across ranks, resumable.

The token stream (documents already joined as `<s> text </s>`) is cut into consecutive, non-overlapping
chunks of `seq_len + 1` tokens; chunk c gives inputs = chunk[:-1] and labels = chunk[1:]. Every token of
the file is in exactly one chunk; the last, short chunk is filled with pad ids whose labels are
IGNORE_INDEX, so no token is dropped.

Order: an infinite stream of global positions g = 0, 1, 2, ...; position g is chunk
`perm(epoch)[g % C]` with epoch = g // C and perm a permutation seeded by (seed, epoch). Rank r of W
takes positions r, r + W, r + 2W, ..., batch_size at a time. So within an epoch the ranks together see
every chunk exactly once, every rank always has a full batch (no rank waits on another at an epoch's
end), and the whole loader state is one number: the count of global positions consumed. That number
means the same thing for any world size, so a run can resume on a different number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor        # [B, T] int64
    labels: torch.Tensor           # [B, T] int64; IGNORE_INDEX where nothing is to be predicted
    global_positions: np.ndarray   # [B] position of each row in the global stream (-1: padding row)

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class PackedSequences:
    """The chunking of a token array into `seq_len + 1` windows (pure indexing, no order)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, pad_id: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
        if len(tokens) < 2:
            raise ValueError(f"data: {len(tokens)} tokens cannot make one (input, label) pair")
        self.tokens = tokens
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.num_sequences = -(-len(tokens) // (seq_len + 1))

    def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of chunk `index`, int64, each of length seq_len."""
        start = index * (self.seq_len + 1)
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        n = len(window)
        if n < self.seq_len + 1:  # the tail: pad inputs, ignore their labels
            padded = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
            padded[:n] = window
            labels = padded[1:].copy()
            labels[n - 1:] = IGNORE_INDEX
            return padded[:-1], labels
        return window[:-1], window[1:]


class PackedLoader:
    """Training batches for one rank (see the module docstring for the order)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, pad_id: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        self.sequences = PackedSequences(tokens, seq_len, pad_id)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_position = 0  # positions consumed by all ranks together; always a multiple of B * W
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def num_sequences(self) -> int:
        return self.sequences.num_sequences

    @property
    def epoch(self) -> float:
        return self.global_position / self.num_sequences

    def _chunk_at(self, g: int) -> int:
        epoch, offset = divmod(g, self.num_sequences)
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perm = rng.permutation(self.num_sequences)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def next_batch(self) -> Batch:
        positions = self.global_position + self.rank + self.world_size * np.arange(self.batch_size)
        rows = [self.sequences.chunk(self._chunk_at(int(g))) for g in positions]
        self.global_position += self.batch_size * self.world_size
        return Batch(torch.from_numpy(np.stack([r[0] for r in rows])),
                     torch.from_numpy(np.stack([r[1] for r in rows])), positions)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"global_position": self.global_position, "seed": self.seed,
                "seq_len": self.sequences.seq_len, "num_tokens": len(self.sequences.tokens),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the recorded position. The seed, sequence length and data must be the ones recorded
        (otherwise the position means different tokens); batch size and world size may change only if
        the position stays aligned to the new global batch."""
        for key, ours in (("seed", self.seed), ("seq_len", self.sequences.seq_len),
                          ("num_tokens", len(self.sequences.tokens))):
            if int(state[key]) != ours:
                raise ValueError(f"data state: recorded {key}={state[key]} but this run has {key}={ours}")
        position = int(state["global_position"])
        if position % (self.batch_size * self.world_size):
            raise ValueError(f"data state: position {position} is not a multiple of the global micro-batch "
                             f"{self.batch_size} x {self.world_size}")
        self.global_position = position


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 pad_id: int = 0, max_sequences: int | None = None) -> Iterator[Batch]:
    """Held-out batches in file order, the first `max_sequences` chunks (all by default) split across
    ranks. Every rank yields the same number of batches (rows past the end are all-ignored padding),
    because a sharded model's forward is a collective that all ranks must enter."""
    seqs = PackedSequences(tokens, seq_len, pad_id)
    total = seqs.num_sequences if max_sequences is None else min(max_sequences, seqs.num_sequences)
    per_rank = -(-total // world_size)
    empty = (np.full(seq_len, pad_id, dtype=np.int64), np.full(seq_len, IGNORE_INDEX, dtype=np.int64))
    for start in range(0, per_rank, batch_size):
        positions = [rank + world_size * i for i in range(start, min(start + batch_size, per_rank))]
        rows = [seqs.chunk(g) if g < total else empty for g in positions]
        yield Batch(torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows])),
                    np.asarray([g if g < total else -1 for g in positions]))
