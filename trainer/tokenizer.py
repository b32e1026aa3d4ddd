"""A local tokenizer for the synthetic task: built with ``tokenizers``, no download, wrapped for transformers.

Characters are the base vocabulary (printable ASCII and the newline), so any text round-trips
exactly through ``encode``/``decode``. The pieces the trainer looks for are single tokens on top:
``</think>`` (``Delimiters.from_tokenizer`` requires it), EOS, the inserted delimiter's pieces
(``...``, ``\\n\\n``, ``**Final Answer**``, ``\\boxed{``) and the task's frequent words, so traces
stay short. A minimal chat template makes prompt construction treat it like a model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
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
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n<think>\n' }}{% endif %}"
)


def build_tokenizer(chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """The synthetic task's tokenizer (vocabulary: specials, pieces, then characters; ids are stable)."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *PIECES, *BASE_CHARACTERS):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
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
