"""CUDA graphs for decode-only steps.

A decode step launches hundreds of small kernels; replaying a captured graph costs about a microsecond
per kernel instead of tens. Graphs are captured for a ladder of padded batch sizes up to max_num_seqs;
a step of B decodes replays the smallest graph >= B with its inputs copied into static buffers. Padded
rows attend over one token of block 0 and store nothing (slot -1), so they cannot disturb real rows.

Everything the captured kernels read must live in these static device buffers: no host values that
change between replays, no .item()/.tolist() inside. That includes the decode attention's work balance
for mixed context lengths: each graph fixes its grid split count at capture, and each replay uploads the
request order and keys per split planned from the step's host seq_lens (balanced_decode_plan).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from carpool.forward_batch import AttentionMetadata, ForwardBatch
from carpool.worker.input_batch import CASCADE_MIN_BATCH, StepInputs

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    sizes = sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})
    return sizes


class CUDAGraphRunner:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.batch_sizes[-1]
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.max_model_len = max_model_len
        max_blocks_per_req = -(-max_model_len // block_size)
        self.block_tables = torch.zeros(n, max_blocks_per_req, dtype=torch.int32, device=device)
        # Decode batches of at least CASCADE_MIN_BATCH get a second graph with cascade attention over a
        # shared prefix, whose length is read from this buffer at replay.
        self.prefix_len = torch.zeros(1, dtype=torch.int32, device=device)
        # Graphs exist with the Triton backend only (which is all that imports triton).
        from carpool.ops.triton.attention import decode_num_splits

        self.num_kv_heads = model.attention_layers()[0].num_kv_heads
        self.decode_splits = {bs: decode_num_splits(bs, self.num_kv_heads) for bs in self.batch_sizes}
        self.decode_order = torch.arange(n, dtype=torch.int32, device=device)
        self.decode_split_len = torch.ones(1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}

    def _batch(self, bs: int, cascade: bool = False) -> ForwardBatch:
        meta = AttentionMetadata(query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
                                 block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
                                 # the longest possible context: kernels size their plans for any replay
                                 max_query_len=1, max_seq_len=self.max_model_len,
                                 query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs)
        meta.extra.update(num_splits=self.decode_splits[bs], decode_order=self.decode_order[:bs],
                          decode_split_len=self.decode_split_len)
        if cascade:
            meta.extra["cascade_prefix_len"] = self.prefix_len
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
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.graphs),
                    self.batch_sizes[0], self.max_bs, time.perf_counter() - start)

    def can_run(self, inputs: StepInputs) -> bool:
        return bool(self.graphs) and inputs.max_query_len == 1 and len(inputs.rows) <= self.max_bs

    def run(self, inputs: StepInputs, fixup: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Replay the graph for this decode step; returns logits of the sampling rows."""
        b = len(inputs.rows)
        bs = next(s for s in self.batch_sizes if s >= b)
        self.input_ids[:b].copy_(torch.from_numpy(inputs.input_ids), non_blocking=True)
        self.positions[:b].copy_(torch.from_numpy(inputs.positions), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.from_numpy(inputs.slot_mapping), non_blocking=True)
        self.seq_lens[:b].copy_(torch.from_numpy(inputs.seq_lens), non_blocking=True)
        width = inputs.block_tables.shape[1]
        self.block_tables[:b, :width].copy_(torch.from_numpy(inputs.block_tables), non_blocking=True)
        if fixup is not None:  # tokens sampled by the previous step, still on the device
            self.input_ids.index_copy_(0, fixup[0], fixup[1])
        if bs > b:  # padded rows: one token of context in block 0, nothing stored
            self.slot_mapping[b:bs].fill_(-1)
            self.seq_lens[b:bs].fill_(1)
            self.block_tables[b:bs, 0].fill_(0)
        self._plan_decode(inputs.seq_lens, bs)
        cascade = inputs.cascade_prefix_len > 0 and (bs, True) in self.graphs
        if cascade:
            self.prefix_len.fill_(inputs.cascade_prefix_len)
        self.graphs[(bs, cascade)].replay()
        logits = self.logits[(bs, cascade)]
        if len(inputs.logits_indices) == b:
            return logits[:b]
        index = torch.from_numpy(inputs.logits_indices).to(logits.device, non_blocking=True)
        return logits.index_select(0, index)

    def _plan_decode(self, seq_lens: np.ndarray, bs: int) -> None:
        """Work balance of decode attention for this replay; padded rows (one key each) go last."""
        from carpool.ops.triton.attention import balanced_decode_plan

        plan = balanced_decode_plan(seq_lens, self.num_kv_heads, self.decode_splits[bs])
        order = np.concatenate([plan.order, np.arange(len(seq_lens), bs, dtype=np.int32)])
        self.decode_order[:bs].copy_(torch.from_numpy(order), non_blocking=True)
        self.decode_split_len.fill_(plan.split_len)
