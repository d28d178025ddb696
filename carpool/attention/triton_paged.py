"""Paged attention with the Triton kernels: the GPU backend, with CUDA-graph capture of decode steps
and of uniform verification steps (W query tokens per request).

A captured decode graph fixes the decode kernel's split count (it shapes the grid); each replay uploads
the work balance planned from the step's host seq_lens (balanced_decode_plan) into the backend's static
fields, and the cascade's shared-prefix length when the step has one. A verification graph runs the
prefill kernel alone, over a tile map that depends only on the fixed query lengths.

Short queries as decode rows (KernelConfig.short_query_decode): a step whose longest query has 2 ..
SHORT_QUERY_MAX tokens (a verification, a draft's catch-up) may instead run attention as split-K decode
with one row per query token (`as_decode_rows`): the token at position p reads keys 0 .. p of its
request's table, which is causal attention exactly (the step's K/V are stored before attention reads
them). Why: the prefill kernel gives each (query tile, head) one program that walks the whole context,
about 28 us a layer for 2-5 queries over 600 keys on an H100, where decode splits the keys over programs
(a few us). The graph runner captures such verification graphs over bs * W decode rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from carpool.attention.backend import GraphBuffers
from carpool.attention.paged import PagedAttentionBackend
from carpool.forward_batch import TritonAttentionMetadata
from carpool.platform import to_device
from carpool.worker.input_batch import StepInputs
from carpool.worker.staging import Field

SHORT_QUERY_MAX = 16  # the longest query (tokens per request) that short_query_decode runs as decode rows


def as_decode_rows(inputs: StepInputs) -> StepInputs:
    """The step's attention inputs with one decode row per query token: row t is token t's own request
    of one query, context positions[t] + 1, its request's block table; tokens, slots and positions are
    unchanged (so is everything but attention)."""
    widths = np.diff(inputs.query_start_loc)
    num_tokens = len(inputs.positions)
    return dataclasses.replace(
        inputs, query_start_loc=np.arange(num_tokens + 1, dtype=np.int32),
        seq_lens=(inputs.positions + 1).astype(np.int32),
        block_tables=np.repeat(inputs.block_tables, widths, axis=0), max_query_len=1)


class TritonAttentionBackend(PagedAttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, short_query_decode: bool = False) -> None:
        from carpool.ops import triton as tri

        self.rope_and_store_kv = tri.rope_and_store_kv
        self.paged_attention = tri.paged_attention
        self.short_query_decode = short_query_decode
        self._num_kv_heads = 0
        self._decode_splits: dict[int, int] = {}

    def decode_rows(self, query_len: int) -> bool:
        """Whether a step whose longest query has query_len tokens runs attention as decode rows."""
        return self.short_query_decode and 1 < query_len <= SHORT_QUERY_MAX

    def build_metadata(self, inputs: StepInputs, device: torch.device) -> TritonAttentionMetadata:
        if self.decode_rows(inputs.max_query_len):
            inputs = as_decode_rows(inputs)
        meta = TritonAttentionMetadata(**self._metadata_fields(inputs, device))
        if inputs.cascade_prefix_len:
            meta.cascade_prefix_len = to_device(np.array([inputs.cascade_prefix_len], dtype=np.int32), device)
        return meta

    # ---- CUDA graphs --------------------------------------------------------------------------------
    def graph_fields(self, max_batch_size: int) -> list[Field]:
        n = max_batch_size
        return [Field("decode_order", torch.int32, (n,), np.arange(n, dtype=np.int32)),
                Field("decode_split_len", torch.int32, (1,), 1)]

    def configure_graphs(self, batch_sizes: list[int], num_kv_heads: int) -> None:
        """Each graph's split count, fixed at capture for its batch size (rows). Several graph sets of one
        model (a draft's catch-up graphs and its chain) add their sizes: the split count of a size is a
        function of it, the same for every set."""
        from carpool.ops.triton.attention import decode_num_splits

        self._num_kv_heads = num_kv_heads
        self._decode_splits.update({bs: decode_num_splits(bs, num_kv_heads) for bs in batch_sizes})

    def graph_metadata(self, batch_size: int, buffers: GraphBuffers, cascade: bool, max_model_len: int,
                       query_len: int = 1) -> TritonAttentionMetadata:
        bs = batch_size
        if query_len > 1:
            # A verification: every request has query_len queries, so no request goes to the decode
            # kernel and the prefill kernel covers all. Its tile map is planned from the host lists, which
            # fix the query lengths (the graph's) and stand in for the context lengths: equal, so the map
            # is in batch order, right for every replay (the kernel reads the real lengths on the device).
            return TritonAttentionMetadata(
                query_start_loc=buffers.query_start_loc[:bs + 1], seq_lens=buffers.seq_lens[:bs],
                block_tables=buffers.block_tables[:bs], slot_mapping=buffers.slot_mapping[:bs * query_len],
                max_query_len=query_len, max_seq_len=max_model_len,
                query_start_loc_cpu=[i * query_len for i in range(bs + 1)], seq_lens_cpu=[query_len] * bs)
        return TritonAttentionMetadata(
            query_start_loc=buffers.query_start_loc[:bs + 1], seq_lens=buffers.seq_lens[:bs],
            block_tables=buffers.block_tables[:bs], slot_mapping=buffers.slot_mapping[:bs],
            # the longest possible context: kernels size their plans for any replay
            max_query_len=1, max_seq_len=max_model_len,
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs,
            num_splits=self._decode_splits[bs], decode_order=buffers.backend_fields["decode_order"][:bs],
            decode_split_len=buffers.backend_fields["decode_split_len"],
            cascade_prefix_len=buffers.prefix_len if cascade else None)

    def prepare_replay(self, host: dict[str, np.ndarray], seq_lens: np.ndarray, batch_size: int) -> None:
        """Work balance of decode attention for this replay; padded rows (one key each) go last."""
        from carpool.ops.triton.attention import balanced_decode_plan

        plan = balanced_decode_plan(seq_lens, self._num_kv_heads, self._decode_splits[batch_size])
        b = len(seq_lens)
        host["decode_order"][:b] = plan.order
        host["decode_order"][b:batch_size] = np.arange(b, batch_size, dtype=np.int32)
        host["decode_split_len"][0] = plan.split_len
