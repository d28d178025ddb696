"""EngineCore: the scheduler and the executor, stepped; token ids in, token ids out.

It knows nothing of text: prompts arrive as validated `Request`s and each step returns the scheduler's
`EngineCoreOutput`s. That boundary is what lets the core run in a process of its own (core_proc.py)
while tokenization, detokenization and stop strings stay with the caller (Engine in-process, or the
server's frontend); the in-process Engine uses this same class, so both paths schedule identically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from carpool.config import EngineConfig
from carpool.core.kv_cache_manager import KVCacheManager
from carpool.core.sched_output import EngineCoreOutput, SchedulerOutput
from carpool.core.scheduler import Scheduler
from carpool.request import Request, RequestStatus
from carpool.worker.executor import Executor, StepHandle

logger = logging.getLogger(__name__)


def make_executor(config: EngineConfig) -> Executor:
    """One process for one rank; one process per rank under tensor parallelism."""
    if config.parallel.tensor_parallel_size > 1:
        from carpool.worker.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor(config)
    from carpool.worker.uniproc_executor import UniProcExecutor

    return UniProcExecutor(config)

class QueueFullError(RuntimeError):
    """The admission queue holds max_num_queued_reqs requests already."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    num_kv_blocks: int
    # speculative decoding (SpecDecodingStats), cumulative
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: list[int] = field(default_factory=list)


@dataclass
class CoreStepResult:
    """One step's results: each request's new tokens, and the requests first scheduled in this step
    with the (monotonic) time it happened, for the queue-time metric."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    scheduled: list[tuple[str, float]] = field(default_factory=list)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.executor: Executor = make_executor(config)
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        logger.info("engine core: %d KV blocks; paths: %s", num_blocks, self.executor.describe())
        self.kv_cache_manager = KVCacheManager(num_blocks, config.cache.block_size,
                                               config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, config.speculative_config)
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---- requests --------------------------------------------------------------------------------
    def check_queue(self) -> None:
        limit = self.config.scheduler.max_num_queued_reqs
        if limit is not None and self.scheduler.num_waiting >= limit:
            raise QueueFullError(f"the queue already holds {limit} waiting requests")

    def add_requests(self, requests: list[Request]) -> None:
        """Admit the n sequences of one request, all or none: ValueError (naming the field) or
        QueueFullError leave the core unchanged."""
        self.check_queue()
        self.scheduler.check_request(requests[0])
        for request in requests:
            self.scheduler.add_request(request)
            self.prompt_tokens_total += request.num_prompt_tokens

    def finish_requests(self, seq_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                        stop_reason: int | str | None = None) -> None:
        """End sequences now (abort, or a stop string the caller found) and free their blocks; unknown
        ids are ignored."""
        self.scheduler.finish_requests(seq_ids, status, stop_reason=stop_reason)

    # ---- stepping --------------------------------------------------------------------------------
    def step(self) -> CoreStepResult:
        """Run one step. With async scheduling the step launched here is resolved by the next call, so
        the host schedules and post-processes while the device computes; outputs then trail by one step."""
        result = CoreStepResult()
        if self._in_flight is not None and not self._can_overlap():
            result.outputs = self._finish_step(*self._drain())
            return result
        scheduler_output = self.scheduler.schedule()
        launched = None
        if not scheduler_output.is_empty or scheduler_output.finished_req_ids:
            now = time.monotonic()
            result.scheduled = [(new.req_id, now) for new in scheduler_output.new_reqs]
            launched = (scheduler_output, self.executor.launch(scheduler_output))
        if self._in_flight is not None:
            result.outputs = self._finish_step(*self._drain())
        if launched is not None:
            if self._can_overlap() and not scheduler_output.scheduled_spec_decode_tokens:
                self._in_flight = launched
            else:
                result.outputs += self._finish_step(*launched)
        return result

    def _drain(self) -> tuple[SchedulerOutput, StepHandle]:
        assert self._in_flight is not None
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _can_overlap(self) -> bool:
        # Penalties read every earlier token on the host, so a step using them waits for the one before.
        # Speculation needs each step's tokens before the next schedule (proposals follow them, and a
        # verification moves num_computed_tokens back), so steps do not overlap while it is on: the
        # simplest correct rule. It is off at disable_by_batch_size requests, where overlap resumes.
        return (self.config.async_scheduling and not self.scheduler.speculation_on()
                and not self.scheduler.running_has_penalties())

    def _finish_step(self, scheduler_output: SchedulerOutput, handle: StepHandle) -> list[EngineCoreOutput]:
        outputs = self.scheduler.update_from_output(scheduler_output, handle.resolve())
        self.generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def stats(self) -> EngineStats:
        prefix = self.kv_cache_manager.prefix_stats
        spec = self.scheduler.spec_stats
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           kv_cache_usage=self.kv_cache_manager.usage,
                           num_preemptions=self.scheduler.num_preemptions,
                           prefix_cache_queries=prefix.queries, prefix_cache_hits=prefix.hits,
                           prompt_tokens=self.prompt_tokens_total,
                           generation_tokens=self.generation_tokens_total,
                           num_kv_blocks=self.kv_cache_manager.num_blocks,
                           spec_decode_num_drafts=spec.num_drafts,
                           spec_decode_num_draft_tokens=spec.num_draft_tokens,
                           spec_decode_num_accepted_tokens=spec.num_accepted_tokens,
                           spec_decode_num_accepted_tokens_per_pos=list(spec.num_accepted_tokens_per_pos))

    def shutdown(self) -> None:
        self._in_flight = None  # its handle refers to the runner's device tensors
        self.executor.shutdown()
