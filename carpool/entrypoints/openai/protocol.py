"""OpenAI request and response bodies as pydantic models.

Requests are parsed strictly (a string is not a number, 1.5 is not an integer) and unknown fields are
ignored, as OpenAI does. Numeric bounds live in SamplingParams (one place, one message per field);
here only the sizes of lists and the shapes are bounded. Responses carry OpenAI's fields, plus vLLM's
`stop_reason`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from carpool.sampling_params import RequestOutputKind, SamplingParams

MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI accepts null for every optional field; where our type has no None, null = the default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls._non_nullable()}
        return data

    @classmethod
    def _non_nullable(cls) -> set[str]:
        return {name for name, f in cls.model_fields.items()
                if not f.is_required() and type(None) not in get_args(f.annotation) and f.annotation is not None}


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(_Request):
    """Fields shared by completions and chat (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = Field(default=None, max_length=1024)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError naming the field for any value out of bounds."""
        d = SamplingParams()
        return SamplingParams(
            n=self.n, temperature=_or(self.temperature, d.temperature), top_p=_or(self.top_p, d.top_p),
            top_k=_or(self.top_k, d.top_k), min_p=_or(self.min_p, d.min_p), seed=self.seed,
            presence_penalty=_or(self.presence_penalty, d.presence_penalty),
            frequency_penalty=_or(self.frequency_penalty, d.frequency_penalty),
            repetition_penalty=_or(self.repetition_penalty, d.repetition_penalty),
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


PromptInput = Union[str, list[int], list[str], list[list[int]]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = 16  # OpenAI's default for completions; null = up to max_model_len
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt or batch of prompts as a list (a list of ints is one tokenized prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        if len(p) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(p)}")
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if self.max_completion_tokens is None:
            return self._sampling_params(self.max_tokens, logprobs)
        try:
            return self._sampling_params(self.max_completion_tokens, logprobs)
        except ValueError as e:  # name the field the client actually sent
            if str(e).startswith("max_tokens:"):
                raise ValueError("max_completion_tokens:" + str(e)[len("max_tokens:"):]) from None
            raise


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses -----------------------------------------------------------------------------------
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(_Response):
    error: ErrorInfo


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_Response):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Response):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatStreamChoice(_Response):
    index: int
    delta: dict[str, str]  # {"role": ...} and/or {"content": ...}: only what this chunk adds
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(_Response):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "carpool"
    root: str | None = None
    max_model_len: int | None = None
    quantization: str | None = None  # carpool's: the quantization method; None = unquantized
    kv_cache_dtype: str | None = None  # carpool's: what the KV cache stores


class ModelList(_Response):
    object: str = "list"
    data: list[ModelCard]
