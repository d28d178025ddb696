"""ModelRunner: SchedulerOutput -> one packed ForwardBatch -> forward -> sampled tokens.

The runner keeps a small state per request (its tokens, block table, sampling params) so the scheduler
only sends what changed each step. A request samples a token in a step exactly when its scheduled
tokens reach the end of its known tokens; earlier prefill chunks only fill the KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from carpool.config import EngineConfig
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from carpool.distributed import SINGLE, TPGroup
from carpool.forward_batch import AttentionMetadata, ForwardBatch
from carpool.layers.sampler import Sampler, SamplingMetadata
from carpool.models.loader import load_model
from carpool.ops import get_kernel_ops
from carpool.sampling_params import SamplingParams
from carpool.worker.kv_cache import allocate_kv_cache, bytes_per_block, cpu_num_blocks

logger = logging.getLogger(__name__)


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt + generated, as far as the runner knows
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None

    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, device: str | torch.device | None = None
                 ) -> None:
        self.config = config
        self.tp = tp
        self.device = torch.device(device or config.device)
        self.block_size = config.cache.block_size
        self.ops = get_kernel_ops(config.kernel_backend)
        self.model = load_model(config.model, self.ops, self.device, tp)
        self.vocab_size = config.model.vocab_size
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0

    # ---- KV memory -----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.model.attention_layers()[0]
        return bytes_per_block(self.config.model, self.block_size, layer.num_kv_heads)

    def determine_num_blocks(self) -> int:
        return cpu_num_blocks(self.config.cache, self.kv_bytes_per_block())

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(self.model.attention_layers(), num_blocks, self.block_size,
                                          self.config.model.dtype, self.device)

    # ---- one step ------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in so.new_reqs:
            params = new.sampling_params
            gen = None
            if params.seed is not None and not params.greedy:
                gen = torch.Generator(device=self.device)
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id, token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids), sampling_params=params,
                block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens, generator=gen)
        for cached in so.cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            assert state.num_computed_tokens == cached.num_computed_tokens, (
                f"{cached.req_id}: runner at {state.num_computed_tokens}, scheduler at {cached.num_computed_tokens}")

    def _prepare_inputs(self, so: SchedulerOutput) -> tuple[ForwardBatch, list[CachedRequestState], list[int]]:
        states = [self.requests[r] for r in so.num_scheduled_tokens]
        counts = list(so.num_scheduled_tokens.values())
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        seq_lens: list[int] = []
        query_start = [0]
        sampling_states: list[CachedRequestState] = []
        logits_indices: list[int] = []
        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((len(states), max_blocks), dtype=np.int32)
        slots: list[np.ndarray] = []
        for i, (state, n) in enumerate(zip(states, counts)):
            start = state.num_computed_tokens
            end = start + n
            input_ids.extend(state.token_ids[start:end])
            pos = np.arange(start, end, dtype=np.int64)
            positions.append(pos)
            row = np.asarray(state.block_ids, dtype=np.int64)
            block_table[i, :len(row)] = row
            slots.append(row[pos // bs] * bs + pos % bs)
            seq_lens.append(end)
            query_start.append(query_start[-1] + n)
            if end == len(state.token_ids):
                sampling_states.append(state)
                logits_indices.append(query_start[-1] - 1)
        dev = self.device
        attn = AttentionMetadata(
            query_start_loc=torch.tensor(query_start, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(block_table).to(dev, non_blocking=True),
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev, non_blocking=True),
            max_query_len=max(counts), max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens)
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev, non_blocking=True),
            attn=attn)
        return batch, sampling_states, logits_indices

    def _sampling_metadata(self, states: list[CachedRequestState]) -> SamplingMetadata:
        params = [s.sampling_params for s in states]
        dev = self.device

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
            md.prompt_token_ids = [s.token_ids[:s.num_prompt_tokens] for s in states]
            md.output_token_ids = [s.output_token_ids() for s in states]
        for row, (state, p) in enumerate(zip(states, params)):
            num_out = len(state.token_ids) - state.num_prompt_tokens
            if num_out < p.min_tokens:
                banned = [t for t in p.all_stop_token_ids() if t < self.vocab_size]
                if banned:
                    md.banned_token_ids[row] = banned
            if state.generator is not None:
                # Seed from (seed, output index): the draw for token i is the same whatever the batch
                # and even after preemption and recompute.
                assert p.seed is not None
                state.generator.manual_seed((p.seed * 1_000_003 + num_out) % (1 << 63))
                md.generators[row] = state.generator
        return md

    def sample(self, logits: torch.Tensor, states: list[CachedRequestState]
               ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """One token per row (+ logprobs). A hook: under tensor parallelism rank 0 samples and broadcasts
        the tokens (worker/tp_worker.py), so every rank's request state appends the same tokens."""
        return self.sampler(logits, self._sampling_metadata(states))

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(so)
        if so.is_empty:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[], logprobs=[])
        batch, sampling_states, logits_indices = self._prepare_inputs(so)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        sampled: list[int] = []
        logprobs: list = []
        if sampling_states:
            index = torch.tensor(logits_indices, dtype=torch.long).to(self.device, non_blocking=True)
            logits = self.model.compute_logits(hidden.index_select(0, index))
            tokens, logprobs = self.sample(logits, sampling_states)
            sampled = tokens.tolist()
        for req_id, n in so.num_scheduled_tokens.items():
            self.requests[req_id].num_computed_tokens += n
        for state, token in zip(sampling_states, sampled):
            state.token_ids.append(token)
        return ModelRunnerOutput(req_ids=[s.req_id for s in sampling_states], sampled_token_ids=sampled,
                                 logprobs=logprobs)
