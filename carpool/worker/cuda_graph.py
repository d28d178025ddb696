"""CUDA graphs for decode-only steps.

A decode step launches hundreds of small kernels; replaying a captured graph costs about a microsecond
per kernel instead of tens. Graphs are captured for a ladder of padded batch sizes up to max_num_seqs;
a step of B decodes replays the smallest graph >= B with its inputs copied into static buffers. Padded
rows attend over one token of block 0 and store nothing (slot -1), so they cannot disturb real rows.

Everything the captured kernels read must live in these static device buffers: no host values that
change between replays, no .item()/.tolist() inside. What attention needs beyond the common inputs (the
Triton backend's decode work balance, planned per replay from the host seq_lens) the attention backend
declares (`graph_fields`) and fills (`prepare_replay`); this runner knows no attention kernel.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from carpool.attention.backend import AttentionBackend, GraphBuffers
from carpool.forward_batch import ForwardBatch
from carpool.platform import to_device
from carpool.utils import cdiv
from carpool.worker.input_batch import CASCADE_MIN_BATCH, PendingFixup, StepInputs
from carpool.worker.staging import Field, StaticInputs

# Steps through pinned memory by kernels (ops/triton/host_io) for at most this many rows only: a kernel
# reads pinned memory with far fewer requests in flight than the copy engine, so large steps (batch 256
# uploads ~100 KB of block tables) are slower by kernel, where batch-1 steps gain (EXPERIMENTS.md).
HOST_IO_MAX_ROWS = 8
HOST_IO_MAX_TABLE_WORDS = 4096  # (and block tables of at most 16 KB: the reads' cost grows with bytes)

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class CUDAGraphRunner:
    def __init__(self, model: nn.Module, attention: AttentionBackend, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device, kernel_io: bool = False) -> None:
        if not attention.supports_cuda_graphs:
            raise ValueError(f"attention backend {attention.name!r} does not support CUDA graphs")
        self.model = model
        self.attention = attention
        # Small replays' inputs read from pinned memory by one kernel (ops/triton/host_io.stage_inputs)
        # instead of the copy engine's upload, device-to-device copy of the tables and index_copy_ of the
        # fix-up (graphs of at most HOST_IO_MAX_ROWS rows).
        self.kernel_io = kernel_io
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.batch_sizes[-1]
        n = self.max_bs
        self.max_model_len = max_model_len
        max_blocks_per_req = cdiv(max_model_len, block_size)
        # Every input a replay changes, in one device buffer that one copy from pinned memory refills
        # (staging.StaticInputs). Block tables go last and packed ([rows, the step's width] instead of
        # [max_num_seqs, max blocks per request]: 2.6 MB at 256 x 40k tokens), so a replay copies only
        # what it uses, and one device copy spreads them into the tables the graphs read. Small replays
        # do all of it, and the fix-up, with one kernel that reads the pinned memory (kernel_io). Decode batches
        # of at least CASCADE_MIN_BATCH get a second graph with cascade attention over a shared prefix,
        # whose length is read from prefix_len at replay.
        self.staged = StaticInputs([
            Field("input_ids", torch.long, (n,), 0), Field("positions", torch.long, (n,), 0),
            Field("slot_mapping", torch.long, (n,), -1), Field("seq_lens", torch.int32, (n,), 1),
            *(backend_fields := attention.graph_fields(n)), Field("prefix_len", torch.int32, (1,), 0),
            Field("fixup_index", torch.long, (n,), 0), Field("fixup_source", torch.int32, (n,), -1),
            Field("packed_block_tables", torch.int32, (n * max_blocks_per_req,), 0)], device)
        t = self.staged.tensors
        self.input_ids, self.positions, self.slot_mapping = t["input_ids"], t["positions"], t["slot_mapping"]
        self.seq_lens, self.prefix_len = t["seq_lens"], t["prefix_len"]
        self.block_tables = torch.zeros(n, max_blocks_per_req, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # never changes
        self.buffers = GraphBuffers(self.query_start_loc, self.seq_lens, self.block_tables, self.slot_mapping,
                                    {f.name: t[f.name] for f in backend_fields}, self.prefix_len)
        attention.configure_graphs(self.batch_sizes, model.attention_layers()[0].num_kv_heads)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}

    def _batch(self, bs: int, cascade: bool = False) -> ForwardBatch:
        meta = self.attention.graph_metadata(bs, self.buffers, cascade, self.max_model_len)
        return ForwardBatch(input_ids=self.input_ids[:bs], positions=self.positions[:bs], attn=meta)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):  # largest first: smaller graphs reuse its pool
                for cascade in ((False, True) if bs >= CASCADE_MIN_BATCH else (False,)):
                    batch = self._batch(bs, cascade)
                    for _ in range(2):  # warm up: Triton compiles outside the capture
                        self.model.compute_logits(self.model(batch.input_ids, batch.positions, batch))
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        hidden = self.model(batch.input_ids, batch.positions, batch)
                        self.logits[(bs, cascade)] = self.model.compute_logits(hidden)
                    self.graphs[(bs, cascade)] = graph
        torch.cuda.current_stream().wait_stream(stream)
        if self.kernel_io:
            self._compile_host_io()
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.graphs),
                    self.batch_sizes[0], self.max_bs, time.perf_counter() - start)

    def can_run(self, inputs: StepInputs) -> bool:
        return bool(self.graphs) and inputs.max_query_len == 1 and len(inputs.rows) <= self.max_bs

    def run(self, inputs: StepInputs, fixup: PendingFixup | None = None) -> torch.Tensor:
        """Replay the graph for this decode step; returns logits of the sampling rows."""
        b = len(inputs.rows)
        bs = next(s for s in self.batch_sizes if s >= b)
        host = self.staged.host()  # (holds what was written two replays ago: write every row read)
        host["input_ids"][:b] = inputs.input_ids
        host["positions"][:b] = inputs.positions
        host["slot_mapping"][:b] = inputs.slot_mapping
        host["seq_lens"][:b] = inputs.seq_lens
        width = max(1, inputs.block_tables.shape[1])
        tables = host["packed_block_tables"][:bs * width].reshape(bs, width)
        tables[:b, :inputs.block_tables.shape[1]] = inputs.block_tables
        if bs > b:  # padded rows: one token of context in block 0, nothing stored
            host["slot_mapping"][b:bs] = -1
            host["seq_lens"][b:bs] = 1
            tables[b:bs, 0] = 0
        self.attention.prepare_replay(host, inputs.seq_lens, bs)
        cascade = inputs.cascade_prefix_len > 0 and (bs, True) in self.graphs
        if cascade:
            host["prefix_len"][0] = inputs.cascade_prefix_len
        if self.kernel_io and bs <= HOST_IO_MAX_ROWS and bs * width <= HOST_IO_MAX_TABLE_WORDS:
            self._stage_by_kernel(host, fixup, bs, width)
        else:
            if fixup is not None:  # where the tokens sampled by the previous step go: in the same upload
                host["fixup_index"][:len(fixup.index)] = fixup.index
            self.staged.upload(self.staged.end_of("packed_block_tables", bs * width))
            packed = self.staged.tensors["packed_block_tables"][:bs * width].view(bs, width)
            self.block_tables[:bs, :width].copy_(packed)
            if fixup is not None:  # tokens sampled by the previous step, still on the device
                self.input_ids.index_copy_(0, self.staged.tensors["fixup_index"][:len(fixup.index)],
                                           fixup.values)
        self.graphs[(bs, cascade)].replay()
        logits = self.logits[(bs, cascade)]
        if len(inputs.logits_indices) == b:
            return logits[:b]
        return logits.index_select(0, to_device(inputs.logits_indices, logits.device))

    def _compile_host_io(self) -> None:
        """Launch the host_io kernels once (all their variants) so that they compile at start-up, not at
        the first small step. They rewrite the static inputs with the mirror's values, which the next
        replay rewrites again."""
        from carpool.ops.triton.host_io import copy_to_host

        for fixup in (None, PendingFixup(np.zeros(1, dtype=np.int64), self.input_ids[:1].clone())):
            self._stage_by_kernel(self.staged.host(), fixup, 1, 1)
        copy_to_host(self.input_ids[:1], torch.empty(1, dtype=torch.long, pin_memory=self.input_ids.is_cuda))

    def _stage_by_kernel(self, host: dict[str, np.ndarray], fixup: PendingFixup | None, bs: int, width: int
                         ) -> None:
        """The replay's inputs, read from the pinned mirror by one kernel (see kernel_io)."""
        from carpool.ops.triton.host_io import stage_inputs

        staged = self.staged
        source = None
        if fixup is not None:  # input row -> index of its token among the previous step's sampled ones
            host["fixup_source"][:bs] = -1
            host["fixup_source"][fixup.index] = np.arange(len(fixup.index), dtype=np.int32)
            source = staged.host_tensor("fixup_source")[:bs]
        tables = staged.host_tensor("packed_block_tables")[:bs * width].view(bs, width)
        # (words: every field after input_ids up to the fix-up's own, positions .. prefix_len)
        stage_inputs(staged.host_tensor("input_ids")[:bs], self.input_ids[:bs], source,
                     None if fixup is None else fixup.values, staged.host_words(), staged.device_words(),
                     staged.word_offset("positions"), staged.word_offset("fixup_index"), tables,
                     self.block_tables)
        staged.uploaded()
