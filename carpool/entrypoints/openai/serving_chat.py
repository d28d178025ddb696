"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> token ids -> n choices.

The template is rendered to text and tokenized without adding special tokens (templates write their own
BOS), so the prompt is exactly what the template says. Streams start with one role chunk per choice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import Response

from carpool.engine.request_stream import RequestStream
from carpool.entrypoints.openai.errors import APIError
from carpool.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    PromptLogprobsJSON,
    UsageInfo,
)
from carpool.entrypoints.openai.serving import (
    SSE_DONE,
    OpenAIServing,
    chat_logprobs,
    merge_streams,
    sse,
    sse_error,
    vllm_prompt_logprobs,
)
from carpool.outputs import CompletionOutput


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[ChatTokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def special_token_texts(tokenizer: Any) -> list[str]:
    """The text of every special token ("<s>", "<|im_start|>", ...): what user text must not turn into."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token))
    return sorted(t for t in texts if t)


def render_chat_prompt(tokenizer: Any, messages: Sequence[ChatMessage], add_generation_prompt: bool,
                       splitting_tokenizer: Any | None = None) -> list[int]:
    """Token ids of the conversation under the tokenizer's chat template (APIError 400 if impossible).

    The roles' markers and BOS come from the template only: text inside a message never becomes a
    special token. When no message holds a special token's text (the common case), the rendered text is
    tokenized in one piece, exactly as the model's own tooling does. Otherwise the template is rendered
    again with a marker in place of each content, its pieces are tokenized as they are and each content
    with special tokens split (tokenizing in pieces may differ from one piece at the seams, which only
    such requests can see). `splitting_tokenizer` is the tokenizer's splitting copy
    (serving.splitting_copy), made here if not given."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "messages: this model has no chat template; use /v1/completions", "messages")
    specials = special_token_texts(tokenizer)
    for i, m in enumerate(messages):
        if m.name and any(sp in m.name for sp in specials):
            raise APIError(400, f"messages.{i}.name: must not contain special-token text", "messages")
    contents = [m.text() for m in messages]
    text = _apply_template(tokenizer, messages, contents, add_generation_prompt)
    if not any(sp in c for c in contents for sp in specials):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    nonce = uuid.uuid4().hex
    markers = [f"\ue000{nonce}:{i}\ue001" for i in range(len(contents))]
    pieces = _split_at_markers(_apply_template(tokenizer, messages, markers, add_generation_prompt), markers)
    rendered = _rendered_contents(text, pieces, contents)
    if pieces is None or rendered is None:
        raise APIError(400, "messages: a message contains special-token text and this model's chat template "
                            "transforms message content, so it cannot be tokenized safely", "messages")
    if splitting_tokenizer is None:
        from carpool.entrypoints.openai.serving import splitting_copy

        splitting_tokenizer = splitting_copy(tokenizer)
    ids: list[int] = []
    for piece, content in zip(pieces, rendered + [""]):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        if content:
            ids += splitting_tokenizer(content, add_special_tokens=False)["input_ids"]
    return ids


def _apply_template(tokenizer: Any, messages: Sequence[ChatMessage], contents: list[str],
                    add_generation_prompt: bool) -> str:
    import jinja2

    conversation = [{"role": m.role, "content": c, **({"name": m.name} if m.name else {})}
                    for m, c in zip(messages, contents)]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:  # the template rejected the conversation (e.g. role order)
        raise APIError(400, f"messages: the chat template rejected the conversation: {e}", "messages") from None


def _split_at_markers(text: str, markers: list[str]) -> list[str] | None:
    """The template's text around each content marker, or None unless each appears once, in order."""
    pieces, pos = [], 0
    for marker in markers:
        at = text.find(marker, pos)
        if at < 0 or text.find(marker, at + 1) >= 0:
            return None
        pieces.append(text[pos:at])
        pos = at + len(marker)
    return pieces + [text[pos:]]


def _rendered_contents(text: str, pieces: list[str] | None, contents: list[str]) -> list[str] | None:
    """Each content as it appears in the real rendering between the template's pieces (templates may
    trim it), or None if the rendering is not pieces and contents interleaved."""
    if pieces is None or not text.startswith(pieces[0]):
        return None
    pos, out = len(pieces[0]), []
    for content, after in zip(contents, pieces[1:]):
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(candidate + after, pos):
                out.append(candidate)
                pos += len(candidate) + len(after)
                break
        else:
            return None
    return out if pos == len(text) else None


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, raw: Request) -> Response:
        request = await self.parse_body(raw, ChatCompletionRequest)
        params = self.sampling_params(request.to_sampling_params)
        prompt_ids = await self.render_messages(request.messages, request.add_generation_prompt)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.submit(request_id, [prompt_ids], params, field_names={
            "max_tokens": request.max_tokens_field, "prompt": "messages", "prompt_token_ids": "messages"})
        num_top = request.top_logprobs or 0
        return await self.respond(raw, streams, bool(request.stream),
                                  lambda: self._stream(request, request_id, streams, num_top),
                                  lambda: self._collect(request, request_id, streams, num_top))

    @staticmethod
    def _update(choice: _Choice, c: CompletionOutput, num_top: int) -> list[ChatTokenLogprob] | None:
        choice.text.append(c.text)
        choice.num_tokens += len(c.token_ids)
        if c.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
        return chat_logprobs(c.token_ids, c.logprobs, num_top) if c.logprobs is not None else None

    def _usage(self, prompt_tokens: int, choices: dict[int, _Choice]) -> UsageInfo:
        completion_tokens = sum(ch.num_tokens for ch in choices.values())
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    async def _collect(self, request: ChatCompletionRequest, request_id: str, streams: list[RequestStream],
                       num_top: int) -> ChatCompletionResponse:
        choices: dict[int, _Choice] = {}
        prompt_tokens = 0
        prompt_logprobs = None
        async for _, output in merge_streams(streams):
            prompt_tokens = len(output.prompt_token_ids)
            prompt_logprobs = prompt_logprobs or output.prompt_logprobs
            for c in output.outputs:
                choice = choices.setdefault(c.index, _Choice())
                logprobs = self._update(choice, c, num_top)
                if logprobs is not None:
                    choice.logprobs = (choice.logprobs or []) + logprobs
        return ChatCompletionResponse(
            id=request_id, model=self.ctx.model_name, usage=self._usage(prompt_tokens, choices),
            prompt_logprobs=vllm_prompt_logprobs(prompt_logprobs) if prompt_logprobs is not None else None,
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content="".join(ch.text)),
                                logprobs=ChatLogprobs(content=ch.logprobs) if request.logprobs else None,
                                finish_reason=ch.finish_reason, stop_reason=ch.stop_reason)
                     for i, ch in sorted(choices.items())])

    async def _stream(self, request: ChatCompletionRequest, request_id: str, streams: list[RequestStream],
                      num_top: int) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.ctx.model_name

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None,
                  prompt_logprobs: PromptLogprobsJSON | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                           usage=usage, prompt_logprobs=prompt_logprobs))

        choices: dict[int, _Choice] = {}
        prompt_tokens = 0
        try:
            yield "".join(chunk([ChatStreamChoice(index=i, delta={"role": "assistant", "content": ""})])
                          for i in range(request.n))
            async for _, output in merge_streams(streams):
                prompt_tokens = len(output.prompt_token_ids)
                prompt_json = (vllm_prompt_logprobs(output.prompt_logprobs)
                               if output.prompt_logprobs is not None else None)  # (DELTA: in one output only)
                events = []  # one write per output, however many choices it carries
                for c in output.outputs:
                    logprobs = self._update(choices.setdefault(c.index, _Choice()), c, num_top)
                    events.append(chunk([ChatStreamChoice(
                        index=c.index, delta={"content": c.text},
                        logprobs=ChatLogprobs(content=logprobs) if request.logprobs else None,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)], prompt_logprobs=prompt_json))
                    prompt_json = None
                yield "".join(events)
            if request.include_usage:
                yield chunk([], self._usage(prompt_tokens, choices))
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE
