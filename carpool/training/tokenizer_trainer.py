"""Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory.

Byte-level means every byte has a token, so any text (any file, any prompt) encodes with no unknown
token. The saved directory (tokenizer.json, tokenizer_config.json with bos/eos/pad and a chat template)
loads with `transformers.AutoTokenizer.from_pretrained`, which is what carpool's engine uses.

Token ids 0, 1, 2 are the special tokens (<s>, </s>, <pad>); the 256 byte tokens follow, then merges.
Encoding with special tokens prepends <s>; training documents are <s> text </s>.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
NUM_BYTE_TOKENS = 256

# A plain-text chat template: role markers are ordinary text, so a code model can be chatted with without
# reserved tokens it never saw in training.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                        model_max_length: int = 4096):  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens when the texts allow that many merges
    (at most `vocab_size`; a tiny corpus may run out of pairs to merge)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    floor = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise ValueError(f"vocab_size: must be an integer >= {floor} (specials + 256 bytes), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_nonempty(texts), trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                       special_tokens=[(BOS_TOKEN, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def save_tokenizer(tokenizer, path: str) -> str:  # noqa: ANN001 (a transformers tokenizer)
    tokenizer.save_pretrained(path)
    return path


def special_token_ids(tokenizer) -> dict[str, int]:  # noqa: ANN001
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
