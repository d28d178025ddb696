"""Engine (add_request / step / abort) and the offline LLM built on it.

One step = EngineCore.step (schedule -> execute on the executor -> update the scheduler) -> detokenize
and check stop strings -> RequestOutputs. The engine is synchronous and single-threaded. The server
either drives this same object from a background thread (async_engine.py) or runs the EngineCore in a
process of its own and does the text side itself (core_client.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from carpool.config import EngineConfig
from carpool.engine.arg_utils import EngineArgs
from carpool.engine.core import EngineCore, EngineStats, QueueFullError
from carpool.engine.input_processor import InputProcessor, PromptType
from carpool.engine.output_processor import OutputProcessor
from carpool.outputs import RequestOutput
from carpool.request import RequestStatus
from carpool.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["Engine", "LLMEngine", "LLM", "EngineStats", "PromptType", "QueueFullError", "load_tokenizer"]


def load_tokenizer(path: str) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a checkpoint without tokenizer files still serves token-id prompts
        logger.warning("no tokenizer loaded from %s (%s); only token-id prompts will work", path, e)
        return None


class Engine:
    """EngineCore (scheduler + executor) with text on both sides, in one process: validated prompts go
    in, RequestOutputs (detokenized, stop strings applied, n > 1 fanned in) come out."""

    def __init__(self, config: EngineConfig, tokenizer: Any | None = None) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(
            config.tokenizer or config.model.path)
        self.input_processor = InputProcessor(config, self.tokenizer, self.core.kv_cache_manager.num_blocks)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "Engine":
        return cls(args.create_engine_config())

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.input_processor.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: tuple[int, ...]) -> None:
        self.input_processor.eos_token_ids = tuple(ids)

    # ---- input -----------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return self.input_processor.tokenize_prompt(prompt)

    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams | None = None, arrival_time: float | None = None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError (naming the field) for bad
        input and QueueFullError when max_num_queued_reqs requests already wait; in both cases the
        engine is unchanged."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request_id: {request_id!r} is already in use")
        self.core.check_queue()
        req = self.input_processor.process(request_id, prompt, params, arrival_time)
        self.core.add_requests(req.sequences)
        self.output_processor.add_request(request_id, req.prompt, req.prompt_token_ids, req.params,
                                          req.arrival_time)
        return request_id

    # ---- stepping --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one core step and turn its tokens into outputs (see EngineCore.step: with async
        scheduling outputs trail by one step)."""
        result = self.core.step()
        for seq_id, when in result.scheduled:
            self.output_processor.mark_scheduled(seq_id, when)
        if not result.outputs:
            return []
        outputs, stopped = self.output_processor.process_outputs(result.outputs)
        for seq_id, stop in stopped:
            self.core.finish_requests([seq_id], RequestStatus.FINISHED_STOPPED, stop_reason=stop)
        return outputs

    def abort(self, request_ids: str | Sequence[str]) -> None:
        """Stop requests now and free their KV blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            self.core.finish_requests(self.output_processor.sequence_ids(request_id))
            self.output_processor.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def shutdown(self) -> None:
        self.core.shutdown()


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
