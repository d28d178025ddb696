"""Incremental detokenization and stop strings.

Decoding one token at a time is wrong for byte-level vocabularies (a multi-byte character spans several
tokens) and for SentencePiece (a token's leading space depends on its neighbour). So each step decodes a
short window twice, with and without the new tokens, and emits the difference once it no longer ends in
an incomplete character (U+FFFD). Stop strings are searched in the text, across token boundaries; while
a request runs, the last len(longest stop) - 1 characters are held back from streaming so a stop string
is never half sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carpool.sampling_params import SamplingParams

_INCOMPLETE = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 4  # prompt tokens decoded as context for the first output token


def fast_decoder(tokenizer: Any) -> Callable[[list[int], bool], str]:
    """`tokenizer.decode` as a plain function of (ids, skip_special_tokens). For a fast (Rust) tokenizer
    that does no clean-up afterwards it calls the Rust decoder directly: the same text without the
    Python wrapper's argument handling, which cost ~4x the decode itself, and a server decodes every
    streamed token twice."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                          False):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams,
                 decode: Callable[[list[int], bool], str] | None = None) -> None:
        self.tokenizer = tokenizer
        self._decode_fn = decode or fast_decoder(tokenizer)
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.output_text = ""
        self.stop_strings: list[str] = list(params.stop or [])  # type: ignore[arg-type]
        self.hold_back = max((len(s) for s in self.stop_strings), default=1) - 1
        self._emitted = 0  # characters of output_text already returned as deltas

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, self.skip_special_tokens)

    def update(self, new_token_ids: list[int], finished: bool) -> str | None:
        """Append tokens; return the stop string if one now appears in the text (the text is then cut
        at it, keeping it when include_stop_str_in_output is set)."""
        self.ids.extend(new_token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (finished or not full.endswith(_INCOMPLETE)):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        else:
            delta = ""
        if not delta:
            return None
        self.output_text += delta
        return self._check_stop_strings(len(delta))

    def _check_stop_strings(self, new_chars: int) -> str | None:
        if not self.stop_strings:
            return None
        text = self.output_text
        search_from = max(0, len(text) - new_chars - self.hold_back)
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            idx = text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        self.output_text = text[:idx + len(stop)] if self.params.include_stop_str_in_output else text[:idx]
        return stop

    def text_delta(self, finished: bool) -> str:
        """Text not yet returned; holds back a possible stop-string prefix until the request ends."""
        end = len(self.output_text) if finished else max(self._emitted, len(self.output_text) - self.hold_back)
        delta = self.output_text[self._emitted:end]
        self._emitted = end
        return delta

    def text_so_far(self, finished: bool) -> str:
        end = len(self.output_text) if finished else max(0, len(self.output_text) - self.hold_back)
        return self.output_text[:end]
