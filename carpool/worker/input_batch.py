"""InputBatch: the runner's per-request state in preallocated arrays, one row per live request.

Building a step's inputs is then a handful of vectorized numpy gathers instead of a Python loop over
tokens; at batch 256 that is the difference between host time hiding under the GPU step and dominating
it. Rows are recycled as requests finish; a request's row never moves while it lives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from carpool.core.sched_output import CachedRequestData, NewRequestData
from carpool.forward_batch import CASCADE_ALIGN
from carpool.sampling_params import SamplingParams
from carpool.utils import cdiv


@dataclass
class StepInputs:
    """Host-side arrays of one packed step (numpy), before they are copied to the device."""

    rows: np.ndarray  # [B] row of each scheduled request, in batch order
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32
    block_tables: np.ndarray  # [B, max_blocks] int32
    sample_rows: np.ndarray  # rows that sample a token this step
    logits_indices: np.ndarray  # [num_sample] index into T of each sampling request's last token
    max_query_len: int
    max_seq_len: int
    pending_token_index: np.ndarray  # packed index of each token whose value comes from the device
    pending_rows: np.ndarray  # the row each of those tokens belongs to
    # Keys every request of a decode-only step shares through the same blocks (cascade attention); 0 = none.
    cascade_prefix_len: int = 0
    # Speculative decoding: proposed tokens each sampling row verifies (None: no row verifies any). A row
    # with d of them owns d + 1 consecutive logits_indices: its last known token's, then each proposed one's.
    num_drafts: np.ndarray | None = None


@dataclass(frozen=True)
class PendingFixup:
    """Tokens of a step's input that the previous step sampled and the host has not seen yet."""
    index: np.ndarray  # int64: packed input positions to overwrite (host: it rides in the step's upload)
    values: torch.Tensor  # the sampled token ids, on the device, one per index


CASCADE_MIN_BATCH = 16  # fewer decodes gain little from reading a shared prefix once
CASCADE_MIN_PREFIX = 256  # tokens; a shorter shared prefix is not worth the extra kernels


def shared_prefix_len(block_tables: np.ndarray, num_blocks: np.ndarray, seq_lens: np.ndarray,
                      block_size: int) -> int:
    """Leading keys that every request of a decode step reads from the very same blocks (prefix-cache
    hits), rounded down to whole cascade tiles and kept before every request's new token."""
    same = (block_tables == block_tables[0]).all(axis=0)
    common = len(same) if same.all() else int(same.argmin())
    common = min(common, int(num_blocks.min()))  # zero padding past a table's end is not sharing
    length = min(common * block_size, int(seq_lens.min()) - 1) // CASCADE_ALIGN * CASCADE_ALIGN
    return length if length >= CASCADE_MIN_PREFIX else 0


def packed_ranges(start: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """start[i] .. start[i] + counts[i] - 1 for each i, packed one after the other (int64)."""
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(start.astype(np.int64, copy=False), counts) + offsets


def spread_logits_indices(last_indices: np.ndarray, num_drafts: np.ndarray) -> np.ndarray:
    """Logit rows of a verification step: a request whose last scheduled token is at packed index e and
    which verifies d proposed tokens needs the logits at e - d .. e."""
    return packed_ranges(last_indices - num_drafts, num_drafts + 1)


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_blocks_per_req = cdiv(max_model_len, block_size)
        self.token_ids = np.zeros((max_num_reqs, max_model_len + 1), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        # Tokens sampled by launched steps whose values have not reached the host yet (async scheduling).
        self.num_pending = np.zeros(max_num_reqs, dtype=np.int64)
        # Proposed tokens scheduled for verification this step, stored after the known ones in token_ids.
        self.num_drafts = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, self.max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.params: list[SamplingParams | None] = [None] * max_num_reqs
        self.generators: dict[int, torch.Generator] = {}
        self.req_ids: list[str | None] = [None] * max_num_reqs
        self.req_to_row: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.req_to_row)

    def add(self, new: NewRequestData, generator: torch.Generator | None) -> int:
        if not self._free_rows:
            raise RuntimeError(f"more than max_num_seqs={self.max_num_reqs} live requests in the runner")
        row = self._free_rows.pop()
        tokens = list(new.prompt_token_ids) + list(new.output_token_ids)
        n = len(tokens)
        self.token_ids[row, :n] = tokens
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = len(new.prompt_token_ids)
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_pending[row] = 0
        self.num_drafts[row] = 0
        self.num_blocks[row] = 0
        self._append_blocks(row, new.block_ids)
        self.params[row] = new.sampling_params
        self.req_ids[row] = new.req_id
        if generator is not None:
            self.generators[row] = generator
        self.req_to_row[new.req_id] = row
        return row

    def update(self, cached: CachedRequestData) -> None:
        row = self.req_to_row[cached.req_id]
        assert self.num_computed_tokens[row] == cached.num_computed_tokens, (
            f"{cached.req_id}: runner at {self.num_computed_tokens[row]}, "
            f"scheduler at {cached.num_computed_tokens}")
        if cached.num_blocks_kept is not None:
            assert cached.num_blocks_kept <= self.num_blocks[row]
            self.num_blocks[row] = cached.num_blocks_kept
        if cached.new_block_ids:
            self._append_blocks(row, cached.new_block_ids)

    def set_drafts(self, req_id: str, draft_token_ids: list[int]) -> None:
        """Proposed tokens to verify this step: written after the request's known tokens (where the
        step's input ids are gathered from) until the step's tokens arrive."""
        row = self.req_to_row[req_id]
        assert not self.num_pending[row], "a request with a step in flight does not verify proposals"
        start = int(self.num_tokens[row])
        self.token_ids[row, start:start + len(draft_token_ids)] = draft_token_ids
        self.num_drafts[row] = len(draft_token_ids)

    def _append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        self.block_table[row, start:start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def remove(self, req_id: str) -> None:
        row = self.req_to_row.pop(req_id, None)
        if row is None:
            return
        self.params[row] = None
        self.req_ids[row] = None
        self.generators.pop(row, None)
        self._free_rows.append(row)

    def prepare(self, req_ids: list[str], counts: list[int]) -> StepInputs:
        """Gather the packed inputs of one step: request i computes counts[i] tokens starting at its
        num_computed_tokens."""
        rows = np.fromiter((self.req_to_row[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        n = np.asarray(counts, dtype=np.int64)
        qsl = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(n, out=qsl[1:])
        total = int(qsl[-1])
        start = self.num_computed_tokens[rows]
        token_row = np.repeat(rows, n)
        # position of each packed token = its request's start + its offset inside the request's chunk
        positions = np.repeat(start - qsl[:-1], n) + np.arange(total, dtype=np.int64)
        input_ids = self.token_ids[token_row, positions]
        bs = self.block_size
        slots = self.block_table[token_row, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = start + n
        # Width rounded up to 16 columns: kernels see a block-table stride that is always a multiple of 16,
        # so Triton compiles one variant instead of one per alignment class of the step's longest request.
        max_blocks = min(cdiv(int(self.num_blocks[rows].max()), 16) * 16, self.max_blocks_per_req)
        drafts = self.num_drafts[rows]
        sampling = seq_lens == self.num_tokens[rows] + self.num_pending[rows] + drafts
        logits_indices = qsl[1:][sampling] - 1
        num_drafts = None
        if drafts.any():
            num_drafts = drafts[sampling]
            logits_indices = spread_logits_indices(logits_indices, num_drafts)
        # Tokens whose value is still on the device (sampled by the step in flight): a running request
        # decodes exactly one such token, the first of its chunk.
        pending = positions[qsl[:-1]] >= self.num_tokens[rows]
        cascade = 0
        if total == len(rows) and len(rows) >= CASCADE_MIN_BATCH:
            cascade = shared_prefix_len(self.block_table[rows, :max_blocks], self.num_blocks[rows], seq_lens, bs)
        return StepInputs(rows=rows, input_ids=input_ids, positions=positions, slot_mapping=slots,
                          query_start_loc=qsl.astype(np.int32), seq_lens=seq_lens.astype(np.int32),
                          block_tables=self.block_table[rows, :max_blocks], sample_rows=rows[sampling],
                          logits_indices=logits_indices, max_query_len=int(n.max()),
                          max_seq_len=int(seq_lens.max()), pending_token_index=qsl[:-1][pending],
                          pending_rows=rows[pending], cascade_prefix_len=cascade, num_drafts=num_drafts)

    def launched(self, rows: np.ndarray, counts: list[int], sample_rows: np.ndarray) -> None:
        """A step was launched: progress counters move on; its sampled tokens are pending."""
        self.num_computed_tokens[rows] += np.asarray(counts, dtype=np.int64)
        self.num_pending[sample_rows] += 1

    def append_sampled(self, rows: np.ndarray, sampled: list[int]) -> None:
        """Sampled token values reached the host."""
        if len(rows):
            self.token_ids[rows, self.num_tokens[rows]] = sampled
            self.num_tokens[rows] += 1
            self.num_pending[rows] -= 1

    def append_verified(self, rows: np.ndarray, token_ids: list[list[int]]) -> None:
        """A verification's tokens reached the host: each row emitted its accepted proposed tokens and one
        of the target's (1 to num_drafts + 1 tokens); its counter moves back past the rejected ones."""
        for row, tokens in zip(rows.tolist(), token_ids):
            start = int(self.num_tokens[row])
            self.token_ids[row, start:start + len(tokens)] = tokens
            self.num_tokens[row] = start + len(tokens)
            self.num_pending[row] -= 1
            self.num_computed_tokens[row] -= self.num_drafts[row] + 1 - len(tokens)
            self.num_drafts[row] = 0

    def output_token_ids(self, row: int) -> list[int]:
        return self.token_ids[row, self.num_prompt_tokens[row]:self.num_tokens[row]].tolist()

    def prompt_token_ids(self, row: int) -> list[int]:
        return self.token_ids[row, :self.num_prompt_tokens[row]].tolist()
