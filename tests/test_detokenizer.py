"""Incremental detokenization with the byte-level tokenizer: every UTF-8 byte is its own token, so a
multi-byte character always spans several tokens."""

from __future__ import annotations

import pytest

from carpool.demo import build_byte_tokenizer
from carpool.engine.detokenizer import IncrementalDetokenizer, fast_decoder
from carpool.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def feed(tok, text: str, params: SamplingParams,
         prompt: str = "hi") -> tuple[IncrementalDetokenizer, list[str], str | None]:
    det = IncrementalDetokenizer(tok, tok(prompt)["input_ids"], params)
    deltas, stop = [], None
    ids = list(text.encode())
    for i, t in enumerate(ids):
        stop = det.update([t], finished=i == len(ids) - 1)
        deltas.append(det.text_delta(finished=stop is not None or i == len(ids) - 1))
        if stop:
            break
    return det, deltas, stop


def test_multibyte_characters_are_emitted_whole(tok):
    text = "añb€c😀d"
    det, deltas, _ = feed(tok, text, SamplingParams())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert det.output_text == text


def test_stop_string_across_token_boundaries_is_cut(tok):
    det, deltas, stop = feed(tok, "abc STOP def", SamplingParams(stop=["STOP"]))
    assert stop == "STOP"
    assert det.output_text == "abc "
    assert "".join(deltas) == "abc "


def test_stop_string_can_be_kept(tok):
    det, _, stop = feed(tok, "abc STOP def", SamplingParams(stop=["STOP"], include_stop_str_in_output=True))
    assert det.output_text == "abc STOP"


def test_partial_stop_string_is_held_back_while_streaming(tok):
    det = IncrementalDetokenizer(tok, [256], SamplingParams(stop=["xyz"]))
    det.update(list(b"abxy"), finished=False)
    assert det.text_delta(finished=False) == "ab"  # the last len("xyz") - 1 characters wait
    det.update(list(b"q"), finished=False)
    assert det.text_delta(finished=False) == "x"
    det.update(list(b"!"), finished=True)
    assert det.text_delta(finished=True) == "yq!"


def test_earliest_of_several_stop_strings_wins(tok):
    det, _, stop = feed(tok, "one two three", SamplingParams(stop=["three", "two"]))
    assert stop == "two" and det.output_text == "one "


def test_incomplete_character_at_the_end_is_flushed_when_finished(tok):
    det = IncrementalDetokenizer(tok, [256], SamplingParams())
    det.update([0xE2, 0x82], finished=False)  # first two bytes of "€"
    assert det.text_delta(finished=False) == ""
    det.update([0x41], finished=True)
    assert det.text_delta(finished=True).endswith("A")


@pytest.mark.parametrize("skip", [True, False])
def test_fast_decoder_equals_the_tokenizers_decode(tok, skip):
    import random

    rng = random.Random(0)
    decode = fast_decoder(tok)
    specials = [tok.bos_token_id, tok.eos_token_id]
    for _ in range(50):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(256) for _ in range(rng.randint(0, 12))]
        assert decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip)


def test_fast_decoder_keeps_the_python_decode_when_it_cleans_up_spaces(tok):
    class CleaningTokenizer:
        backend_tokenizer = tok.backend_tokenizer
        clean_up_tokenization_spaces = True

        def decode(self, ids, skip_special_tokens):
            return "cleaned"

    assert fast_decoder(CleaningTokenizer())([65], True) == "cleaned"
