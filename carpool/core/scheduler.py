"""Scheduler: one token-budget rule for prefill, chunked prefill, decode and prefix hits.

Each step gives every running request, oldest first, up to (num_tokens - num_computed_tokens) new
tokens under `max_num_batched_tokens`; then admits waiting requests in arrival order while budget,
`max_num_seqs` and KV blocks allow. A long prompt simply gets a chunk of the remaining budget.

When blocks run out for a running request, the newest running request is preempted: its blocks are
freed, its progress counter resets to 0 and it returns to the head of the waiting queue, keeping the
tokens it generated; it is recomputed (prompt + outputs) when memory frees up. The oldest request is
never preempted for a newer one, so every admitted request finishes.

Speculative decoding is the same rule: a running request's proposed tokens (`spec_token_ids`) are more
tokens to compute, scheduled after its known ones inside the budget, with KV slots allocated like the
rest. The step verifies them; `update_from_output` rolls `num_computed_tokens` back past the rejected
ones and frees the blocks that only they used. Block hashes (prefix caching) are computed over known
tokens only, so a proposed token never reaches the cache unverified. Speculation is off for steps that
start with `disable_by_batch_size` or more running requests, and for requests with penalties (which
read every earlier token) or with a step still in flight (async scheduling: their last token is not
known yet).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from carpool.config import SchedulerConfig, SpeculativeConfig
from carpool.core.kv_cache_manager import KVCacheManager, cdiv
from carpool.core.sched_output import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    PromptLogprobs,
    SchedulerOutput,
)
from carpool.core.spec_stats import SpecDecodingStats
from carpool.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 speculative_config: SpeculativeConfig | None = None) -> None:
        self.config = config
        self.spec = speculative_config
        self.spec_stats = SpecDecodingStats(speculative_config.num_speculative_tokens if speculative_config else 0)
        # Requests whose block tables lost blocks to rejected drafts since the runner last heard of them.
        self._trimmed: set[str] = set()
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # running requests with penalties (they stop the engine core overlapping steps): counted as requests
        # enter and leave `running`, so the core's per-step question costs no scan of the batch
        self._running_with_penalties = 0
        # Requests that the runner holds state for (scheduled at least once since last admitted).
        self._in_runner: set[str] = set()
        self._finished_req_ids: set[str] = set()
        self.num_preemptions = 0  # total since start

    # ---- admission -----------------------------------------------------------------------------
    def check_request(self, request: Request) -> None:
        """Refuse up front a request that could never run to completion (it would otherwise wait forever)."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        max_len = self.config.max_model_len
        total = request.num_prompt_tokens + request.max_tokens
        if request.num_prompt_tokens > max_len:
            raise ValueError(f"prompt: {request.num_prompt_tokens} tokens exceed max_model_len={max_len}")
        if total > max_len:
            raise ValueError(f"max_tokens: prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                             f"({request.max_tokens}) = {total} exceeds max_model_len={max_len}")
        # (a draft model's lookahead slots may extend the last step's allocation up to max_model_len)
        lookahead = self.spec.num_lookahead_slots if self.spec is not None else 0
        blocks_needed = cdiv(min(total + lookahead, max_len), self.kv.block_size)
        if blocks_needed > self.kv.num_blocks:
            # the prompt and its first output token must fit, or no max_tokens would help
            field = "prompt" if cdiv(request.num_prompt_tokens + 1, self.kv.block_size) > self.kv.num_blocks \
                else "max_tokens"
            raise ValueError(f"{field}: the request needs {blocks_needed} KV blocks of "
                             f"{self.kv.block_size} tokens but the cache has only {self.kv.num_blocks}")

    def add_request(self, request: Request) -> None:
        self.check_request(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        cached_reqs: list[CachedRequestData] = []
        new_reqs: list[NewRequestData] = []
        scheduled_spec: dict[str, list[int]] = {}
        preempted_now = False
        speculate = self.speculation_on()

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if (request.num_output_placeholders
                    and len(request.output_token_ids) + request.num_output_placeholders >= request.max_tokens):
                i += 1  # its last token is already being sampled: nothing more to compute
                continue
            num_new = min(request.num_tokens + request.num_output_placeholders - request.num_computed_tokens,
                          budget)
            assert num_new > 0, "a running request always has at least one token to compute"
            drafts = self._drafts_to_verify(request, num_new, budget) if speculate else []
            request.spec_token_ids = []  # verified now or never: the next proposal follows this step's tokens
            num_new += len(drafts)
            extra = (self._lookahead_slots(request, request.num_computed_tokens, num_new, len(drafts))
                     if speculate else 0)
            kept = len(self.kv.block_ids(request.request_id)) if request.request_id in self._trimmed else None
            new_block_ids = self.kv.allocate_slots(request, num_new + extra)
            while new_block_ids is None:
                victim = self.running.pop()
                self._running_with_penalties -= victim.sampling_params.has_penalties
                self._preempt(victim)
                preempted_now = True
                if victim is request:
                    break
                new_block_ids = self.kv.allocate_slots(request, num_new + extra)
            if new_block_ids is None:
                break
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            if drafts:
                scheduled_spec[request.request_id] = drafts
            if request.request_id in self._in_runner:
                cached_reqs.append(CachedRequestData(request.request_id, new_block_ids,
                                                     request.num_computed_tokens, num_blocks_kept=kept))
            else:
                new_reqs.append(self._new_request_data(request))
            self._trimmed.discard(request.request_id)
            self._advance(request, num_new, len(drafts))
            i += 1

        # Admit waiting requests only when nothing was preempted: memory is tight otherwise.
        while (self.waiting and budget > 0 and not preempted_now
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            # Prompt logprobs come from the hidden states of computed positions: until it has them all, a
            # request that wants them computes its whole prompt (as vLLM does); it still fills the cache.
            needs_prompt = request.prompt_logprobs is not None and not request.prompt_logprobs_sent
            hit_blocks, num_hit_tokens = ([], 0) if needs_prompt else self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            extra = self._lookahead_slots(request, num_hit_tokens, num_new, 0) if speculate else 0
            if self.kv.allocate_slots(request, num_new + extra, hit_blocks) is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            self._running_with_penalties += request.sampling_params.has_penalties
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(self._new_request_data(request))
            self._advance(request, num_new)

        for req_id in num_scheduled:
            self._in_runner.add(req_id)
        finished, self._finished_req_ids = self._finished_req_ids, set()
        return SchedulerOutput(new_reqs=new_reqs, cached_reqs=cached_reqs,
                               num_scheduled_tokens=num_scheduled,
                               total_num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
                               finished_req_ids=finished, scheduled_spec_decode_tokens=scheduled_spec)

    @staticmethod
    def _advance(request: Request, num_new: int, num_drafts: int = 0) -> None:
        """Progress counts at schedule time: the step's tokens are as good as computed for the next
        schedule(). A step that reaches the end of the known tokens samples one more (a placeholder
        until its value arrives); one verifying `num_drafts` proposed tokens emits 1 to num_drafts + 1
        tokens, and update_from_output moves the counter back past the rejected ones."""
        request.num_computed_tokens += num_new
        if request.num_computed_tokens - num_drafts == request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1

    # ---- speculative decoding ---------------------------------------------------------------------
    def speculation_on(self) -> bool:
        """Whether this step may verify proposed tokens (load awareness: not at disable_by_batch_size or
        more running requests). The engine core does not overlap steps while it is on: a verification
        must be resolved before the next schedule() knows where the request stands."""
        if self.spec is None:
            return False
        limit = self.spec.disable_by_batch_size
        return limit is None or len(self.running) < limit

    def _drafts_to_verify(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The proposed tokens to schedule after `num_new` known ones: only when those reach the end of
        the known tokens, within the budget, and short enough that the emitted tokens (accepted + one)
        stay within max_tokens."""
        if (not request.spec_token_ids or request.num_output_placeholders or request.sampling_params.has_penalties
                or request.num_computed_tokens + num_new != request.num_tokens):
            return []
        room = min(budget - num_new, request.max_tokens - len(request.output_token_ids) - 1)
        return request.spec_token_ids[:max(room, 0)]

    def _lookahead_slots(self, request: Request, start: int, num_new: int, num_drafts: int) -> int:
        """KV slots past this step's `num_new` tokens (computed from `start`) for a draft model to write
        into while it proposes after the step (SpeculativeConfig.num_lookahead_slots); only for a step
        that samples, and never past max_model_len."""
        assert self.spec is not None
        if not self.spec.num_lookahead_slots or start + num_new - num_drafts < request.num_tokens:
            return 0
        return max(0, min(self.spec.num_lookahead_slots, self.config.max_model_len - (start + num_new)))

    def _new_request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(req_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                              output_token_ids=list(request.output_token_ids),
                              sampling_params=request.sampling_params,
                              block_ids=self.kv.block_ids(request.request_id),
                              num_computed_tokens=request.num_computed_tokens)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # an in-flight token of a preempted request is dropped
        request.spec_token_ids = []
        self._trimmed.discard(request.request_id)
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._forget_in_runner(request.request_id)
        self.waiting.appendleft(request)

    def _forget_in_runner(self, req_id: str) -> None:
        if req_id in self._in_runner:
            self._in_runner.discard(req_id)
            self._finished_req_ids.add(req_id)

    # ---- results -------------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append sampled tokens and finish requests that hit a stop. Progress counters already moved
        when the step was scheduled; outputs of requests that finished or were preempted since then
        (possible with async scheduling) are dropped.

        A request that verified proposed tokens emits several tokens (consecutive entries of the runner's
        output): its counter moves back past the rejected ones, the blocks only they used are freed, and
        a stop or max_tokens inside the run ends the request there (later tokens are dropped)."""
        running = RequestStatus.RUNNING
        requests = self.requests
        outputs: list[EngineCoreOutput] = []
        finished: list[Request] = []
        for req_id, chunk in runner_output.prompt_logprobs.items():  # before the tokens of the same step
            request = requests.get(req_id)
            if request is not None and request.status is running:
                self._add_prompt_logprobs(request, chunk)
        req_ids, sampled, all_logprobs = runner_output.req_ids, runner_output.sampled_token_ids, runner_output.logprobs
        spec_scheduled = scheduler_output.scheduled_spec_decode_tokens
        i, n = 0, len(req_ids)
        while i < n:
            req_id, start = req_ids[i], i
            i += 1
            while i < n and req_ids[i] == req_id:
                i += 1
            request = requests.get(req_id)
            if request is None or request.status is not running or not request.num_output_placeholders:
                continue  # aborted, finished or preempted while the step ran
            request.num_output_placeholders -= 1
            drafts = spec_scheduled.get(req_id)
            if drafts is not None:
                num_accepted = i - start - 1
                request.num_computed_tokens -= len(drafts) - num_accepted
                self.spec_stats.observe(len(drafts), num_accepted)
            reason = None
            for j in range(start, i):
                request.output_token_ids.append(sampled[j])
                reason = self._check_stop(request, sampled[j])
                if reason is not None:
                    i_end = j + 1
                    break
            else:
                i_end = i
            prompt_logprobs = None
            if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
                assert len(request.prompt_logprobs) == request.num_prompt_tokens - 1, "prompt logprobs missing"
                prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
            outputs.append(EngineCoreOutput(
                request_id=req_id, new_token_ids=sampled[start:i_end], new_logprobs=all_logprobs[start:i_end],
                finish_reason=reason, stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0), new_prompt_logprobs=prompt_logprobs))
            if reason is not None:
                finished.append(request)
                continue
            if drafts is not None:
                held = len(self.kv.block_ids(req_id))
                if self.kv.free_tail(request, request.num_tokens) < held:
                    self._trimmed.add(req_id)
            if not request.num_output_placeholders:  # proposals follow the last token: only if it is this one
                request.spec_token_ids = runner_output.spec_token_ids.get(req_id, [])
        if finished:  # (one pass over running for the lot: a whole batch may finish in one step)
            leaving = {request.request_id for request in finished}
            kept = []
            for r in self.running:
                if r.request_id in leaving:
                    self._running_with_penalties -= r.sampling_params.has_penalties
                else:
                    kept.append(r)
            self.running[:] = kept
            for request in finished:
                self._release(request)
        return outputs

    @staticmethod
    def _add_prompt_logprobs(request: Request, chunk: PromptLogprobs) -> None:
        """Keep a chunk's prompt logprobs. A chunk computed again after a preemption repeats entries
        already kept: only entries past them are new, so each prompt token is scored exactly once."""
        assert request.prompt_logprobs is not None
        have = 1 + len(request.prompt_logprobs)  # the prompt index the next new entry scores
        assert chunk.start <= have, f"{request.request_id}: prompt logprobs from {chunk.start}, expected {have}"
        request.prompt_logprobs.extend(chunk.logprobs[have - chunk.start:])

    def _check_stop(self, request: Request, token: int) -> str | None:
        """Set the finished status if this token ends the request; returns the finish reason."""
        params = request.sampling_params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in params.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return "stop"
            if token in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return "stop"
        if num_out >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return "length"
        return None

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus,
                        stop_reason: int | str | None = None) -> None:
        """End requests from outside the step (abort, or a stop string found in the text)."""
        assert status.finished
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self._leave_running(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            if stop_reason is not None:
                request.stop_reason = stop_reason
            self._remove(request)

    def _remove(self, request: Request) -> None:
        if request in self.running:  # (a finished request is still in running; an aborted one may not be)
            self._leave_running(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        """Free a request that is out of running and waiting: its blocks, its runner state, its entry."""
        self.kv.free(request)
        self._forget_in_runner(request.request_id)
        self._trimmed.discard(request.request_id)
        del self.requests[request.request_id]

    def _leave_running(self, request: Request) -> None:
        self.running.remove(request)
        self._running_with_penalties -= request.sampling_params.has_penalties

    # ---- introspection -------------------------------------------------------------------------
    def running_has_penalties(self) -> bool:
        """Whether any running request samples with penalties (O(1): counted, not scanned)."""
        return self._running_with_penalties > 0

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def check_integrity(self) -> None:
        self.kv.check_integrity(live_request_ids=[r.request_id for r in self.running])
        penalized = sum(r.sampling_params.has_penalties for r in self.running)
        assert self._running_with_penalties == penalized, (
            f"{self._running_with_penalties} running requests counted with penalties, {penalized} in the batch")
        for request in self.running:
            held = len(self.kv.block_ids(request.request_id))
            assert held * self.kv.block_size >= request.num_computed_tokens, (
                f"{request.request_id} computed {request.num_computed_tokens} tokens in {held} blocks")
            hashed = self.kv.num_hashed_blocks.get(request.request_id, 0)
            assert hashed * self.kv.block_size <= request.num_tokens, (
                f"{request.request_id}: a hashed block covers a token that is not verified")
