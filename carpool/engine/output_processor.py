"""OutputProcessor: the scheduler's per-step token lists -> RequestOutputs for callers.

It owns what only matters to the caller: text (incremental detokenization, stop strings), logprobs in
vLLM's shape, metrics timestamps, and the fan-in of a request with n > 1 (each of its n sequences is a
separate request in the scheduler, named "<index>_<request_id>").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from carpool.core.sched_output import EngineCoreOutput, TokenLogprobs
from carpool.engine.detokenizer import IncrementalDetokenizer, fast_decoder
from carpool.engine.input_processor import child_request_id
from carpool.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from carpool.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class SequenceState:
    request_id: str  # the scheduler's id for this sequence
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    emitted_tokens: int = 0
    final_sent: bool = False  # DELTA mode: the finishing output went out


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    num_finished: int = 0  # sequences with a finish_reason
    prompt_logprobs: PromptLogprobs | None = None  # once the core sent them (with the first token)
    prompt_logprobs_emitted: bool = False  # DELTA mode: an output carried them

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.decode = fast_decoder(tokenizer) if tokenizer is not None else None
        self.parents: dict[str, ParentState] = {}
        self.seq_to_parent: dict[str, tuple[ParentState, SequenceState]] = {}
        # token id -> its text alone (Logprob.decoded_token): a prompt's logprobs name thousands of
        # tokens, mostly the same few hundred; at most one entry per vocabulary token.
        self._token_texts: dict[int, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[str]:
        """Register a request; returns the scheduler ids of its n sequences."""
        sequences = []
        for i in range(params.n):
            detok = (IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params, self.decode)
                     if params.detokenize and self.tokenizer is not None else None)
            seq = SequenceState(child_request_id(request_id, i, params.n), i, detok,
                                logprobs=[] if params.logprobs is not None else None,
                                cumulative_logprob=0.0 if params.logprobs is not None else None)
            sequences.append(seq)
        parent = ParentState(request_id, prompt, prompt_token_ids, params, sequences,
                             RequestMetrics(arrival_time=arrival_time))
        self.parents[request_id] = parent
        for seq in sequences:
            self.seq_to_parent[seq.request_id] = (parent, seq)
        return [s.request_id for s in sequences]

    def has_request(self, request_id: str) -> bool:
        return request_id in self.parents

    def sequence_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return [] if parent is None else [s.request_id for s in parent.sequences if s.finish_reason is None]

    def remove(self, request_id: str) -> None:
        parent = self.parents.pop(request_id, None)
        if parent is not None:
            for seq in parent.sequences:
                self.seq_to_parent.pop(seq.request_id, None)

    def mark_scheduled(self, seq_id: str, when: float) -> None:
        entry = self.seq_to_parent.get(seq_id)
        if entry and entry[0].metrics.first_scheduled_time is None:
            entry[0].metrics.first_scheduled_time = when

    def process_outputs(self, outputs: list[EngineCoreOutput], num_preemptions: dict[str, int] | None = None
                        ) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Returns the RequestOutputs to hand out, and (sequence id, stop string) pairs of sequences
        that a stop string ended, which the scheduler must now finish."""
        now = time.monotonic()
        touched: dict[str, ParentState] = {}
        stopped: list[tuple[str, str]] = []
        for out in outputs:
            entry = self.seq_to_parent.get(out.request_id)
            if entry is None:
                continue
            parent, seq = entry
            if seq.finish_reason is not None:
                continue  # already ended by a stop string; the core had more in flight
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
            parent.metrics.last_token_time = now
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            if out.new_prompt_logprobs is not None and parent.prompt_logprobs is None:
                # (each of n sequences computes them, as vLLM's child requests do: so they come with whichever
                # sequence's first token comes first; the later, identical, copies are not converted)
                parent.prompt_logprobs = [None] + [self._to_logprob_dict(lp) for lp in out.new_prompt_logprobs]
            finished = out.finish_reason is not None
            new_token_ids, new_logprobs = out.new_token_ids, out.new_logprobs
            if seq.detokenizer is not None:
                stop, kept = self._detokenize(seq.detokenizer, new_token_ids, finished)
                if kept < len(new_token_ids):  # a stop string before the last token: drop the rest
                    new_token_ids, new_logprobs = new_token_ids[:kept], new_logprobs[:kept]
                    finished = False
                if stop is not None and not finished:
                    finished = True
                    out.finish_reason, out.stop_reason = "stop", stop
                    stopped.append((seq.request_id, stop))
            seq.token_ids.extend(new_token_ids)
            if seq.logprobs is not None:
                for lp in new_logprobs:
                    if lp is not None:
                        seq.logprobs.append(self._to_logprob_dict(lp))
                        seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + lp.logprobs[0]
            if finished and seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
                parent.num_finished += 1
            touched[parent.request_id] = parent
        results = []
        for parent in touched.values():
            if parent.finished:
                parent.metrics.finished_time = now
            ro = self._make_output(parent)
            if ro is not None:
                results.append(ro)
            if parent.finished:
                self.remove(parent.request_id)
        return results, stopped

    @staticmethod
    def _detokenize(detokenizer: IncrementalDetokenizer, token_ids: list[int], finished: bool
                    ) -> tuple[str | None, int]:
        """Feed new tokens to the detokenizer; returns (stop string found or None, tokens kept). Several
        tokens at once (a frontend that fell behind merges steps) are fed one by one when stop strings
        are set, so the text and tokens end exactly where one-step-at-a-time processing would end them."""
        if len(token_ids) <= 1 or not detokenizer.stop_strings:
            return detokenizer.update(token_ids, finished), len(token_ids)
        last = len(token_ids) - 1
        for i, token in enumerate(token_ids):
            stop = detokenizer.update([token], finished and i == last)
            if stop is not None:
                return stop, i + 1
        return None, len(token_ids)

    def _to_logprob_dict(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        out: dict[int, Logprob] = {}
        for tok, val, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            if tok not in out:
                out[tok] = Logprob(logprob=val, rank=rank, decoded_token=self._token_text(tok))
        return out

    def _token_text(self, token_id: int) -> str | None:
        if self.decode is None:
            return None
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id], False)
        return text

    def _make_output(self, parent: ParentState) -> RequestOutput | None:
        kind = parent.params.output_kind
        finished = parent.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for seq in parent.sequences:
            seq_done = seq.finish_reason is not None
            if kind == RequestOutputKind.DELTA:
                if seq.final_sent or (seq.emitted_tokens == len(seq.token_ids) and not seq_done):
                    continue
                text = seq.detokenizer.text_delta(seq_done) if seq.detokenizer else ""
                token_ids = seq.token_ids[seq.emitted_tokens:]
                logprobs = seq.logprobs[seq.emitted_tokens:] if seq.logprobs is not None else None
            else:
                text = seq.detokenizer.text_so_far(seq_done) if seq.detokenizer else ""
                token_ids = list(seq.token_ids)
                logprobs = list(seq.logprobs) if seq.logprobs is not None else None
            seq.emitted_tokens = len(seq.token_ids)
            seq.final_sent = seq_done
            completions.append(CompletionOutput(index=seq.index, text=text, token_ids=token_ids,
                                                cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
                                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        if not completions and not finished:
            return None
        prompt_logprobs = parent.prompt_logprobs
        if kind == RequestOutputKind.DELTA:
            prompt_logprobs = None if parent.prompt_logprobs_emitted else prompt_logprobs
            parent.prompt_logprobs_emitted = parent.prompt_logprobs is not None
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, outputs=completions, finished=finished,
                             metrics=parent.metrics, num_cached_tokens=parent.num_cached_tokens,
                             prompt_logprobs=prompt_logprobs)
