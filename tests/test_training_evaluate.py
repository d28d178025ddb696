"""The Python-completion measure of `carpool eval`: which prompts it gives and what it counts as a function."""

from __future__ import annotations

import hashlib

from carpool.training.corpus import CorpusFile, CorpusSource, Manifest
from carpool.training.evaluate import cut_at_function_end, function_prompts, parses

SOURCE = '''import os


def first(path: str,
          n: int) -> str:
    """Docstring."""
    return path[:n]


class A:
    @property
    def second(self):
        return 2
'''


def _manifest(tmp_path) -> Manifest:
    (tmp_path / "mod.py").write_text(SOURCE)
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()
    return Manifest((CorpusSource("src", "1", "MIT", str(tmp_path)),),
                    (CorpusFile("src", "mod.py", digest, len(SOURCE), "heldout"),), 0.5, "3", "x")


def test_prompts_stop_at_the_header_colon_not_at_a_bare_newline(tmp_path):
    prompts = sorted(function_prompts(_manifest(tmp_path), count=2), key=lambda p: p.name)
    assert [p.name for p in prompts] == ["first", "second"]
    assert prompts[0].prompt == "def first(path: str,\n          n: int) -> str:"
    assert prompts[1].prompt == "def second(self):"  # dedented, decorator left out


def test_the_function_ends_at_the_first_column_0_line_after_the_header():
    header = "def f(a,\n      b):"
    source, ended = cut_at_function_end(header, "  # note\n    return a\n\n    \nx = 1\ndef g(): pass\n")
    assert ended and source == "def f(a,\n      b):  # note\n    return a\n\n    \n"
    assert parses(source)


def test_an_unfinished_function_loses_its_last_partial_line():
    source, ended = cut_at_function_end("def f():", "\n    x = 1\n    return (x")
    assert not ended and source == "def f():\n    x = 1\n" and parses(source)
    header_only, ended = cut_at_function_end("def f():", "")
    assert not ended and header_only == "def f():" and not parses(header_only)
