"""ModelRunner: SchedulerOutput -> one packed ForwardBatch -> forward -> sampled tokens.

The runner keeps each live request's tokens, block table and sampling params in an InputBatch, so the
scheduler only sends what changed. A request samples in a step exactly when its scheduled tokens reach
the end of its known tokens; earlier prefill chunks only fill the KV cache (and, for a request that
asked for prompt logprobs, score its prompt tokens: compute_prompt_logprobs). Decode-only steps on a GPU
replay CUDA graphs (so do verifications, below); every other step, and any step that scores
prompt tokens, runs eagerly.

Speculative decoding: a request the scheduler gives proposed tokens (`scheduled_spec_decode_tokens`)
computes them after its known ones; the runner takes logits at all its k + 1 positions, samples each
position as plain sampling would, and once those samples reach the host the walk of
layers/rejection_sampler.py (emitted_lengths) decides what it emits. On a GPU, a verification step
replays the CUDA graph of its widest request's query width, narrower requests (shorter or no proposals,
plain decodes) padded in front with queries that store nothing (worker/cuda_graph.py): proposals stay what
the proposer found, so the scheduler's budget, KV slots and acceptance metrics count real proposed tokens only.
Once a step's tokens are on the host, the proposer guesses the next tokens of the rows that sampled;
they travel back to the scheduler in `ModelRunnerOutput.spec_token_ids`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from carpool.attention.fp8_kv import KV_CACHE_FP8_DTYPE
from carpool.config import EngineConfig
from carpool.core.sched_output import ModelRunnerOutput, PromptLogprobs, SchedulerOutput, TokenLogprobs
from carpool.distributed import SINGLE, Communicator, TPGroup
from carpool.forward_batch import ForwardBatch
from carpool.layers.rejection_sampler import emitted_lengths
from carpool.layers.sampler import Sampler, SamplingMetadata, gather_logprobs
from carpool.models.loader import load_model
from carpool.models.moe import expert_layout
from carpool.models.registry import get_model_class
from carpool.models.runtime import ModelRuntime
from carpool.platform import to_device
from carpool.quantization.config import parse_kv_cache_dtype, parse_quantization_config
from carpool.quantization.factory import check_device_support
from carpool.sampling_params import SamplingParams
from carpool.spec_decode import make_proposer
from carpool.utils import cdiv
from carpool.worker.cuda_graph import HOST_IO_MAX_ROWS, CUDAGraphRunner, verification_graph_shapes
from carpool.worker.input_batch import InputBatch, PendingFixup, StepInputs
from carpool.worker.kv_cache import allocate_kv_cache, bytes_per_block, cpu_num_blocks, gpu_num_blocks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepTiming:
    """Where one step's time went, for benchmarks (collected only when asked: events cost a little)."""

    launch_s: float  # host time to build the inputs and enqueue the forward and the sampler
    wait_s: float  # host time blocked until the sampled tokens reached the host
    gpu_s: float  # device time from the step's first kernel to its last
    gap_s: float  # device idle time between the previous step's last kernel and this step's first


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, device: str | torch.device | None = None
                 ) -> None:
        self.config = config
        self.tp = tp
        self.device = torch.device(device or config.device)
        self.block_size = config.cache.block_size
        self.comm = Communicator(tp, config.kernels)
        self.quantization = parse_quantization_config(config.model.hf_config, config.quantization)
        kv_cache = parse_kv_cache_dtype(config.kv_cache_dtype, config.model.hf_config)
        check_device_support(self.quantization, kv_cache, config.kernel_backend, self.device)
        self.runtime = ModelRuntime.for_inference(
            config.kernel_backend, self.comm, config.kernels, self.quantization,
            get_model_class(config.model.architecture).packed_modules_mapping, kv_cache,
            config.parallel.enable_expert_parallel)
        # What the KV cache stores: e4m3 under --kv-cache-dtype fp8 (attention/fp8_kv.py), else the model dtype.
        self.kv_cache_dtype = KV_CACHE_FP8_DTYPE if kv_cache.is_fp8 else config.model.dtype
        self.ops = self.runtime.ops
        self.attention = self.runtime.attention
        if self.ops.name == "triton":
            from carpool.ops.triton import utils as triton_utils
            triton_utils.choose_pdl(self.device, not config.kernels.pdl)
        self.model = load_model(config.model, self.runtime, self.device, config.load_format)
        self.vocab_size = config.model.vocab_size
        self.sampler = Sampler(self.ops.sample_from_logits)
        self._noise_rng = np.random.default_rng(config.seed)  # seeds of unseeded rows (fast sampler)
        self._zero_buffers: dict[torch.dtype, torch.Tensor] = {}
        self._kept_hidden: torch.Tensor | None = None  # this step's hidden states, for prompt logprobs only
        self.input_batch = InputBatch(config.scheduler.max_num_seqs, config.scheduler.max_model_len,
                                      self.block_size)
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.graph_runner: CUDAGraphRunner | None = None
        # Opt-in step timings for benchmarks.
        self.collect_timings = False
        self.timings: list[StepTiming] = []
        self._last_end_event: torch.cuda.Event | None = None
        # Sampled tokens (on the device) and their rows, of the last launched step.
        self._last_sampled: tuple[torch.Tensor | None, np.ndarray] = (None, np.zeros(0, dtype=np.int64))
        # Kernels move a step's inputs and tokens through pinned memory (ops/triton/host_io) on CUDA with
        # the Triton backend. The pinned token buffers of the last steps stay referenced here: a kernel,
        # unlike a copy, does not hold its block in PyTorch's pinned allocator, and a step dropped unresolved
        # must not hand its buffer to another allocation before the kernel has written it.
        self.kernel_host_io = (self.device.type == "cuda" and self.ops.name == "triton"
                               and config.kernels.kernel_host_io)
        self._recent_host_tokens: collections.deque[torch.Tensor] = collections.deque(maxlen=8)
        # Speculative decoding: the proposer runs where the step's tokens are resolved: rank 0 under TP,
        # whose output is the one the engine reads, or every rank for a draft model split over the ranks
        # (each resolves the same tokens into the same request state, so they propose in lockstep and
        # meet in the same collectives). A verification's candidates are sampled wherever tokens are
        # sampled (`sample`), and every rank walks them on its host.
        spec = config.speculative_config
        on_every_rank = spec is not None and spec.draft_on_every_rank
        self.proposer = make_proposer(config, self) if tp.rank == 0 or on_every_rank else None

    def describe(self) -> dict:
        """The kernel paths this runner uses: the backend, the fast paths asked for (KernelConfig),
        whether decode steps replay CUDA graphs, the quantization method, the KV cache dtype, how a
        mixture of experts' routed experts are divided among the ranks (None: a dense model) and how it
        speculates (None: it does not)."""
        spec = self.config.speculative_config
        speculative = None if spec is None else {
            "method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens,
            "disable_by_batch_size": spec.disable_by_batch_size,
            **(self.proposer.describe() if self.proposer is not None else {})}
        return {"kernel_backend": self.ops.name, "attention_backend": self.attention.name,
                "cuda_graphs": self.graph_runner is not None, "kernels": dataclasses.asdict(self.config.kernels),
                "quantization": self.quantization.name if self.quantization is not None else None,
                "kv_cache_dtype": str(self.kv_cache_dtype).removeprefix("torch."),
                "moe_layout": expert_layout(self.config.model, self.comm.size,
                                            self.config.parallel.enable_expert_parallel),
                "speculative": speculative}

    # ---- KV memory -----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.model.attention_layers()[0]
        per_block = bytes_per_block(self.config.model, self.block_size, layer.num_kv_heads, self.kv_cache_dtype)
        # a draft model keeps its own K/V for the same block ids: a block costs both
        return per_block + (self.proposer.kv_bytes_per_block() if self.proposer is not None else 0)

    def determine_num_blocks(self) -> int:
        if self.device.type != "cuda":
            return cpu_num_blocks(self.config.cache, self.kv_bytes_per_block())
        return gpu_num_blocks(self.config.cache, self.kv_bytes_per_block(), self.device, self.profile_run)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(self.model.attention_layers(), num_blocks, self.block_size,
                                          self.kv_cache_dtype, self.device)
        if self.proposer is not None:
            self.proposer.initialize_kv_cache(num_blocks)
        if self.use_cuda_graphs:
            widths, max_verify = verification_graph_shapes(self.config)
            self.graph_runner = CUDAGraphRunner(self.model, self.attention, self.config.scheduler.max_num_seqs,
                                                self.config.scheduler.max_model_len, self.block_size,
                                                self.device, self.kernel_host_io, verify_widths=widths,
                                                verify_max_num_seqs=max_verify)
            self.graph_runner.capture()

    @property
    def use_cuda_graphs(self) -> bool:
        # Graphs need kernels that read every changing value from device buffers (the Triton backend).
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and self.attention.supports_cuda_graphs)

    @torch.inference_mode()
    def profile_run(self) -> int:
        """One forward at the largest step the scheduler can produce (max_num_batched_tokens tokens,
        logits for max_num_seqs rows), with a throwaway KV cache, so peak activation memory is known.
        Returns the throwaway cache's bytes (part of the measured peak, but not of what the step needs
        beside the real cache)."""
        cfg = self.config.scheduler
        num_tokens = cfg.max_num_batched_tokens
        num_seqs = min(cfg.max_num_seqs, num_tokens)
        per_seq = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        num_blocks = sum(cdiv(n, self.block_size) for n in per_seq)
        profile_cache = allocate_kv_cache(self.model.attention_layers(), num_blocks, self.block_size,
                                          self.kv_cache_dtype, self.device)
        profile_cache_bytes = profile_cache.numel() * profile_cache.element_size()
        del profile_cache  # (the layers' views keep it alive until the end of the run)
        qsl = np.concatenate([[0], np.cumsum(per_seq)]).astype(np.int32)
        positions = np.concatenate([np.arange(n) for n in per_seq])
        max_blocks = cdiv(max(per_seq), self.block_size)
        tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        next_block = 0
        for i, n in enumerate(per_seq):
            k = cdiv(n, self.block_size)
            tables[i, :k] = np.arange(next_block, next_block + k)
            next_block += k
        slots = np.concatenate([tables[i, p // self.block_size] * self.block_size + p % self.block_size
                                for i, p in enumerate(np.split(positions, qsl[1:-1]))]).astype(np.int64)
        inputs = StepInputs(rows=np.arange(num_seqs), input_ids=np.zeros(num_tokens, dtype=np.int64),
                            positions=positions.astype(np.int64), slot_mapping=slots, query_start_loc=qsl,
                            seq_lens=np.asarray(per_seq, dtype=np.int32), block_tables=tables,
                            sample_rows=np.arange(num_seqs), logits_indices=qsl[1:].astype(np.int64) - 1,
                            max_query_len=max(per_seq), max_seq_len=max(per_seq),
                            pending_token_index=np.zeros(0, dtype=np.int64), pending_rows=np.zeros(0, dtype=np.int64))
        batch = self._to_device(inputs)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        logits = self.model.compute_logits(hidden.index_select(0, torch.from_numpy(inputs.logits_indices)
                                                                .to(self.device)))
        temperature = torch.ones(num_seqs, device=self.device)
        self.sampler(logits, SamplingMetadata(temperature=temperature, all_greedy=False,
                                              num_logprobs=[None] * num_seqs))
        if self.sampler.fast_sample is not None:  # compile it now rather than during the first request
            self.sampler.fast_sample(logits, temperature, torch.zeros(num_seqs, dtype=torch.long, device=self.device))
        torch.cuda.synchronize(self.device)
        for layer in self.model.attention_layers():
            layer.k_cache = layer.v_cache = torch.empty(0)
        return profile_cache_bytes

    # ---- one step ------------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in so.finished_req_ids:
            row = batch.req_to_row.get(req_id)
            batch.remove(req_id)
            if row is not None and self.proposer is not None:
                self.proposer.remove(row)
        for new in so.new_reqs:
            gen = None
            if new.sampling_params.seed is not None and not new.sampling_params.greedy:
                gen = torch.Generator(device=self.device)
            batch.add(new, gen)
        for cached in so.cached_reqs:
            batch.update(cached)
        for req_id, draft_token_ids in so.scheduled_spec_decode_tokens.items():
            batch.set_drafts(req_id, draft_token_ids)

    def _to_device(self, inputs: StepInputs) -> ForwardBatch:
        return ForwardBatch(input_ids=to_device(inputs.input_ids, self.device),
                            positions=to_device(inputs.positions, self.device),
                            attn=self.attention.build_metadata(inputs, self.device))

    def _sampling_metadata(self, rows: np.ndarray, output_offsets: np.ndarray | None = None) -> SamplingMetadata:
        """Sampling metadata of `rows` (one per logit row). `output_offsets` (verification): row i samples
        the request's output token output_offsets[i] places further on (a row repeats once per position),
        with that output index's seed, so each position draws what plain decoding would draw there."""
        batch = self.input_batch
        params = cast(list[SamplingParams], [batch.params[r] for r in rows])
        dev = self.device

        def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), dev)

        all_greedy = all(p.greedy for p in params)
        # All-greedy rows take the argmax, which reads neither temperatures nor noise seeds: zeros kept on
        # the device serve for both, so such a step uploads nothing here.
        md = SamplingMetadata(temperature=self._zeros(len(params), torch.float32) if all_greedy
                              else column([p.temperature for p in params]),
                              all_greedy=all_greedy, num_logprobs=[p.logprobs for p in params])
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
        # index of the token being sampled: known outputs plus those still in flight
        num_out = batch.num_tokens[rows] + batch.num_pending[rows] - batch.num_prompt_tokens[rows]
        if output_offsets is not None:
            num_out = num_out + output_offsets
        for i, p in enumerate(params):
            if num_out[i] < p.min_tokens:
                banned = [t for t in p.all_stop_token_ids() if t < self.vocab_size]
                if banned:
                    md.banned_token_ids[i] = banned
        # Seeds derive from (seed, output index): the draw for token i is the same whatever the batch, and
        # again after preemption and recompute.
        seeded = [(i, (p.seed * 1_000_003 + int(num_out[i])) % (1 << 62))
                  for i, p in enumerate(params) if p.seed is not None and not p.greedy]
        fast = (self.sampler.fast_sample is not None and md.top_k is None and md.top_p is None
                and md.min_p is None and md.repetition_penalty is None and not md.banned_token_ids
                and all(p.logprobs is None for p in params))
        if fast and all_greedy:
            md.seeds = self._zeros(len(params), torch.long)
            return md
        if fast:
            seeds = self._noise_rng.integers(0, 1 << 62, size=len(params), dtype=np.int64)
            for i, seed in seeded:
                seeds[i] = seed
            md.seeds = to_device(seeds, dev)
            return md
        for i, seed in seeded:
            # (a verification's positions of one request each need their own generator)
            gen = batch.generators[int(rows[i])] if output_offsets is None else torch.Generator(device=self.device)
            gen.manual_seed(seed)
            md.generators[i] = gen
        return md

    def keep_until_written(self, host: torch.Tensor) -> None:
        """Hold a pinned buffer that a kernel writes (see _recent_host_tokens) for the next few steps."""
        self._recent_host_tokens.append(host)

    def _zeros(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """n zeros of dtype on the device, from a buffer kept for reuse (read only)."""
        buf = self._zero_buffers.get(dtype)
        if buf is None or buf.numel() < n:
            buf = self._zero_buffers[dtype] = torch.zeros(max(n, self.config.scheduler.max_num_seqs), dtype=dtype,
                                                          device=self.device)
        return buf[:n]

    def sample(self, logits: torch.Tensor, rows: np.ndarray, output_offsets: np.ndarray | None = None
               ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """One token per logit row (+ logprobs); `output_offsets` as _sampling_metadata's (a verification's
        positions). A hook: under tensor parallelism rank 0 samples and broadcasts the tokens
        (worker/tp_worker.py), so every rank appends the same tokens."""
        return self.sampler(logits, self._sampling_metadata(rows, output_offsets))

    def verify(self, logits: torch.Tensor, inputs: StepInputs
               ) -> tuple[torch.Tensor, np.ndarray, list[TokenLogprobs | None]]:
        """A verification step's candidates (rejection_sampler.py: the engine's proposals are
        deterministic, so each position's token is drawn as plain sampling would draw it there): the
        candidate per logit row [L] on the device, the proposed token each row judges [L] on the host (-1
        at a request's last row), and logprobs per logit row. PendingStep walks them once they reach the
        host (emitted_lengths)."""
        assert inputs.num_drafts is not None
        batch = self.input_batch
        counts = inputs.num_drafts + 1
        rows = np.repeat(inputs.sample_rows, counts)
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        # the proposed token judged at each logit row: the one after it; a request's last row judges none
        width = batch.token_ids.shape[1]
        draft_ids = batch.token_ids[rows, np.minimum(batch.num_tokens[rows] + offsets, width - 1)]
        draft_ids[np.cumsum(counts) - 1] = -1
        candidates, logprobs = self.sample(logits, rows, offsets)
        return candidates.to(torch.long), draft_ids, logprobs

    def propose(self, rows: np.ndarray) -> dict[str, list[int]]:
        """The proposer's guesses for rows whose tokens just reached the host. None while the batch is at
        disable_by_batch_size or more (the scheduler would not verify them), for rows with a later step
        in flight (their next token is unknown), or with penalties (never verified)."""
        spec = self.config.speculative_config
        batch = self.input_batch
        if self.proposer is None or spec is None or not len(rows):
            return {}
        if spec.disable_by_batch_size is not None and len(batch) >= spec.disable_by_batch_size:
            return {}
        rows = rows[batch.num_pending[rows] == 0]
        remaining = np.fromiter((cast(SamplingParams, batch.params[r]).max_tokens or 0 for r in rows),
                                dtype=np.int64, count=len(rows))
        remaining -= batch.num_tokens[rows] - batch.num_prompt_tokens[rows]
        max_lens = np.clip(remaining - 1, 0, spec.num_speculative_tokens)
        for i, r in enumerate(rows.tolist()):
            if cast(SamplingParams, batch.params[r]).has_penalties:
                max_lens[i] = 0
        if not max_lens.any():
            return {}
        proposals = self.proposer.propose(batch, rows, max_lens)
        return {cast(str, batch.req_ids[r]): p for r, p in zip(rows.tolist(), proposals) if p}

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(so).resolve()

    @torch.inference_mode()
    def launch(self, so: SchedulerOutput) -> "PendingStep":
        """Queue one step on the device and return without waiting for it. Tokens sampled by the step
        launched before this one may still be on the device: they are fed to this step's inputs there."""
        launch_start = time.perf_counter()
        self._update_states(so)
        if so.is_empty:
            return PendingStep(self, [], np.zeros(0, dtype=np.int64), None, [], None)
        req_ids = list(so.num_scheduled_tokens)
        counts = list(so.num_scheduled_tokens.values())
        inputs = self.input_batch.prepare(req_ids, counts)
        timing: StepEvents | None = None
        if self.collect_timings and self.device.type == "cuda":
            timing = StepEvents(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                                self._last_end_event)
            timing.start.record()
        else:
            self._last_end_event = None
        spans = self.prompt_logprob_spans(inputs)
        logits = self._forward(inputs, self._pending_fixup(inputs), keep_hidden=bool(spans))
        tokens, logprobs, draft_ids = None, [], None
        if logits is not None and inputs.num_drafts is not None:
            tokens, draft_ids, logprobs = self.verify(logits, inputs)
        elif logits is not None:
            tokens, logprobs = self.sample(logits, inputs.sample_rows)
        prompt_logprobs = self.compute_prompt_logprobs(spans) if spans else {}
        if timing is not None:
            timing.end.record()
            self._last_end_event = timing.end
            timing.launch_s = time.perf_counter() - launch_start
        self.input_batch.launched(inputs.rows, counts, inputs.sample_rows)
        # (a verification is resolved before the next step is launched: nothing for a fix-up to read)
        self._last_sampled = ((tokens, inputs.sample_rows) if draft_ids is None
                              else (None, np.zeros(0, dtype=np.int64)))
        ids = self.input_batch.req_ids
        return PendingStep(self, [ids[r] for r in inputs.sample_rows], inputs.sample_rows,  # type: ignore[misc]
                           tokens, logprobs, timing, draft_ids, inputs.num_drafts, prompt_logprobs)

    def _pending_fixup(self, inputs: StepInputs) -> PendingFixup | None:
        """Input tokens sampled by the previous, unresolved step: where they go, and their values on the
        device. In steady decode the rows are those the last step sampled, in the same order, and the
        sampled tensor is used as it is: no index upload and no gather kernel in the step's chain."""
        if not len(inputs.pending_token_index):
            return None
        tokens, rows = self._last_sampled
        assert tokens is not None, "a pending token without a launched step that sampled it"
        index_of_row = {int(r): i for i, r in enumerate(rows)}
        src = np.array([index_of_row[int(r)] for r in inputs.pending_rows], dtype=np.int64)
        if np.array_equal(src, np.arange(len(src))):
            values = tokens[:len(src)]
        else:
            values = tokens.index_select(0, to_device(src, self.device))
        return PendingFixup(inputs.pending_token_index.astype(np.int64, copy=False), values)

    def _forward(self, inputs: StepInputs, fixup: PendingFixup | None, keep_hidden: bool = False
                 ) -> torch.Tensor | None:
        """Logits of the sampling requests (None if no request samples this step). With `keep_hidden`
        (prompt logprobs) the step runs eagerly and its hidden states stay in `_kept_hidden`."""
        self.comm.begin_forward()
        shape = self.graph_runner.choose(inputs) if self.graph_runner is not None and not keep_hidden else None
        if shape is not None:
            # (the logits are a buffer of the graph, valid until its next replay: every reader, the copy
            # to the host and the next step's fix-up, is queued on this stream before that replay)
            return self.graph_runner.run(inputs, fixup, shape)
        batch = self._to_device(inputs)
        if fixup is not None:
            batch.input_ids.index_copy_(0, to_device(fixup.index, self.device), fixup.values)
        hidden = self.model(batch.input_ids, batch.positions, batch)
        self._kept_hidden = hidden if keep_hidden else None
        if not len(inputs.logits_indices):
            return None
        return self.model.compute_logits(hidden.index_select(0, to_device(inputs.logits_indices, self.device)))

    # ---- prompt logprobs -----------------------------------------------------------------------
    def prompt_logprob_spans(self, inputs: StepInputs) -> list[PromptLogprobSpan]:
        """The packed positions of this step whose logits score a prompt token, for each request that
        asked for prompt logprobs. Position p's logits score token p + 1, so a chunk of positions
        [first, last] scores prompt tokens first + 1 .. min(last + 1, num_prompt - 1): the last prompt
        position scores the first output token, which sampling covers."""
        batch = self.input_batch
        spans = []
        for i, row in enumerate(inputs.rows):
            params = batch.params[row]
            if params is None or params.prompt_logprobs is None:
                continue
            packed = int(inputs.query_start_loc[i])
            first = int(inputs.positions[packed])
            last = min(first + int(inputs.query_start_loc[i + 1]) - packed - 1, int(batch.num_prompt_tokens[row]) - 2)
            if last >= first:
                spans.append(PromptLogprobSpan(str(batch.req_ids[row]), int(row), packed, first, last - first + 1,
                                               params.prompt_logprobs))
        return spans

    @torch.inference_mode()
    def compute_prompt_logprobs(self, spans: list[PromptLogprobSpan]) -> dict[str, PromptLogprobs]:
        """Each span's prompt logprobs from the hidden states the step kept: log-softmax in float32 over
        the whole vocabulary, the actual next prompt token's logprob and rank, and the top-N. Computed per
        prefill chunk, so chunking cannot change them; rows go through the LM head PROMPT_LOGPROB_ROWS at a
        time, so a long chunk never holds [chunk, vocab] logits at once. Every TP rank runs this (the LM
        head gathers across ranks); rank 0's result is the one returned. On a GPU, steps with such spans
        run eagerly (no CUDA graph) and wait for their values at launch: prompt logprobs are for scoring
        prompts, not for the decode fast path."""
        hidden, self._kept_hidden = self._kept_hidden, None
        assert hidden is not None, "prompt logprobs need the hidden states of the step"
        out: dict[str, PromptLogprobs] = {}
        for span in spans:
            targets = self.input_batch.token_ids[span.row, span.first + 1:span.first + 1 + span.count]
            entries: list[TokenLogprobs | None] = []
            for start in range(0, span.count, PROMPT_LOGPROB_ROWS):
                n = min(PROMPT_LOGPROB_ROWS, span.count - start)
                index = torch.arange(span.packed + start, span.packed + start + n, device=hidden.device)
                logits = self.model.compute_logits(hidden.index_select(0, index)).to(torch.float32)
                entries += gather_logprobs(torch.log_softmax(logits, dim=-1),
                                           to_device(targets[start:start + n], self.device), [span.num_logprobs] * n)
            out[span.req_id] = PromptLogprobs(start=span.first + 1, logprobs=entries)  # type: ignore[arg-type]
        return out


PROMPT_LOGPROB_ROWS = 256


@dataclass(frozen=True)
class PromptLogprobSpan:
    """Positions first .. first + count - 1 of one request's chunk, packed at `packed` in the step,
    whose logits score its prompt tokens first + 1 .. first + count."""
    req_id: str
    row: int
    packed: int
    first: int
    count: int
    num_logprobs: int


@dataclass
class StepEvents:
    start: torch.cuda.Event
    end: torch.cuda.Event
    previous_end: torch.cuda.Event | None  # the end of the step launched before this one
    launch_s: float = 0.0


class PendingStep:
    """A launched step. Its sampled tokens are copied to pinned host memory as soon as the device has
    them, so resolving waits for this step only, never for the steps launched after it."""

    def __init__(self, runner: ModelRunner, req_ids: list[str], rows: np.ndarray, tokens: torch.Tensor | None,
                 logprobs: list, timing: StepEvents | None, draft_ids: np.ndarray | None = None,
                 num_drafts: np.ndarray | None = None,
                 prompt_logprobs: dict[str, PromptLogprobs] | None = None) -> None:
        self.runner = runner
        # A verification (speculative decoding): tokens is the candidate of each logit row, num_drafts[i]
        # + 1 rows per sampling row, draft_ids the proposed token each logit row judges (host), and
        # logprobs has one entry per logit row.
        self.num_drafts = num_drafts
        self.draft_ids = draft_ids
        self.req_ids = req_ids
        self.rows = rows
        self.logprobs = logprobs
        self.timing = timing
        self.prompt_logprobs = prompt_logprobs or {}
        self.host_tokens: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        if tokens is not None:
            if tokens.is_cuda:
                self.host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                if runner.kernel_host_io and tokens.is_contiguous() and tokens.numel() <= HOST_IO_MAX_ROWS:
                    from carpool.ops.triton.host_io import copy_to_host

                    copy_to_host(tokens, self.host_tokens)
                    runner.keep_until_written(self.host_tokens)
                else:
                    self.host_tokens.copy_(tokens, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record()
            else:
                self.host_tokens = tokens

    def resolve(self) -> ModelRunnerOutput:
        sampled: list[int] = []
        if self.host_tokens is not None:
            wait_start = time.perf_counter()
            if self.ready is not None:
                self.ready.synchronize()
            if self.timing is not None:
                t = self.timing
                gap = t.previous_end.elapsed_time(t.start) / 1e3 if t.previous_end is not None else 0.0
                self.runner.timings.append(StepTiming(launch_s=t.launch_s, wait_s=time.perf_counter() - wait_start,
                                                      gpu_s=t.start.elapsed_time(t.end) / 1e3, gap_s=gap))
            if self.draft_ids is not None:
                return self._resolve_verification()
            sampled = self.host_tokens.tolist()
        batch = self.runner.input_batch
        # A row may have been handed to another request since launch: only append where the owner is
        # still the request that sampled.
        keep = [i for i, (r, rid) in enumerate(zip(self.rows, self.req_ids)) if batch.req_ids[r] == rid]
        if len(keep) == len(sampled):
            batch.append_sampled(self.rows, sampled)
        else:
            batch.append_sampled(self.rows[keep], [sampled[i] for i in keep])
        spec = self.runner.propose(self.rows[keep]) if self.runner.proposer is not None else {}
        return ModelRunnerOutput(req_ids=self.req_ids, sampled_token_ids=sampled, logprobs=self.logprobs,
                                 spec_token_ids=spec, prompt_logprobs=self.prompt_logprobs)

    def _resolve_verification(self) -> ModelRunnerOutput:
        """Each row's emitted tokens, flattened: a row emitting m tokens appears m times in a row. The walk
        (rejection_sampler.emitted_lengths) compares each candidate with the proposed token its row judges:
        a row emits its first m candidates, the accepted proposed tokens then the target's own."""
        assert self.host_tokens is not None and self.draft_ids is not None and self.num_drafts is not None
        batch = self.runner.input_batch
        candidates = self.host_tokens.numpy()
        num_emitted = emitted_lengths(candidates == self.draft_ids, self.num_drafts).tolist()
        starts = (np.cumsum(self.num_drafts + 1) - (self.num_drafts + 1)).tolist()
        flat = candidates.tolist()
        req_ids: list[str] = []
        sampled: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        kept_rows, kept_tokens = [], []
        for i, (row, rid) in enumerate(zip(self.rows.tolist(), self.req_ids)):
            m, start = num_emitted[i], starts[i]
            tokens = flat[start:start + m]
            req_ids += [rid] * m
            sampled += tokens
            logprobs += self.logprobs[start:start + m]
            if batch.req_ids[row] == rid:
                kept_rows.append(row)
                kept_tokens.append(tokens)
        kept = np.asarray(kept_rows, dtype=np.int64)
        batch.append_verified(kept, kept_tokens)
        spec = self.runner.propose(kept) if self.runner.proposer is not None else {}
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled, logprobs=logprobs, spec_token_ids=spec,
                                 prompt_logprobs=self.prompt_logprobs)
