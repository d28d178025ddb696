"""POST /v1/completions: a prompt (or a batch of prompts), n choices each, streamed or not.

Choice index = prompt index * n + sequence index, as OpenAI numbers a batch. Every engine request runs
in DELTA mode; the non-streaming answer is the deltas joined, so both paths produce the same text.

Scoring a prompt (lm-evaluation-harness's loglikelihood tasks): `echo` with `logprobs` returns the
prompt's tokens with their logprobs (the first one null) before the generated ones, and `max_tokens: 0`
with `echo` returns the prompt alone; vLLM's `prompt_logprobs` adds vLLM's per-choice field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from starlette.responses import Response

from carpool.engine.request_stream import RequestStream
from carpool.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprobsJSON,
    UsageInfo,
)
from carpool.entrypoints.openai.serving import (
    SSE_DONE,
    OpenAIServing,
    completion_logprobs,
    merge_streams,
    sse,
    sse_error,
    vllm_prompt_logprobs,
)
from carpool.outputs import PromptLogprobs, RequestOutput


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: CompletionLogprobs | None = None
    text_len: int = 0  # characters so far, for logprob text offsets
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, raw: Request) -> Response:
        request = await self.parse_body(raw, CompletionRequest)
        params = self.sampling_params(request.to_sampling_params)
        texts = request.prompts()
        prompts = [await self.engine_prompt(p, request.add_special_tokens, decode=request.echo,
                                            what="the prompt" if len(texts) == 1 else f"prompt {i} of the batch")
                   for i, p in enumerate(texts)]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.submit(request_id, prompts, params)
        return await self.respond(raw, streams, bool(request.stream),
                                  lambda: self._stream(request, request_id, streams),
                                  lambda: self._collect(request, request_id, streams))

    def _prompt_text(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        tok = self.tokenizer
        return tok.decode(output.prompt_token_ids) if tok is not None else ""

    def _token_text(self, token_id: int) -> str:
        tok = self.tokenizer
        return tok.decode([token_id]) if tok is not None else f"token_id:{token_id}"

    def _update(self, request: CompletionRequest, choice: _Choice, output: RequestOutput, index: int,
                prompt_logprobs: PromptLogprobs | None
                ) -> tuple[str, CompletionLogprobs | None, PromptLogprobsJSON | None]:
        """Fold one sequence's delta into its choice; returns the text and logprobs to send for it, and
        vLLM's prompt_logprobs with the choice's first delta if asked for. With echo, the first delta
        starts with the prompt, and with logprobs its tokens' entries (the first one null) come first.
        Scoring only (max_tokens 0 with echo), the one generated token is left out."""
        c = output.outputs[index]
        first = not choice.started
        choice.started = True
        echoed = self._prompt_text(output) if request.echo and first else ""
        new_ids, new_logprobs = ([], None) if request.scores_prompt_only else (c.token_ids, c.logprobs)
        text = echoed + ("" if request.scores_prompt_only else c.text)
        choice.text.append(text)
        choice.num_tokens += len(new_ids)
        logprobs = None
        if request.logprobs is not None:
            logprobs = CompletionLogprobs()
            if echoed and prompt_logprobs is not None:
                logprobs = completion_logprobs(output.prompt_token_ids, prompt_logprobs, choice.text_len,
                                               self._token_text)
            if new_logprobs is not None:
                _extend(logprobs, completion_logprobs(new_ids, new_logprobs, choice.text_len + len(echoed)))
        choice.text_len += len(text)
        if c.finish_reason is not None:  # (scoring only: done at max_tokens 0, whatever the dropped token was)
            choice.finish_reason, choice.stop_reason = (("length", None) if request.scores_prompt_only
                                                        else (c.finish_reason, c.stop_reason))
        prompt_json = (vllm_prompt_logprobs(prompt_logprobs) if first and request.prompt_logprobs is not None
                       and prompt_logprobs is not None else None)
        return text, logprobs, prompt_json

    async def _collect(self, request: CompletionRequest, request_id: str, streams: list[RequestStream]
                       ) -> CompletionResponse:
        n = request.n
        choices: dict[int, _Choice] = {}
        prompt_tokens: dict[int, int] = {}
        prompt_logprobs: dict[int, PromptLogprobs] = {}  # by prompt: DELTA outputs carry them once
        prompt_json: dict[int, PromptLogprobsJSON] = {}
        async for i, output in merge_streams(streams):
            prompt_tokens[i] = len(output.prompt_token_ids)
            if output.prompt_logprobs is not None:
                prompt_logprobs[i] = output.prompt_logprobs
            for k, c in enumerate(output.outputs):
                idx = i * n + c.index
                choice = choices.setdefault(idx, _Choice())
                _, logprobs, plp = self._update(request, choice, output, k, prompt_logprobs.get(i))
                choice.logprobs = _extend(choice.logprobs, logprobs)
                if plp is not None:
                    prompt_json[idx] = plp
        completion_tokens = sum(ch.num_tokens for ch in choices.values())
        usage = UsageInfo(prompt_tokens=sum(prompt_tokens.values()), completion_tokens=completion_tokens,
                          total_tokens=sum(prompt_tokens.values()) + completion_tokens)
        return CompletionResponse(
            id=request_id, model=self.ctx.model_name, usage=usage,
            choices=[CompletionChoice(index=idx, text="".join(ch.text), logprobs=ch.logprobs,
                                      finish_reason=ch.finish_reason, stop_reason=ch.stop_reason,
                                      prompt_logprobs=prompt_json.get(idx))
                     for idx, ch in sorted(choices.items())])

    async def _stream(self, request: CompletionRequest, request_id: str, streams: list[RequestStream]
                      ) -> AsyncIterator[str]:
        n = request.n
        created = int(time.time())
        choices: dict[int, _Choice] = {}
        prompt_tokens: dict[int, int] = {}
        prompt_logprobs: dict[int, PromptLogprobs] = {}
        try:
            async for i, output in merge_streams(streams):
                prompt_tokens[i] = len(output.prompt_token_ids)
                if output.prompt_logprobs is not None:
                    prompt_logprobs[i] = output.prompt_logprobs
                events = []  # one write per output, however many choices it carries
                for k, c in enumerate(output.outputs):
                    text, logprobs, plp = self._update(request, choices.setdefault(i * n + c.index, _Choice()),
                                                       output, k, prompt_logprobs.get(i))
                    choice = choices[i * n + c.index]
                    events.append(sse(CompletionResponse(
                        id=request_id, created=created, model=self.ctx.model_name,
                        choices=[CompletionChoice(index=i * n + c.index, text=text, logprobs=logprobs,
                                                  finish_reason=choice.finish_reason if c.finish_reason else None,
                                                  stop_reason=choice.stop_reason, prompt_logprobs=plp)])))
                yield "".join(events)
            if request.include_usage:
                completion_tokens = sum(ch.num_tokens for ch in choices.values())
                total_prompt = sum(prompt_tokens.values())
                yield sse(CompletionResponse(id=request_id, created=created, model=self.ctx.model_name,
                                             choices=[], usage=UsageInfo(
                                                 prompt_tokens=total_prompt, completion_tokens=completion_tokens,
                                                 total_tokens=total_prompt + completion_tokens)))
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE


def _extend(acc: CompletionLogprobs | None, delta: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if delta is None:
        return acc
    if acc is None:
        return delta
    acc.tokens += delta.tokens
    acc.token_logprobs += delta.token_logprobs
    acc.top_logprobs += delta.top_logprobs
    acc.text_offset += delta.text_offset
    return acc
