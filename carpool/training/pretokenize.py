"""Token ids of a corpus split written once to a flat memory-mapped file, read back without copying.

Layout: `<prefix>.bin` is the concatenation of every document's ids as `<s> text </s>` (one document =
one file), little-endian uint16 when the vocabulary fits (< 65536 ids) else uint32; `<prefix>.json` is a
small header saying how to read it and what produced it (the tokenizer's hash, the corpus' hash), so a
model, a tokenizer and a token file that do not belong together are caught before training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

FORMAT = "carpool-tokens"
VERSION = 1


@dataclass(frozen=True)
class TokenFileMeta:
    dtype: str                # "uint16" | "uint32"
    num_tokens: int
    num_documents: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    tokenizer_sha256: str     # of tokenizer.json
    corpus_sha256: str        # the manifest's corpus hash ("" when the texts came from elsewhere)
    split: str


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2 ** 16 else np.dtype(np.uint32)


def paths_of(prefix_or_path: str) -> tuple[str, str]:
    """(bin path, meta path) for a prefix or either of the two file names."""
    base = prefix_or_path
    for ext in (".bin", ".json"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base + ".bin", base + ".json"


def tokenizer_sha256(tokenizer_dir: str) -> str:
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pretokenize(texts: Iterable[str], tokenizer_dir: str, out_prefix: str, split: str = "train",
                corpus_sha256: str = "", batch_size: int = 256) -> TokenFileMeta:
    """Tokenize every text as one document and write `<out_prefix>.bin/.json`; returns the header.
    The .bin is written under a temporary name and renamed with its header last, so a reader never sees
    a header that describes a half-written file."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer: {tokenizer_dir} has no bos/eos token; documents need both")
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    bin_path, meta_path = paths_of(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(bin_path)), exist_ok=True)
    backend = tok.backend_tokenizer
    num_tokens = num_docs = 0
    tmp = bin_path + ".tmp"
    bos = np.asarray([tok.bos_token_id], dtype=dtype).tobytes()
    eos = np.asarray([tok.eos_token_id], dtype=dtype).tobytes()
    with open(tmp, "wb") as f:
        batch: list[str] = []

        def flush() -> None:
            nonlocal num_tokens, num_docs
            # Special tokens are added by hand so the layout does not depend on the post-processor.
            for enc in backend.encode_batch(batch, add_special_tokens=False):
                ids = np.asarray(enc.ids, dtype=dtype)
                f.write(bos + ids.tobytes() + eos)
                num_tokens += len(ids) + 2
                num_docs += 1
            batch.clear()

        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                flush()
        flush()
    if num_tokens == 0:
        os.remove(tmp)
        raise ValueError(f"pretokenize: no documents to write for {out_prefix!r}")
    meta = TokenFileMeta(dtype=dtype.name, num_tokens=num_tokens, num_documents=num_docs, vocab_size=vocab_size,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                         tokenizer_sha256=tokenizer_sha256(tokenizer_dir), corpus_sha256=corpus_sha256,
                         split=split)
    os.replace(tmp, bin_path)
    _write_meta(meta, meta_path)
    return meta


def _write_meta(meta: TokenFileMeta, meta_path: str) -> None:
    with open(meta_path + ".tmp", "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **asdict(meta)}, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)


def write_token_file(tokens: np.ndarray, out_prefix: str, vocab_size: int, bos_token_id: int, eos_token_id: int,
                     pad_token_id: int, split: str = "train") -> TokenFileMeta:
    """A token file of ids that did not come from a tokenizer run (benchmarks' random tokens, tests)."""
    bin_path, meta_path = paths_of(out_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(bin_path)), exist_ok=True)
    np.asarray(tokens, dtype=token_dtype(vocab_size)).tofile(bin_path)
    meta = TokenFileMeta(dtype=token_dtype(vocab_size).name, num_tokens=len(tokens), num_documents=1,
                         vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, tokenizer_sha256="", corpus_sha256="", split=split)
    _write_meta(meta, meta_path)
    return meta


def read_meta(prefix_or_path: str) -> TokenFileMeta:
    bin_path, meta_path = paths_of(prefix_or_path)
    if not os.path.isfile(meta_path) or not os.path.isfile(bin_path):
        raise ValueError(f"token file: {bin_path} and its header {meta_path} must both exist "
                         "(write them with `carpool pretokenize`)")
    with open(meta_path) as f:
        d = json.load(f)
    if d.pop("format", None) != FORMAT or d.pop("version", None) != VERSION:
        raise ValueError(f"token file: {meta_path} is not a {FORMAT} v{VERSION} header")
    meta = TokenFileMeta(**d)
    expected = meta.num_tokens * np.dtype(meta.dtype).itemsize
    if os.path.getsize(bin_path) != expected:
        raise ValueError(f"token file: {bin_path} has {os.path.getsize(bin_path)} bytes, its header says "
                         f"{expected} ({meta.num_tokens} x {meta.dtype})")
    return meta


def open_tokens(prefix_or_path: str) -> tuple[np.ndarray, TokenFileMeta]:
    """The token ids as a read-only memory map (nothing is read until sliced) and the header."""
    meta = read_meta(prefix_or_path)
    bin_path, _ = paths_of(prefix_or_path)
    return np.memmap(bin_path, dtype=np.dtype(meta.dtype), mode="r", shape=(meta.num_tokens,)), meta
