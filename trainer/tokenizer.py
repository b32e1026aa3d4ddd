"""A local tokenizer for the synthetic task: built with ``tokenizers``, no download, wrapped for transformers.

Characters are the base vocabulary (printable ASCII and the newline), so any text made of them
round-trips exactly through ``encode``/``decode``. The pieces the trainer looks for are single
tokens on top: ``</think>`` (``Delimiters.from_tokenizer`` requires it), EOS, the inserted
delimiter's pieces (``...``, ``\\n\\n``, ``**Final Answer**``, ``\\boxed{``) and the task's frequent
words, so traces stay short. A minimal chat template makes prompt construction treat it like a
model's tokenizer.

It is a byte-level BPE without merges, the form of a Qwen2 tokenizer: a checkpoint of the demo (a
Qwen2 model) loaded with plain ``AutoTokenizer.from_pretrained`` comes back as ``Qwen2Tokenizer``,
which keeps only the saved vocabulary, merges and added tokens and rebuilds a byte-level
pre-tokenizer and decoder around them; with the characters spelled in the byte-level alphabet
(space as ``Ġ``, newline as ``Ċ``) that rebuilt tokenizer gives the same ids as this one. Characters
outside the vocabulary have no token and are dropped, here and in that rebuilt tokenizer alike.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trainer.text_markers import FINAL_ANSWER_HEADER, INSTRUCTION, THINK_END, THINK_START

PAD = "<|pad|>"
EOS = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (PAD, EOS, USER, ASSISTANT)
# Matched before the character split, longest first, so "\n\n" wins over "\n".
PIECES = (
    THINK_START,
    THINK_END,
    FINAL_ANSWER_HEADER,
    "\\boxed{",
    "...",
    "\n\n",
    "Start at ",
    "Add ",
    "Subtract ",
    "Multiply by ",
    "check: ",
    "modulo 100",
    INSTRUCTION,
)
BASE_CHARACTERS = (*(chr(code) for code in range(32, 127)), "\n")
# The whole text as one word (no regex split): without merges the split would not change any id.
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n<think>\n' }}{% endif %}"
)


def byte_level_spelling(text: str) -> str:
    """How a byte-level BPE vocabulary spells ``text``: each UTF-8 byte as one printable character
    (GPT-2's table, as the byte-level pre-tokenizer applies it: space -> ``Ġ``, newline -> ``Ċ``)."""
    return "".join(piece for piece, _ in _BYTE_LEVEL.pre_tokenize_str(text))


def build_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """The synthetic task's tokenizer (vocabulary: specials, pieces, then characters; ids are stable)."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *PIECES, *(byte_level_spelling(character) for character in BASE_CHARACTERS)):
        vocab.setdefault(token, len(vocab))
    # No merges: every character outside the added pieces is its own token.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = _BYTE_LEVEL
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(piece, normalized=False) for piece in PIECES])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tokenizer(directory: str | Path) -> Path:
    """Write the tokenizer to ``directory`` so ``AutoTokenizer.from_pretrained(directory)`` loads it offline."""
    path = Path(directory)
    build_tokenizer().save_pretrained(path)
    return path
