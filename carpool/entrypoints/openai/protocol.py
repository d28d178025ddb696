"""OpenAI request and response bodies as pydantic models.

Requests are parsed strictly (a string is not a number, 1.5 is not an integer) and unknown fields are
ignored, as OpenAI does, except the fields OpenAI or vLLM define that carpool does not implement
(`tools`, `response_format`, ...): a request that sets one of those is refused with a 400 naming it,
so that a client asking for JSON mode never silently gets free text. Numeric bounds live in
SamplingParams (one place, one message per field); here only the sizes of lists and the shapes are
bounded. Error messages name the field in the client's terms and echo at most a short prefix of a
value (`describe`). Responses carry OpenAI's fields, plus vLLM's `stop_reason` and `prompt_logprobs`.
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from carpool.sampling_params import RequestOutputKind, SamplingParams

MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_MESSAGES = 1024
MAX_CONTENT_PARTS = 256
ECHO_CHARS = 40  # at most this much of a client's value is quoted back in an error message


def describe(value: Any) -> str:
    """A value as an error message may quote it: its JSON type, and a short prefix of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({short(value)})"
    if isinstance(value, float):
        return f"a number ({short(value)})"
    if isinstance(value, str):
        return f"a string ({short(value)})"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    return "an object"


def short(value: Any, limit: int = ECHO_CHARS) -> str:
    """repr(value) cut to `limit` characters; an integer too long to print is described by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return f"{text[:limit]}... ({len(text)} characters)"


def invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is exactly `message` (pydantic prefixes the field's path)."""
    return PydanticCustomError("invalid", "{message}", {"message": message})


class UnsupportedFieldError(Exception):
    """A request set a field that carpool does not implement. Deliberately not a ValueError: pydantic
    lets it through unwrapped, and the server answers 400 naming the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: not supported by carpool ({reason}); remove the field or send null")
        self.field = field


def _is_noop(value: Any) -> bool:
    """Values that ask for nothing: sending them for an unsupported field changes nothing."""
    return value is None or value is False or value == [] or value == {} or value == ""


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    # Fields that OpenAI or vLLM define and carpool does not implement: name -> what is missing. Setting
    # one to anything but a no-op value (`_is_noop`, `_noop_values`) is a 400 naming it.
    _unsupported: ClassVar[dict[str, str]] = {}
    _noop_values: ClassVar[dict[str, tuple[Any, ...]]] = {}
    _top_level: ClassVar[bool] = False  # a request body (its fields are the `param` of an error)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI accepts null for every optional field; where our type has no None, null = the default.
        Unsupported fields are refused here, before `extra="ignore"` would drop them silently."""
        if isinstance(data, dict):
            for name, reason in cls._unsupported.items():
                if name in data and not _is_noop(data[name]) and data[name] not in cls._noop_values.get(name, ()):
                    if cls._top_level:
                        raise UnsupportedFieldError(name, reason)
                    raise invalid(str(UnsupportedFieldError(name, reason)))  # pydantic prefixes where it is
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

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
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
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


PromptInput = Union[str, list[int], list[str], list[list[int]]]
_PROMPT_SHAPES = "a string, a list of strings, a list of token ids (integers) or a list of token-id lists"


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_PROMPT_ADAPTER: TypeAdapter[PromptInput] = TypeAdapter(PromptInput, config=ConfigDict(strict=True))


def check_prompt(p: Any) -> PromptInput:
    """The `prompt` of /v1/completions. A valid one passes pydantic's (Rust) union check at once; an
    invalid one is then checked by hand, since the union's generic message ("should be a valid string")
    would not say which item is wrong."""
    if isinstance(p, str):
        return p
    try:
        valid = _PROMPT_ADAPTER.validate_python(p)
        if valid and all(valid):  # (an empty prompt in a batch is reported below)
            return valid
    except ValidationError:
        pass
    if not isinstance(p, list):
        raise invalid(f"must be {_PROMPT_SHAPES}; got {describe(p)}")
    if not p:
        raise invalid("must not be empty")
    first = p[0]
    if _is_token(first):
        for i, t in enumerate(p):
            if not _is_token(t):
                raise invalid(f"item {i} is {describe(t)}, but item 0 is a token id: a token-id prompt holds "
                              "integers only")
        return p
    if len(p) > MAX_PROMPTS:
        raise invalid(f"at most {MAX_PROMPTS} prompts in one request, got {len(p)}")
    if isinstance(first, str):
        for i, t in enumerate(p):
            if not isinstance(t, str):
                raise invalid(f"item {i} is {describe(t)}, but item 0 is a string: a batch of text prompts "
                              "holds strings only")
            if not t:
                raise invalid(f"prompt {i} of the batch is empty")
        return p
    if isinstance(first, list):
        for i, ids in enumerate(p):
            if not isinstance(ids, list):
                raise invalid(f"item {i} is {describe(ids)}, but item 0 is a list: a batch of token-id prompts "
                              "holds lists of integers only")
            if not ids:
                raise invalid(f"prompt {i} of the batch is empty")
            bad = next((j for j, t in enumerate(ids) if not _is_token(t)), None)
            if bad is not None:
                raise invalid(f"prompt {i} of the batch: item {bad} is {describe(ids[bad])}; token ids are "
                              "integers")
        return p
    raise invalid(f"item 0 is {describe(first)}; a list prompt is {_PROMPT_SHAPES}")


# vLLM's guided decoding and other engine features carpool does not have, shared by both endpoints.
_UNSUPPORTED_SAMPLING = {
    "response_format": "structured output (JSON mode) is not implemented",
    "guided_json": "guided decoding is not implemented", "guided_regex": "guided decoding is not implemented",
    "guided_choice": "guided decoding is not implemented", "guided_grammar": "guided decoding is not implemented",
    "structured_outputs": "structured output is not implemented",
    "logit_bias": "logit bias is not implemented",
    "best_of": "best_of is not implemented; use n", "use_beam_search": "beam search is not implemented",
    "allowed_token_ids": "token allow-lists are not implemented", "bad_words": "bad words are not implemented",
    "truncate_prompt_tokens": "prompt truncation is not implemented; shorten the prompt",
    "logits_processors": "custom logits processors are not implemented",
    "return_tokens_as_token_ids": "token-id logprob keys are not implemented",
    "prompt_embeds": "embedding prompts are not implemented",
    "store": "stored completions are not implemented", "metadata": "stored completions are not implemented",
}


class CompletionRequest(_SamplingRequest):
    _top_level = True
    _unsupported = {**_UNSUPPORTED_SAMPLING, "suffix": "insertion (suffix) is not implemented"}
    _noop_values = {"response_format": ({"type": "text"},), "best_of": (1,)}

    prompt: Any
    max_tokens: int | None = 16  # OpenAI's default for completions; null = up to max_model_len
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's: logprobs of the prompt tokens (first entry null)
    add_special_tokens: bool = True  # vLLM's: add the tokenizer's BOS etc. to a text prompt

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, p: Any) -> PromptInput:
        return check_prompt(p)

    def prompts(self) -> list[str | list[int]]:
        """The prompt or batch of prompts as a list (a list of ints is one tokenized prompt)."""
        p = self.prompt
        if isinstance(p, str) or _is_token(p[0]):
            return [p]
        return list(p)

    @property
    def scores_prompt_only(self) -> bool:
        """max_tokens 0 with echo: the prompt and its logprobs only, nothing generated (as vLLM answers)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self) -> SamplingParams:
        """Echo with logprobs scores the prompt too (prompt logprobs, as many alternatives as `logprobs`).
        To score the prompt only, the engine generates one token that the response leaves out."""
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be at least 1; 0 is allowed only with echo (to score the prompt)")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        return self._sampling_params(1 if self.scores_prompt_only else self.max_tokens, self.logprobs,
                                     prompt_logprobs)


_PART_TYPES = {"image_url": "images", "input_audio": "audio", "file": "files", "video_url": "video"}


def check_content(content: Any) -> str | None:
    """A message's content as one string: a string, null, or a list of text parts (joined)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"must be a string or a list of text parts; got {describe(content)}")
    if len(content) > MAX_CONTENT_PARTS:
        raise invalid(f"at most {MAX_CONTENT_PARTS} parts, got {len(content)}")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"has type {short(kind)}" if isinstance(part, dict) else f"is {describe(part)}"
            media = _PART_TYPES.get(kind) if isinstance(kind, str) else None
            why = f"{media} are not supported: carpool serves text-only models" if media else \
                "only text parts ({\"type\": \"text\", \"text\": ...}) are supported"
            raise invalid(f"part {i} {what}; {why}")
        if not isinstance(part.get("text"), str):
            raise invalid(f"part {i} needs a string `text`, got {describe(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


class ChatMessage(_Request):
    _unsupported = {"tool_calls": "function calling is not implemented",
                    "function_call": "function calling is not implemented",
                    "audio": "audio is not supported: carpool serves text-only models"}

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # str | None after validation
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, content: Any) -> str | None:
        return check_content(content)

    def text(self) -> str:
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    _top_level = True
    _unsupported = {
        **_UNSUPPORTED_SAMPLING,
        "tools": "function calling is not implemented", "tool_choice": "function calling is not implemented",
        "functions": "function calling is not implemented", "function_call": "function calling is not implemented",
        "audio": "audio output is not supported", "modalities": "only text output is supported",
        "prediction": "predicted outputs are not implemented",
        "web_search_options": "web search is not implemented",
        "reasoning_effort": "reasoning controls are not implemented",
        "chat_template": "per-request chat templates are not supported",
        "chat_template_kwargs": "per-request chat template arguments are not supported",
        "documents": "documents are not supported", "continue_final_message": "continuing a message is not supported",
        "echo": "echo is not supported for chat; use /v1/completions",
    }
    _noop_values = {"response_format": ({"type": "text"},), "best_of": (1,), "tool_choice": ("none",),
                    "modalities": (["text"],)}

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    prompt_logprobs: int | None = None  # vLLM's: logprobs of the prompt tokens, in the response's top level

    @property
    def max_tokens_field(self) -> str:
        """The name the client used for the output length (errors about it use this name)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        try:
            return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs)
        except ValueError as e:  # name the field the client actually sent
            raise ValueError(rename_field(str(e), {"max_tokens": self.max_tokens_field,
                                                   "logprobs": "top_logprobs"})) from None


def rename_field(message: str, names: dict[str, str]) -> str:
    """An engine error message ("max_tokens: ...") in the client's terms: every engine field name it
    mentions, as a whole word, replaced by the name this endpoint's client used."""
    if not names:
        return message
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return pattern.sub(lambda m: names[m.group(1)], message)


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


# vLLM's prompt_logprobs as JSON: null for the first token, then {token id: {"logprob", "rank",
# "decoded_token"}} (plain dicts: a long prompt has tens of thousands of entries).
PromptLogprobsJSON = list[Union[dict[str, dict[str, Any]], None]]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsJSON | None = None


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
    prompt_logprobs: PromptLogprobsJSON | None = None


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
    prompt_logprobs: PromptLogprobsJSON | None = None  # in the first chunk with content, if asked for


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
