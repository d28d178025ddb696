"""Engine (add_request / step / abort) and the offline LLM built on it.

One step = schedule -> execute on the executor -> update the scheduler -> detokenize and check stop
strings -> RequestOutputs. The engine is synchronous and single-threaded; the async server drives the
same object from one background task.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from tqdm import tqdm

from carpool.config import EngineConfig
from carpool.core.kv_cache_manager import KVCacheManager
from carpool.core.scheduler import Scheduler
from carpool.engine.arg_utils import EngineArgs
from carpool.engine.output_processor import OutputProcessor, child_request_id
from carpool.outputs import RequestOutput
from carpool.request import Request, RequestStatus
from carpool.sampling_params import RequestOutputKind, SamplingParams
from carpool.core.sched_output import SchedulerOutput
from carpool.worker.executor import Executor, StepHandle, make_executor

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], dict[str, Any]]


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


def load_tokenizer(path: str) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a checkpoint without tokenizer files still serves token-id prompts
        logger.warning("no tokenizer loaded from %s (%s); only token-id prompts will work", path, e)
        return None


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Any | None = None) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        self.executor: Executor = make_executor(config)
        num_blocks = self.executor.determine_num_blocks()
        self.executor.initialize_kv_cache(num_blocks)
        self.kv_cache_manager = KVCacheManager(num_blocks, config.cache.block_size,
                                               config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            config.tokenizer or config.model.path)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.eos_token_ids = self._eos_token_ids()
        self._ids = itertools.count()
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "Engine":
        return cls(args.create_engine_config())

    def _eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.config.model.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and tok_eos not in ids:
            ids.append(tok_eos)
        return tuple(ids)

    # ---- input -----------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Turn a prompt into (text, token ids), validating both."""
        text: str | None = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids instead of text")
            text = prompt
            token_ids = list(self.tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
        else:
            raise ValueError(f"prompt: must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.config.model.vocab_size
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids: token id {t!r} is outside the vocabulary [0, {vocab})")
        return text, token_ids

    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError (naming the field) for bad
        input and QueueFullError when max_num_queued_reqs requests already wait; in both cases the
        engine is unchanged."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id: {request_id!r} is already in use")
        limit = self.config.scheduler.max_num_queued_reqs
        if limit is not None and self.scheduler.num_waiting >= limit:
            raise QueueFullError(f"the queue already holds {limit} waiting requests")
        text, token_ids = self.tokenize_prompt(prompt)
        params = (params or SamplingParams()).clone()
        params.eos_token_ids = self.eos_token_ids
        max_len = self.config.scheduler.max_model_len
        if len(token_ids) > max_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens exceed max_model_len={max_len}")
        if params.max_tokens is None:
            if len(token_ids) >= max_len:
                raise ValueError(f"prompt: {len(token_ids)} tokens leave no room to generate within "
                                 f"max_model_len={max_len}")
            params.max_tokens = max_len - len(token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        requests = []
        for i in range(params.n):
            seq_id = child_request_id(request_id, i, params.n)
            seq_params = params
            if params.n > 1 and params.seed is not None:
                seq_params = params.clone()
                seq_params.seed = params.seed + i
            requests.append(Request(seq_id, token_ids, seq_params, arrival_time=arrival))
        self.scheduler.check_request(requests[0])
        self.output_processor.add_request(request_id, text, token_ids, params, arrival)
        for request in requests:
            self.scheduler.add_request(request)
        self.prompt_tokens_total += len(token_ids) * params.n
        return request_id

    # ---- stepping --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. With async scheduling the step launched here is resolved by the next call, so
        the host schedules and post-processes while the device computes; outputs then trail by one step."""
        if self._in_flight is not None and not self._can_overlap():
            return self._finish_step(*self._drain())
        scheduler_output = self.scheduler.schedule()
        launched = None
        if not scheduler_output.is_empty or scheduler_output.finished_req_ids:
            now = time.monotonic()
            for new in scheduler_output.new_reqs:
                self.output_processor.mark_scheduled(new.req_id, now)
            launched = (scheduler_output, self.executor.launch(scheduler_output))
        outputs = self._finish_step(*self._drain()) if self._in_flight is not None else []
        if launched is not None:
            if self._can_overlap():
                self._in_flight = launched
            else:
                outputs += self._finish_step(*launched)
        return outputs

    def _drain(self) -> tuple[SchedulerOutput, StepHandle]:
        assert self._in_flight is not None
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _can_overlap(self) -> bool:
        # Penalties read every earlier token on the host, so a step using them waits for the one before.
        return self.config.async_scheduling and not any(
            r.sampling_params.has_penalties for r in self.scheduler.running)

    def _finish_step(self, scheduler_output: SchedulerOutput, handle: StepHandle) -> list[RequestOutput]:
        core_outputs = self.scheduler.update_from_output(scheduler_output, handle.resolve())
        self.generation_tokens_total += len(core_outputs)
        outputs, stopped = self.output_processor.process_outputs(core_outputs)
        for seq_id, stop in stopped:
            self.scheduler.finish_requests([seq_id], RequestStatus.FINISHED_STOPPED, stop_reason=stop)
        return outputs

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests now and free their KV blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            seq_ids = self.output_processor.sequence_ids(request_id)
            self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
            self.output_processor.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def stats(self) -> EngineStats:
        prefix = self.kv_cache_manager.prefix_stats
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           kv_cache_usage=self.kv_cache_manager.usage,
                           num_preemptions=self.scheduler.num_preemptions,
                           prefix_cache_queries=prefix.queries, prefix_cache_hits=prefix.hits,
                           prompt_tokens=self.prompt_tokens_total,
                           generation_tokens=self.generation_tokens_total,
                           num_kv_blocks=self.kv_cache_manager.num_blocks)

    def shutdown(self) -> None:
        self.executor.shutdown()


LLMEngine = Engine  # vLLM's name


class LLM:
    """Offline batch generation, vLLM-style: `LLM(model=...).generate(prompts, sampling_params)`."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = Engine.from_engine_args(EngineArgs.from_kwargs(model=model, **engine_args))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. A bad prompt or parameter
        raises ValueError before any work starts and leaves the engine serving."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                       else list(sampling_params))
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                ids.append(self.engine.add_request(None, prompt, params))
        except Exception:
            self.engine.abort(ids)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        pending = set(ids)
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm,
                  dynamic_ncols=True) as bar:
            start = time.perf_counter()
            out_tokens = 0
            while pending:
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"engine lost requests {sorted(pending)}")
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix(output_tok_s=f"{out_tokens / (time.perf_counter() - start):.1f}")
        return [results[i] for i in ids]
