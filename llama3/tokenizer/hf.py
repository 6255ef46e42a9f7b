"""Hugging Face tokenizers: a `tokenizers.Tokenizer` (tokenizer.json) plus tokenizer_config.json.

tokenizer.json holds the whole pipeline (normalizer, pre-tokenizer split,
BPE/Unigram model, decoder, added tokens); the Rust `tokenizers` library runs it.
tokenizer_config.json adds what the pipeline does not say: which tokens are
bos/eos/pad, whether `encode` prepends bos (`add_bos_token`), and the Jinja2
`chat_template` (newer transformers write it to chat_template.jinja instead).
The same class serves GGUF vocabularies, which gguf_vocab.py rebuilds as a
`tokenizers.Tokenizer`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llama3.checkpoint.files import atomic_file, read_json, write_json
from llama3.tokenizer.base import Tokenizer, TokenizerError, unicode_to_byte
from llama3.tokenizer.chat import default_chat_format

# Tokens that end a turn or a text in common vocabularies; those present become stop ids.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "</s>")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a token either as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value) -> str | None:
    """chat_template is a string, or a list of {"name", "template"} (use "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) and value.strip() else None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` behind the common interface.

    config: bos_token, eos_token, pad_token, unk_token (strings), add_bos_token (bool or
    absent: then whatever the tokenizer.json post-processor does), chat_template.
    extra_stop_ids: more ids that end generation (generation_config.json, GGUF eot/eom).
    """

    def __init__(self, backend, config: dict | None = None, extra_stop_ids=()):
        config = dict(config or {})
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._added_ids = set(added)
        self.token_names = {name: _token_text(config.get(name))
                            for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id, self.eos_id, self.pad_id = (self._optional_id(self.token_names[n])
                                                 for n in ("bos_token", "eos_token", "pad_token"))
        if config.get("add_bos_token") is not None:
            self.add_bos = bool(config["add_bos_token"])
            if self.add_bos and self.bos_id is None:
                raise TokenizerError("tokenizer_config.json sets add_bos_token but names no bos_token; "
                                     "name the begin-of-text token or set add_bos_token to false")
        else:  # e.g. Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor
            with_special = backend.encode("a", add_special_tokens=True).ids
            without = backend.encode("a", add_special_tokens=False).ids
            self.add_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] and without[:1] != [self.bos_id]
        stops = [self.eos_id, *extra_stop_ids, *(backend.token_to_id(t) for t in END_TOKENS)]
        self.stop_ids = list(dict.fromkeys(int(i) for i in stops if i is not None and 0 <= i < self.vocab_size))
        self.chat_template = _pick_template(config.get("chat_template"))
        self.chat_format = default_chat_format(self.special_tokens, self.chat_template, self.template_variables())
        self._plain = None  # a copy that encodes special-token text as plain text (made on first use)
        self._byte_level = None

    def _optional_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"tokenizer_config.json names {token!r} as a special token, "
                                 "but tokenizer.json has no such token")
        return i

    def template_variables(self) -> dict[str, str]:
        return {k: v for k, v in self.token_names.items() if v is not None}

    # ---------------------------------------------------------------- interface
    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self.backend.encode(text, add_special_tokens=False).ids
        if self._plain is None:
            from tokenizers import Tokenizer as Backend

            plain = Backend.from_str(self.backend.to_str())
            plain.encode_special_tokens = True  # special tokens' text is split like any other text
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode([self.check_id(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(self.check_id(i))

    def piece_to_id(self, piece: str) -> int:
        i = self.backend.token_to_id(piece)
        if i is None:
            raise TokenizerError(f"{piece!r} is not a token of this vocabulary")
        return i

    def token_bytes(self, i: int) -> bytes:
        i = self.check_id(i)
        piece = self.id_to_piece(i)
        if i in self._added_ids:  # special and user-defined tokens: their text
            return piece.encode()
        if self._byte_level is None:
            self._byte_level = '"ByteLevel"' in json.dumps(json.loads(self.backend.to_str()).get("decoder"))
        if self._byte_level:
            alphabet = unicode_to_byte()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            return piece.encode()
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece byte fallback
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def gguf_vocab(self) -> dict | None:
        """This vocabulary as GGUF metadata (for writing .gguf files), or None if GGUF cannot hold it."""
        from llama3.tokenizer.gguf_vocab import gguf_vocab_of_hf

        return gguf_vocab_of_hf(self)

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (both atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.template_variables(),
                  "add_bos_token": self.add_bos, "add_eos_token": False}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        write_json(folder / "tokenizer_config.json", config, ensure_ascii=False)


def load_hf_folder(folder: str | os.PathLike) -> HFTokenizer:
    """A folder with tokenizer.json (+ tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja, generation_config.json, all optional) -> HFTokenizer."""
    from tokenizers import Tokenizer as Backend

    folder = Path(folder)
    try:
        backend = Backend.from_file(str(folder / "tokenizer.json"))
    except (Exception, BaseException) as e:  # noqa: B036 -- plain Exception on bad JSON, PanicException (a
        if isinstance(e, (KeyboardInterrupt, SystemExit)):  # BaseException) when Rust panics
            raise
        raise TokenizerError(f"{folder / 'tokenizer.json'} cannot be read by the tokenizers library "
                             f"({str(e).splitlines()[0][:120]}); re-download or re-save it") from None
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (folder / name).is_file():
            config.update(read_json(folder / name, TokenizerError))
    if (folder / "chat_template.jinja").is_file():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra_stops = []
    if (folder / "generation_config.json").is_file():
        eos = read_json(folder / "generation_config.json", TokenizerError).get("eos_token_id")
        extra_stops = [i for i in (eos if isinstance(eos, list) else [eos])
                       if isinstance(i, int) and not isinstance(i, bool) and i >= 0]  # others name no token
    from llama3.checkpoint.checks import naming

    with naming(folder):  # e.g. "FOLDER: tokenizer_config.json names '<s>' as a special token, but ..."
        return HFTokenizer(backend, config, extra_stop_ids=extra_stops)
