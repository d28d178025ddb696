"""ModelRunner: SchedulerOutput -> one packed ForwardBatch -> forward -> sampled tokens.

The runner keeps each live request's tokens, block table and sampling params in an InputBatch, so the
scheduler only sends what changed. A request samples in a step exactly when its scheduled tokens reach
the end of its known tokens; earlier prefill chunks only fill the KV cache. Decode-only steps on a GPU
replay CUDA graphs; every other step runs eagerly.
"""

from __future__ import annotations

import logging
import time
from typing import cast

import numpy as np
import torch

from carpool.config import EngineConfig
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.distributed import SINGLE, TPGroup
from carpool.forward_batch import AttentionMetadata, ForwardBatch
from carpool.layers.sampler import Sampler, SamplingMetadata
from carpool.models.loader import load_model
from carpool.ops import get_kernel_ops
from carpool.sampling_params import SamplingParams
from carpool.worker.cuda_graph import CUDAGraphRunner
from carpool.worker.input_batch import InputBatch, StepInputs
from carpool.worker.kv_cache import allocate_kv_cache, bytes_per_block, cpu_num_blocks, gpu_num_blocks

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, device: str | torch.device | None = None
                 ) -> None:
        self.config = config
        self.tp = tp
        self.device = torch.device(device or config.device)
        self.block_size = config.cache.block_size
        self.ops = get_kernel_ops(config.kernel_backend)
        self.model = load_model(config.model, self.ops, self.device, tp, config.load_format)
        self.vocab_size = config.model.vocab_size
        self.sampler = Sampler()
        self.input_batch = InputBatch(config.scheduler.max_num_seqs, config.scheduler.max_model_len,
                                      self.block_size)
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.graph_runner: CUDAGraphRunner | None = None
        # Opt-in step timings for benchmarks: (seconds blocked waiting for the device, device seconds).
        self.collect_timings = False
        self.timings: list[tuple[float, float]] = []

    # ---- KV memory -----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.model.attention_layers()[0]
        return bytes_per_block(self.config.model, self.block_size, layer.num_kv_heads)

    def determine_num_blocks(self) -> int:
        if self.device.type != "cuda":
            return cpu_num_blocks(self.config.cache, self.kv_bytes_per_block())
        return gpu_num_blocks(self.config.cache, self.kv_bytes_per_block(), self.device, self.profile_run)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(self.model.attention_layers(), num_blocks, self.block_size,
                                          self.config.model.dtype, self.device)
        if self.use_cuda_graphs:
            self.graph_runner = CUDAGraphRunner(self.model, self.config.scheduler.max_num_seqs,
                                                self.input_batch.max_blocks_per_req, self.device)
            self.graph_runner.capture()

    @property
    def use_cuda_graphs(self) -> bool:
        # Graphs need kernels that read every changing value from device buffers: the Triton backend.
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and self.ops.name == "triton")

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward at the largest step the scheduler can produce (max_num_batched_tokens tokens,
        logits for max_num_seqs rows), with a throwaway KV cache, so peak activation memory is known."""
        cfg = self.config.scheduler
        num_tokens = cfg.max_num_batched_tokens
        num_seqs = min(cfg.max_num_seqs, num_tokens)
        per_seq = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        num_blocks = sum(-(-n // self.block_size) for n in per_seq)
        allocate_kv_cache(self.model.attention_layers(), num_blocks, self.block_size,
                          self.config.model.dtype, self.device)
        qsl = np.concatenate([[0], np.cumsum(per_seq)]).astype(np.int32)
        positions = np.concatenate([np.arange(n) for n in per_seq])
        max_blocks = -(-max(per_seq) // self.block_size)
        tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        next_block = 0
        for i, n in enumerate(per_seq):
            k = -(-n // self.block_size)
            tables[i, :k] = np.arange(next_block, next_block + k)
            next_block += k
        slots = np.concatenate([tables[i, p // self.block_size] * self.block_size + p % self.block_size
                                for i, p in enumerate(np.split(positions, qsl[1:-1]))]).astype(np.int64)
        inputs = StepInputs(rows=np.arange(num_seqs), input_ids=np.zeros(num_tokens, dtype=np.int64),
                            positions=positions.astype(np.int64), slot_mapping=slots, query_start_loc=qsl,
                            seq_lens=np.asarray(per_seq, dtype=np.int32), block_tables=tables,
                            sample_rows=np.arange(num_seqs), logits_indices=qsl[1:].astype(np.int64) - 1,
                            max_query_len=max(per_seq), max_seq_len=max(per_seq))
        batch = self._to_device(inputs)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        logits = self.model.compute_logits(hidden.index_select(0, torch.from_numpy(inputs.logits_indices)
                                                                .to(self.device)))
        self.sampler(logits, SamplingMetadata(temperature=torch.ones(num_seqs, device=self.device),
                                              all_greedy=False, num_logprobs=[None] * num_seqs))
        torch.cuda.synchronize(self.device)
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = torch.empty(0)

    # ---- one step ------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in so.finished_req_ids:
            batch.remove(req_id)
        for new in so.new_reqs:
            gen = None
            if new.sampling_params.seed is not None and not new.sampling_params.greedy:
                gen = torch.Generator(device=self.device)
            batch.add(new, gen)
        for cached in so.cached_reqs:
            batch.update(cached)

    def _to_device(self, inputs: StepInputs) -> ForwardBatch:
        dev = self.device

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev, non_blocking=True)

        attn = AttentionMetadata(query_start_loc=put(inputs.query_start_loc), seq_lens=put(inputs.seq_lens),
                                 block_tables=put(inputs.block_tables), slot_mapping=put(inputs.slot_mapping),
                                 max_query_len=inputs.max_query_len, max_seq_len=inputs.max_seq_len,
                                 query_start_loc_cpu=inputs.query_start_loc.tolist(),
                                 seq_lens_cpu=inputs.seq_lens.tolist())
        return ForwardBatch(input_ids=put(inputs.input_ids), positions=put(inputs.positions), attn=attn)

    def _sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        batch = self.input_batch
        params = cast(list[SamplingParams], [batch.params[r] for r in rows])
        dev = self.device

        def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        md = SamplingMetadata(temperature=column([p.temperature for p in params]),
                              all_greedy=all(p.greedy for p in params),
                              num_logprobs=[p.logprobs for p in params])
        if any(p.top_k > 0 for p in params):
            md.top_k = column([p.top_k for p in params], torch.long)
        if any(p.top_p < 1.0 for p in params):
            md.top_p = column([p.top_p for p in params])
        if any(p.min_p > 0.0 for p in params):
            md.min_p = column([p.min_p for p in params])
        if any(p.has_penalties for p in params):
            md.presence_penalty = column([p.presence_penalty for p in params])
            md.frequency_penalty = column([p.frequency_penalty for p in params])
            md.repetition_penalty = column([p.repetition_penalty for p in params])
            md.prompt_token_ids = [batch.prompt_token_ids(r) for r in rows]
            md.output_token_ids = [batch.output_token_ids(r) for r in rows]
        num_out = batch.num_tokens[rows] - batch.num_prompt_tokens[rows]
        for i, (row, p) in enumerate(zip(rows, params)):
            if num_out[i] < p.min_tokens:
                banned = [t for t in p.all_stop_token_ids() if t < self.vocab_size]
                if banned:
                    md.banned_token_ids[i] = banned
            gen = batch.generators.get(int(row))
            if gen is not None:
                # Seeded from (seed, output index): the draw for token i is the same whatever the batch,
                # and again after preemption and recompute.
                assert p.seed is not None
                gen.manual_seed((p.seed * 1_000_003 + int(num_out[i])) % (1 << 63))
                md.generators[i] = gen
        return md

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.is_empty:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[], logprobs=[])
        req_ids = list(so.num_scheduled_tokens)
        counts = list(so.num_scheduled_tokens.values())
        inputs = self.input_batch.prepare(req_ids, counts)
        timed = self.collect_timings and self.device.type == "cuda"
        if timed:
            start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_ev.record()
        logits = self._forward(inputs)
        sampled: list[int] = []
        logprobs: list = []
        if logits is not None:
            tokens, logprobs = self.sampler(logits, self._sampling_metadata(inputs.sample_rows))
        if timed:
            end_ev.record()
            wait_start = time.perf_counter()
            end_ev.synchronize()
            self.timings.append((time.perf_counter() - wait_start, start_ev.elapsed_time(end_ev) / 1e3))
        if logits is not None:
            sampled = tokens.tolist()
        self.input_batch.advance(inputs.rows, counts, inputs.sample_rows, sampled)
        ids = self.input_batch.req_ids
        return ModelRunnerOutput(req_ids=[ids[r] for r in inputs.sample_rows],  # type: ignore[misc]
                                 sampled_token_ids=sampled, logprobs=logprobs)

    def _forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits of the sampling requests (None if no request samples this step)."""
        if self.graph_runner is not None and self.graph_runner.can_run(inputs):
            return self.graph_runner.run(inputs)
        batch = self._to_device(inputs)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        if not len(inputs.logits_indices):
            return None
        index = torch.from_numpy(inputs.logits_indices).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden.index_select(0, index))
