"""The draft model's single-token steps of a proposal as ONE CUDA graph per batch size (a "chain").

After its catch-up, a draft proposal feeds each guess back for k - 1 single-token steps. Replayed one
decode graph at a time, each step paid its own host metadata (positions, slots, context lengths, block
tables), its own upload, a fix-up copy of the last guesses into the graph's input ids, and an argmax
outside the graph. Everything but the guesses is known before the first step: a row's step j (0-based)
computes the token at position p0 + j (p0 = its verified token count) over the same block table, so the
host prepares every step's metadata in one NumPy pass and one upload, and one graph records the k - 1
forwards with the argmax of each written where the next forward reads its input ids.

Static buffers (one StaticInputs): per step j, `positions.j`, `slot_mapping.j`, `seq_lens.j` and the
attention backend's own fields renamed `<name>.j` (its decode work plan, filled by prepare_replay from
step j's context lengths); the block tables last, shared by every step. `guesses` [k, max rows] is
outside it: row 0 holds the catch-up's guesses (copied in on the device before the replay) and is step
0's input; the graph writes step j's argmax into row j + 1, which is step j + 1's input. A replay returns
guesses[:, :b]: every guess of the proposal in one tensor, read by the host with one wait.

Invariants:
- Every row runs all k - 1 steps. A row that wants fewer guesses (k_i - 1 steps, its proposal shorter
  near max_tokens or its block table's end) is frozen after its last live step: its later steps repeat
  that step's position and context length with slot -1, so they store nothing and read only keys it
  holds (a row with no live step repeats its last verified position, which the catch-up stored). Their
  guesses are never read.
- Padded rows (b real rows in a graph of bs): position 0, one key of block 0, slot -1, as the decode
  graphs' padding; their input ids are valid ids left from earlier replays (guesses or zeros).
- A live step's slot comes from the row's block table, which the scheduler extended for the k lookahead
  slots (DraftModelProposer.propose caps k_i where the table ends), so no step writes outside the row.
- The graph reads only static buffers; guesses are written in place, so the result is valid until the
  next replay (the proposer reads it to the host before proposing again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from carpool.attention.backend import AttentionBackend, GraphBuffers
from carpool.forward_batch import ForwardBatch
from carpool.utils import cdiv
from carpool.worker.cuda_graph import graph_batch_sizes, graph_capture
from carpool.worker.staging import Field, StaticInputs

logger = logging.getLogger(__name__)


class DraftChainGraphs:
    def __init__(self, model: nn.Module, attention: AttentionBackend, max_num_seqs: int, num_steps: int,
                 max_model_len: int, block_size: int, device: torch.device,
                 begin_forward: Callable[[], None] = lambda: None) -> None:
        """Graphs of `num_steps` (k - 1 >= 1) chained single-token forwards for batches up to
        max_num_seqs (the decode graphs' ladder). `begin_forward`: the communicator's per-forward hook,
        called before each forward as an eager step would."""
        if num_steps < 1:
            raise ValueError(f"num_steps: single-token draft steps per proposal, >= 1, got {num_steps}")
        if not attention.supports_cuda_graphs:
            raise ValueError(f"attention backend {attention.name!r} does not support CUDA graphs")
        self.model = model
        self.attention = attention
        self.num_steps = num_steps
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.begin_forward = begin_forward
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = n = self.batch_sizes[-1]
        self.max_blocks_per_req = cdiv(max_model_len, block_size)
        self.backend_fields = attention.graph_fields(n)
        fields: list[Field] = []
        for j in range(num_steps):
            fields += [Field(f"positions.{j}", torch.long, (n,), 0), Field(f"slot_mapping.{j}", torch.long, (n,), -1),
                       Field(f"seq_lens.{j}", torch.int32, (n,), 1),
                       *(Field(f"{f.name}.{j}", f.dtype, f.shape, f.initial) for f in self.backend_fields)]
        fields.append(Field("packed_block_tables", torch.int32, (n * self.max_blocks_per_req,), 0))
        self.staged = StaticInputs(fields, device)
        self.block_tables = torch.zeros(n, self.max_blocks_per_req, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.prefix_len = torch.zeros(1, dtype=torch.int32, device=device)
        self.guesses = torch.zeros(num_steps + 1, n, dtype=torch.long, device=device)
        attention.configure_graphs(self.batch_sizes, model.attention_layers()[0].num_kv_heads)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Each graph's step batches, kept while the graph lives (their metadata is what it reads).
        self.batches: dict[int, list[ForwardBatch]] = {}

    def _batches(self, bs: int) -> list[ForwardBatch]:
        t = self.staged.tensors
        out = []
        for j in range(self.num_steps):
            buffers = GraphBuffers(self.query_start_loc, t[f"seq_lens.{j}"], self.block_tables,
                                   t[f"slot_mapping.{j}"], {f.name: t[f"{f.name}.{j}"] for f in self.backend_fields},
                                   self.prefix_len)
            meta = self.attention.graph_metadata(bs, buffers, False, self.max_model_len)
            out.append(ForwardBatch(input_ids=self.guesses[j, :bs], positions=t[f"positions.{j}"][:bs], attn=meta))
        return out

    def _record(self, bs: int) -> None:
        """What a graph records: each step's forward over guesses[j] writing its argmax to guesses[j + 1]."""
        for j, batch in enumerate(self.batches[bs]):
            self.begin_forward()
            logits = self.model.compute_logits(self.model(batch.input_ids, batch.positions, batch))
            self.guesses[j + 1, :bs].copy_(logits.argmax(dim=-1))

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        with graph_capture() as (pool, stream):
            for bs in reversed(self.batch_sizes):  # largest first: smaller graphs reuse its pool
                self.batches[bs] = self._batches(bs)
                for _ in range(2):  # warm-up: compiles and plans outside the capture
                    self._record(bs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._record(bs)
                self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured %d draft chain graphs of %d steps in %.1f s", len(self.graphs),
                                         self.num_steps, time.perf_counter() - start)

    def fits(self, num_rows: int) -> bool:
        return 0 < num_rows <= self.max_bs and bool(self.graphs)

    def run(self, block_table: np.ndarray, first_position: np.ndarray, live_steps: np.ndarray,
            first_guesses: torch.Tensor) -> torch.Tensor:
        """Replay the chain for b rows: block_table [b, >= the columns their positions need] (int32),
        first_position[i] the position of row i's step 0 (its verified token count), live_steps[i] in
        0 .. num_steps the steps whose guesses it wants, first_guesses [b] on the device (the catch-up's).
        Returns [num_steps + 1, b] on the device: row 0 the first guesses, row j + 1 step j's guesses."""
        b = len(first_position)
        bs = self.batch_sizes[int(np.searchsorted(self.batch_sizes, b))]
        steps = np.arange(self.num_steps)
        # [b, num_steps]: live steps at p0 + j; a frozen step repeats the row's last live position
        positions = first_position[:, None] + np.minimum(steps[None, :], live_steps[:, None] - 1)
        live = steps[None, :] < live_steps[:, None]
        bsz = self.block_size
        blocks = np.take_along_axis(block_table, positions // bsz, axis=1).astype(np.int64)
        slots = np.where(live, blocks * bsz + positions % bsz, -1)
        seq_lens = (positions + 1).astype(np.int32)
        host = self.staged.host()  # (holds what was written two replays ago: write every value read)
        for j in range(self.num_steps):
            host[f"positions.{j}"][:b] = positions[:, j]
            host[f"slot_mapping.{j}"][:b] = slots[:, j]
            host[f"seq_lens.{j}"][:b] = seq_lens[:, j]
            host[f"positions.{j}"][b:bs] = 0
            host[f"slot_mapping.{j}"][b:bs] = -1
            host[f"seq_lens.{j}"][b:bs] = 1
            step_fields = {f.name: host[f"{f.name}.{j}"] for f in self.backend_fields}
            self.attention.prepare_replay(step_fields, seq_lens[:, j], bs)
        width = max(1, min(int(positions.max()) // bsz + 1, block_table.shape[1]))
        tables = host["packed_block_tables"][:bs * width].reshape(bs, width)
        tables[:b] = block_table[:, :width]
        tables[b:] = 0
        self.staged.upload(self.staged.end_of("packed_block_tables", bs * width))
        packed = self.staged.tensors["packed_block_tables"][:bs * width].view(bs, width)
        self.block_tables[:bs, :width].copy_(packed)
        self.guesses[0, :b].copy_(first_guesses)
        self.graphs[bs].replay()
        return self.guesses[:, :b]

