"""The one tokenizer interface every vocabulary kind implements, and streaming decoding.

A tokenizer turns text into token ids (`encode`) and back (`decode`).  Three
kinds sit behind this interface:

    Llama3Tokenizer   Meta's tiktoken BPE file (`tokenizer.model`)      llama3_tiktoken.py
    HFTokenizer       a Hugging Face `tokenizer.json` folder             hf.py
                      and the vocabularies embedded in GGUF files        gguf_vocab.py

Chat formatting is not a tokenizer concern of its own: each tokenizer carries a
`chat_format` (chat.py) that turns a list of messages into ids.

Pieces: `id_to_piece` gives the token as the vocabulary spells it.  For byte-level
BPE (Llama 3, GPT-2, SmolLM2) that is GPT-2's printable byte alphabet, where a
space is "Ġ" and a newline "Ċ", so every token, even half of a UTF-8 character,
has a unique printable name; `token_bytes` gives the raw bytes.
"""

from __future__ import annotations

import operator
import os
from functools import lru_cache

from llama3.errors import Llama3Error


class TokenizerError(Llama3Error):
    """A tokenizer file is missing or malformed, or an id/piece/message is invalid."""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space,
    DEL, ...) map to U+0100 upwards in order, so b" " -> "Ġ" (U+0120), b"\\n" -> "Ċ".
    Byte-level BPE vocabularies (tokenizer.json, GGUF "gpt2") spell tokens this way.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def merges_from_priority(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merge rules recovered from a vocabulary that stores only a priority per token
    (tiktoken: the rank; SentencePiece/GGUF "llama": minus the score).

    Every way of writing a token as two shorter tokens becomes a rule; rules that make
    a higher-priority (lower value) token come first.  This is how transformers converts
    tiktoken and SentencePiece vocabularies to `tokenizers` BPE models.
    """
    rules = []
    for token, value in priority.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                rules.append((value, vocab[left], vocab[right], left, right))
    rules.sort()
    return [(left, right) for *_, left, right in rules]


class StreamDecoder:
    """Turns generated ids into text one token at a time, never emitting half a character.

    A UTF-8 character can span several tokens (a Chinese character is 3 bytes, an
    emoji 4, often split over 2-3 byte-level tokens).  Decoding each token alone
    would print U+FFFD replacement characters.  Instead we keep the ids of the
    text not yet printed plus a few before it (`prefix`: decoders such as
    SentencePiece's treat the first token of a sequence differently), decode that
    window, and print only the new part once it no longer ends in U+FFFD.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already printed; they give context
        self.read = 0    # ids[read:] are not printed yet

    def add(self, token_id: int) -> str:
        """Append one id; return the newly completed text ("" while a character is incomplete)."""
        self.ids.append(self.tokenizer.check_id(token_id))
        printed = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            new = text[len(printed):]
            self.prefix, self.read = self.read, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a genuinely invalid byte sequence comes out as U+FFFD)."""
        printed = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(printed):]


class Tokenizer:
    """The interface shared by all tokenizers (see the module docstring).

    Attributes set by subclasses:
        vocab_size      number of ids (base vocabulary + special/added tokens)
        bos_id, eos_id  begin/end-of-text ids (None when the vocabulary has none)
        pad_id          padding id or None
        stop_ids        ids that end generation by default (end of turn, end of text)
        special_tokens  name -> id of the special (control) tokens
        add_bos         whether `encode(text)` prepends bos by default
        chat_format     a chat.ChatFormat, or None when the tokenizer knows no chat format
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None = None
    stop_ids: list[int]
    special_tokens: dict[str, int]
    add_bos: bool = False
    chat_format = None

    # ---------------------------------------------------------- to implement
    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        """Plain text -> ids, no bos/eos."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Ids -> text.  Special tokens appear as their text (e.g. "<|eot_id|>")."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int:
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes token i stands for (a special token: its UTF-8 text)."""
        raise NotImplementedError

    def save(self, folder: str | os.PathLike) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- shared
    def encode(self, text: str, bos: bool | None = None, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> token ids.

        bos: prepend the begin-of-text id; None means this model's own default
             (True for Llama 3, False for SmolLM2, tokenizer_config.json for HF folders).
        eos: append the end-of-text id.
        allow_special: if False (the default) text that looks like a special token,
             e.g. a user typing "<|eot_id|>", is encoded as ordinary text; if True it
             becomes the special token.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        ids = self._encode_text(text, allow_special)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise TokenizerError("this tokenizer has no begin-of-text token; call encode(..., bos=False)")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise TokenizerError("this tokenizer has no end-of-text token; call encode(..., eos=False)")
            ids.append(self.eos_id)
        return ids

    def check_id(self, i) -> int:
        """i as a plain int (numpy and 0-d torch integers are fine); out of range -> TokenizerError."""
        try:
            index = operator.index(i)
        except TypeError:
            raise TokenizerError(f"token ids are integers, got {i!r}") from None
        if isinstance(i, bool) or not 0 <= index < self.vocab_size:
            raise TokenizerError(f"token id {i!r} is outside this vocabulary (0..{self.vocab_size - 1})")
        return index

    def _require_chat_format(self):
        if self.chat_format is None:
            raise TokenizerError(
                "this tokenizer has no chat template (no chat_template in tokenizer_config.json or GGUF metadata, "
                "and no <|im_start|>/<|im_end|> or Llama 3 header tokens); add a chat_template to "
                "tokenizer_config.json, or use generate() with a plain prompt")
        return self.chat_format

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The chat prompt as text, special tokens written out (what `encode_chat` encodes)."""
        return self._require_chat_format().render(messages, add_generation_prompt, tools=tools)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """OpenAI-style messages [{"role": "user", "content": "Hi"}, ...] -> prompt ids.

        Special-token text inside message contents is encoded as plain text, so a
        user cannot forge an end of turn or a system header.  tools: OpenAI's function
        list, rendered by the chat format (chat.py; assistant "tool_calls" and "tool"
        messages are rendered whether or not tools are given).
        """
        return self._require_chat_format().encode(self, messages, add_generation_prompt, tools=tools)

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence: `.add(id) -> str`, `.flush() -> str`."""
        return StreamDecoder(self)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, stop_ids={self.stop_ids})")
