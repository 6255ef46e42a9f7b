"""Meta's Llama 3 tokenizer: 128,000 byte-level BPE ranks read by tiktoken, plus 256 special tokens.

The file `tokenizer.model` is plain text, one token a line: the token's bytes in
base64 and its rank, e.g. "IQ== 0" is b"!" with rank 0.  The rank is both the
token id and the merge priority: BPE repeatedly merges the adjacent pair whose
concatenation has the lowest rank.  Before merging, text is cut into chunks by a
regular expression (`SPLIT_PATTERN`, Meta's), so merges never cross e.g. a
word and the punctuation after it.

Special tokens follow the ranks: ids 128000..128255, names and order as in
Meta's llama-models `tokenizer.py`.  Only 12 are used; the rest are reserved.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
from pathlib import Path

import tiktoken

from llama3.checkpoint.files import atomic_file, write_json
from llama3.tokenizer.base import Tokenizer, TokenizerError, byte_to_unicode, unicode_to_byte

# Meta's split pattern: contractions, words (with one leading non-letter, e.g. " the"),
# numbers in groups of at most 3 digits, punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",        # 128000  bos
    "<|end_of_text|>",          # 128001  eos (end of a document)
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # 128004  padding
    "<|step_id|>",
    "<|start_header_id|>",      # 128006  chat: <|start_header_id|>role<|end_header_id|>\n\n
    "<|end_header_id|>",        # 128007
    "<|eom_id|>",               # 128008  end of message (the model called a tool and waits)
    "<|eot_id|>",               # 128009  end of turn
    "<|python_tag|>",           # 128010  start of a code-interpreter call
    "<|image|>",
]

# tiktoken's Rust core can panic on inputs over ~400k characters, and BPE on one
# very long run of (non-)whitespace is quadratic (openai/tiktoken#195); Meta cuts
# the input at these limits before encoding, and so do we.
MAX_ENCODE_CHARS = 400_000
MAX_SAME_KIND_RUN = 25_000


def special_token_names(num_base_tokens: int) -> dict[str, int]:
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))]
    return {name: num_base_tokens + i for i, name in enumerate(NAMED_SPECIAL_TOKENS + reserved)}


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """tokenizer.model -> {token bytes: rank}.  Malformed lines raise TokenizerError with the line number."""
    ranks: dict[bytes, int] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{path} is not a tiktoken BPE file (it is binary: a SentencePiece model? "
                             "Llama 1/2 tokenizers need their tokenizer.json)") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}; "
                                 "the file is not a tiktoken BPE file or is corrupt") from None
    if not ranks:
        raise TokenizerError(f"{path} holds no tokens")
    return ranks


def is_tiktoken_file(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a tiktoken BPE file (text, first line '<base64> <int>')."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1000).split()
        return len(first) == 2 and first[1].isdigit() and bool(base64.b64decode(first[0], validate=True))
    except (OSError, ValueError, binascii.Error):
        return False


def split_long_input(text: str) -> list[str]:
    """Cut text into pieces tiktoken handles safely: at most MAX_ENCODE_CHARS characters each,
    and no run of more than MAX_SAME_KIND_RUN consecutive whitespace or non-whitespace characters.

    Cutting inside such a run changes the tokens only at the cut, and only for
    inputs no real text contains (25,000 characters without a space).
    """
    pieces = []
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start:start + MAX_ENCODE_CHARS]
        piece_start, run, run_is_space = 0, 0, window[:1].isspace()
        for i, ch in enumerate(window):
            is_space = ch.isspace()
            if is_space != run_is_space:
                run, run_is_space = 1, is_space
                continue
            run += 1
            if run > MAX_SAME_KIND_RUN:
                pieces.append(window[piece_start:i])
                piece_start, run = i, 1
        pieces.append(window[piece_start:])
    return pieces


class Llama3Tokenizer(Tokenizer):
    """Meta's Llama 3 tokenizer (Llama 3, 3.1, 3.2, 3.3): tiktoken BPE + 256 special tokens."""

    def __init__(self, model_path: str | os.PathLike, chat_template: str | None = None):
        from llama3.tokenizer.chat import Llama3HeaderFormat, JinjaChatFormat

        self.model_path = Path(model_path)
        ranks = read_ranks(self.model_path)
        self.special_tokens = special_token_names(len(ranks))
        self.encoding = tiktoken.Encoding(name=self.model_path.name, pat_str=SPLIT_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = len(ranks) + NUM_SPECIAL_TOKENS  # 128,256 for Llama 3
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = [self.special_tokens[t] for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")]
        self.add_bos = True
        self.chat_template = chat_template
        self.chat_format = (JinjaChatFormat(chat_template, self.template_variables()) if chat_template
                            else Llama3HeaderFormat())
        self._names = {i: name for name, i in self.special_tokens.items()}

    def template_variables(self) -> dict[str, str]:
        return {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        for piece in split_long_input(text):
            if allow_special:
                ids.extend(self.encoding.encode(piece, allowed_special="all"))
            else:  # special-token text is ordinary text
                ids.extend(self.encoding.encode(piece, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids) -> str:
        ids = [self.check_id(i) for i in ids]
        return self.encoding.decode(ids)  # invalid UTF-8 (half a character) -> U+FFFD

    def token_bytes(self, i: int) -> bytes:
        return self.encoding.decode_single_token_bytes(self.check_id(i))

    def id_to_piece(self, i: int) -> str:
        i = self.check_id(i)
        if i in self._names:
            return self._names[i]
        alphabet = byte_to_unicode()
        return "".join(alphabet[b] for b in self.token_bytes(i))

    def piece_to_id(self, piece: str) -> int:
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        try:
            return self.encoding.encode_single_token(bytes(unicode_to_byte()[c] for c in piece))
        except (KeyError, ValueError):
            raise TokenizerError(f"{piece!r} is not a token of this vocabulary "
                                 "(pieces are spelled in GPT-2's byte alphabet: 'Ġthe' for ' the')") from None

    def gguf_vocab(self) -> dict:
        """This vocabulary as GGUF metadata (for writing .gguf files)."""
        from llama3.tokenizer.gguf_vocab import gguf_vocab_of_tiktoken

        return gguf_vocab_of_tiktoken(self)

    def save(self, folder: str | os.PathLike) -> None:
        """Copy tokenizer.model into `folder` (+ tokenizer_config.json when there is a chat template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "tokenizer.model"
        if target.resolve() != self.model_path.resolve():
            with atomic_file(target) as tmp:
                shutil.copyfile(self.model_path, tmp)
        if self.chat_template:
            write_json(folder / "tokenizer_config.json", {
                **self.template_variables(), "add_bos_token": True, "chat_template": self.chat_template},
                ensure_ascii=False)
