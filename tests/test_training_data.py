"""Training data: the corpus manifest, the BPE tokenizer, the token file and the packed loader."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from carpool.training.corpus import (
    PSF_LICENSE,
    STDLIB,
    CorpusFile,
    CorpusSource,
    Manifest,
    build_manifest,
    is_heldout,
    read_document,
)
from carpool.training.data import IGNORE_INDEX, PackedLoader, eval_batches
from carpool.training.pretokenize import open_tokens, pretokenize, token_dtype

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n    y: int = 0\n",
         "import os\nprint(os.getcwd())  # café ✓\n"] * 4


@pytest.fixture(scope="module")
def stdlib_manifest() -> Manifest:
    return build_manifest(heldout_fraction=0.05)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from carpool.training.tokenizer_trainer import train_bpe_tokenizer

    path = str(tmp_path_factory.mktemp("tok"))
    train_bpe_tokenizer(TEXTS, vocab_size=300).save_pretrained(path)
    return path


def test_manifest_records_each_stdlib_file_with_its_hash_and_the_psf_license(stdlib_manifest):
    assert stdlib_manifest.source(STDLIB).license == PSF_LICENSE
    root = stdlib_manifest.source(STDLIB).root
    by_path = {f.path: f for f in stdlib_manifest.files}
    entry = by_path["json/__init__.py"]
    with open(os.path.join(root, "json", "__init__.py"), "rb") as f:
        assert entry.sha256 == hashlib.sha256(f.read()).hexdigest()
    assert len({f.sha256 for f in stdlib_manifest.files}) == len(stdlib_manifest.files)  # deduplicated


def test_heldout_split_is_decided_by_content_hash(stdlib_manifest):
    assert all(f.split == ("heldout" if is_heldout(f.sha256, 0.05) else "train") for f in stdlib_manifest.files)
    again = build_manifest(heldout_fraction=0.05)
    assert again.corpus_sha256 == stdlib_manifest.corpus_sha256
    assert 0 < len(stdlib_manifest.files_of("heldout")) < len(stdlib_manifest.files_of("train"))


def test_package_source_carries_the_distributions_license():
    manifest = build_manifest(include_stdlib=False, packages=["tqdm"])
    (source,) = manifest.sources
    assert source.name == "tqdm" and "MIT" in source.license
    assert manifest.files and all(f.path.endswith(".py") for f in manifest.files)


def test_changed_corpus_file_is_refused(tmp_path):
    path = tmp_path / "a.py"
    path.write_text("x = 1\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest = Manifest((CorpusSource("local", "0", "MIT", str(tmp_path)),),
                        (CorpusFile("local", "a.py", digest, 6, "train"),), 0.0, "3", "")
    assert read_document(manifest, manifest.files[0]) == "x = 1\n"
    path.write_text("x = 2\n")
    with pytest.raises(ValueError, match="changed"):
        read_document(manifest, manifest.files[0])


def test_trained_tokenizer_loads_with_autotokenizer_and_round_trips_bytes(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = "def f(λ):\n\treturn '日本' + \"\\x00\"  \n"  # unseen characters: byte fallback
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi\n<|assistant|>\n"


def test_token_file_holds_each_document_between_bos_and_eos(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    meta = pretokenize(TEXTS[:3], tokenizer_dir, str(tmp_path / "train"), batch_size=2)
    tokens, read_back = open_tokens(str(tmp_path / "train.bin"))
    assert read_back == meta and tokens.dtype == np.uint16 and meta.num_documents == 3
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokens.tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == meta.eos_token_id:
            assert ids[start] == meta.bos_token_id
            docs.append(tok.decode(ids[start + 1:i]))
            start = i + 1
    assert docs == TEXTS[:3] and start == len(ids)


def test_token_dtype_widens_past_65536_ids():
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def _seen_tokens(batches, limit: int) -> list[int]:
    """The tokens of the rows at global positions < limit: each row's inputs plus its last label."""
    out: list[int] = []
    for b in batches:
        for row, g in enumerate(b.global_positions):
            if 0 <= g < limit:
                labels = b.labels[row]
                out.extend(b.input_ids[row, :1].tolist() + labels[labels != IGNORE_INDEX].tolist())
    return out


def test_one_epoch_over_all_ranks_sees_every_token_exactly_once():
    tokens = np.arange(1000, dtype=np.uint16)  # every token unique
    world, loaders = 3, [PackedLoader(tokens, seq_len=15, batch_size=2, seed=7, rank=r, world_size=3)
                         for r in range(3)]
    num_sequences = loaders[0].num_sequences  # 63: the last one is padded
    steps = -(-num_sequences // (2 * world))
    seen = []
    for loader in loaders:
        seen += _seen_tokens([loader.next_batch() for _ in range(steps)], num_sequences)
    assert sorted(seen) == list(range(1000))


def test_loader_resumes_at_the_recorded_position():
    tokens = np.random.default_rng(0).integers(0, 500, 5000).astype(np.uint16)
    straight = PackedLoader(tokens, 31, 4, seed=1, rank=1, world_size=2)
    expected = [straight.next_batch() for _ in range(30)]  # crosses epoch boundaries (79 sequences)
    first = PackedLoader(tokens, 31, 4, seed=1, rank=1, world_size=2)
    for _ in range(11):
        first.next_batch()
    resumed = PackedLoader(tokens, 31, 4, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    for want in expected[11:]:
        got = resumed.next_batch()
        assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)


def test_loader_refuses_a_position_recorded_with_another_seed():
    tokens = np.arange(300, dtype=np.uint16)
    state = PackedLoader(tokens, 7, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(tokens, 7, 2, seed=2).load_state_dict(state)


def test_shuffle_order_follows_the_seed():
    tokens = np.arange(3000, dtype=np.uint16)
    a, b, c = (PackedLoader(tokens, 15, 8, seed=s).next_batch().input_ids for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_eval_batches_give_every_rank_the_same_number_of_batches():
    tokens = np.arange(200, dtype=np.uint16)  # 13 sequences of 15+1
    per_rank = [list(eval_batches(tokens, 15, 4, rank=r, world_size=3)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    seen = [t for batches in per_rank for t in _seen_tokens(batches, 10 ** 9)]
    assert sorted(seen) == list(range(200))
