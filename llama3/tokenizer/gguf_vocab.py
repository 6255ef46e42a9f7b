"""Vocabularies embedded in GGUF files, rebuilt as `tokenizers` pipelines.

A GGUF file (llama.cpp's format) stores the tokenizer as metadata:

    tokenizer.ggml.model        "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    tokenizer.ggml.pre          which split regex the BPE was trained with ("smollm", "llama-bpe", ...)
    tokenizer.ggml.tokens       every token's spelling; its index is its id
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "gpt2" only: merge rules "a b", highest priority first
    tokenizer.ggml.scores       "llama" only: a score per token; a higher score merges first
    tokenizer.ggml.bos_token_id / eos_token_id / padding_token_id / unknown_token_id / eot_token_id
    tokenizer.ggml.add_bos_token, tokenizer.ggml.add_space_prefix
    tokenizer.chat_template     the Jinja2 chat template

Only the metadata header is read (`llama3.checkpoint.gguf_file.read_metadata`, the one
GGUF reader), not the weights, so this is fast even for a multi-GB file.
"""

from __future__ import annotations

import json
import os

from llama3.checkpoint.gguf_file import read_metadata
from llama3.tokenizer.base import TokenizerError, merges_from_priority
from llama3.tokenizer.hf import HFTokenizer
from llama3.tokenizer.llama3_tiktoken import SPLIT_PATTERN

# ------------------------------------------------------------- split regexes
# How llama.cpp pre-tokenizes each `tokenizer.ggml.pre` type (llama-vocab.cpp).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = SPLIT_PATTERN  # Meta's, defined once in llama3_tiktoken.py
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre type -> (split each digit off first?, regex)
PRE_TOKENIZERS = {
    "default": (False, GPT2_SPLIT), "gpt2": (False, GPT2_SPLIT),
    # SmolLM2 and the StarCoder family: every digit is its own token
    "smollm": (True, GPT2_SPLIT), "starcoder": (True, GPT2_SPLIT), "refact": (True, GPT2_SPLIT),
    "llama-bpe": (False, LLAMA3_SPLIT), "llama3": (False, LLAMA3_SPLIT), "llama-v3": (False, LLAMA3_SPLIT),
    "smaug-bpe": (False, LLAMA3_SPLIT), "falcon3": (False, LLAMA3_SPLIT), "dbrx": (False, LLAMA3_SPLIT),
    "qwen2": (False, QWEN2_SPLIT), "deepseek-r1-qwen": (False, QWEN2_SPLIT),
}


def _byte_level_bpe(meta: dict):
    """tokenizer.ggml.model == "gpt2": tokens already in GPT-2's byte alphabet, merges given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(PRE_TOKENIZERS)}")
    split_digits, pattern = PRE_TOKENIZERS[pre]
    if "tokenizer.ggml.merges" not in meta:
        raise TokenizerError("this GGUF byte-level vocabulary has no tokenizer.ggml.merges; the file is incomplete")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    # Llama 3 (like tiktoken) takes a chunk that is already a whole token as is.
    model = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pattern == LLAMA3_SPLIT)
    tokenizer = Tokenizer(model)
    steps = [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")] if split_digits else []
    steps += [pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict):
    """tokenizer.ggml.model == "llama": SentencePiece BPE (Llama 1/2, Mistral, TinyLlama).

    A space is spelled "▁" and a word gets one in front; characters not in the vocabulary
    fall back to byte tokens <0x00>..<0xFF>.  GGUF keeps scores, not merges: the merge
    rules are rebuilt as every split of a token into two tokens, best score first.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise TokenizerError("this GGUF SentencePiece vocabulary has no tokenizer.ggml.scores; the file is incomplete")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = merges_from_priority(vocab, {t: -score for t, score in zip(tokens, scores)})
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True,
                       unk_token=tokens[unk] if unk is not None else None)
    tokenizer = Tokenizer(model)
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                       prepend_scheme="first" if space_prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _check_vocabulary(meta: dict, source: str) -> None:
    """The tokenizer.ggml.* values must have the types the spec gives them, so that nothing
    below fails on a corrupt file with an error of its own (or, worse, builds nonsense)."""
    def bad(key, what):
        return TokenizerError(f"{source}: GGUF metadata tokenizer.ggml.{key} {what}; the file is corrupt")

    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise bad("tokens", "is not a list of strings")
    for key, kind in (("merges", str), ("scores", (int, float)), ("token_type", int)):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is not None and not (isinstance(values, list) and all(isinstance(v, kind) for v in values)):
            raise bad(key, f"is not a list of {'strings' if kind is str else 'numbers'}")
    merges = meta.get("tokenizer.ggml.merges") or []
    if not all(" " in m for m in merges):
        raise bad("merges", "holds a rule without a space between its two tokens")
    for key in ("pre", "model"):
        if not isinstance(meta.get(f"tokenizer.ggml.{key}", ""), str):
            raise bad(key, "is not a string")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and 0 <= value < len(tokens)):
            raise bad(key, f"= {value!r} is not a token id (0..{len(tokens) - 1})")


def tokenizer_from_gguf_metadata(meta: dict, source: str = "GGUF file") -> HFTokenizer:
    """GGUF metadata (from `gguf_file.read_metadata`) -> HFTokenizer; an inconsistent vocabulary
    (a merge of tokens that are not in it, ...) is a TokenizerError naming `source`."""
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError(f"{source}: this GGUF file has no embedded vocabulary (tokenizer.ggml.tokens)")
    _check_vocabulary(meta, source)
    try:
        return _tokenizer_from_metadata(meta)
    except TokenizerError as e:
        raise TokenizerError(f"{source}: {e}") from None
    except (Exception, BaseException) as e:  # noqa: B036 -- the tokenizers library raises plain Exception
        if isinstance(e, (KeyboardInterrupt, SystemExit)):  # ("Token 'an' out of vocabulary") or, from
            raise                                           # Rust, a PanicException (a BaseException)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TokenizerError(f"{source}: the embedded vocabulary is inconsistent ({first}); "
                             "the file is corrupt: re-download or re-export it") from None


def _tokenizer_from_metadata(meta: dict) -> HFTokenizer:
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta)
    elif kind == "llama":
        backend = _sentencepiece_bpe(meta)
    else:
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama' are)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Control tokens (type 3) are special: matched whole in text, never split.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
              # llama.cpp's defaults when the flag is missing: bos for SentencePiece, none for gpt2
              "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", kind == "llama"),
              "chat_template": meta.get("tokenizer.chat_template")}
    extra_stops = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    tokenizer = HFTokenizer(backend, config, extra_stop_ids=extra_stops)
    if kind == "gpt2":
        tokenizer.gguf_pre = meta.get("tokenizer.ggml.pre", "default")  # kept for writing GGUF again
    return tokenizer


def load_gguf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The vocabulary and chat template embedded in a .gguf file."""
    return tokenizer_from_gguf_metadata(read_metadata(path), str(path))


# ------------------------------------------------------------------ export
# `gguf_vocab()` describes a tokenizer as GGUF metadata for the GGUF writer
# (llama3.checkpoint.gguf): dict(model, pre, tokens, token_types, merges, bos_id,
# eos_id, pad_id, chat_template, add_bos), or None when it cannot be described.
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def _pre_type_of(pre_tokenizer_json: str) -> str | None:
    """Which llama.cpp pre type a tokenizer.json pre-tokenizer is (None: not one we know)."""
    for pattern, name in ((LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2")):
        if json.dumps(pattern)[1:-1] in pre_tokenizer_json:
            return name
    if '"use_regex":true' in pre_tokenizer_json.replace(" ", ""):
        return "smollm" if '"Digits"' in pre_tokenizer_json or "\\\\p{N}" in pre_tokenizer_json else "gpt2"
    return None


def gguf_vocab_of_hf(tok: HFTokenizer) -> dict | None:
    """A byte-level BPE HFTokenizer as GGUF "gpt2" metadata (SentencePiece ones: None)."""
    data = json.loads(tok.backend.to_str())
    model = data["model"]
    pre = getattr(tok, "gguf_pre", None) or _pre_type_of(json.dumps(data.get("pre_tokenizer"), separators=(",", ":")))
    if model.get("type") != "BPE" or '"ByteLevel"' not in json.dumps(data.get("decoder")) or pre is None:
        return None
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens = [tok.backend.id_to_token(i) or f"[PAD{i}]" for i in range(tok.vocab_size)]
    types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges, bos_id=tok.bos_id,
                eos_id=tok.eos_id, pad_id=tok.pad_id, chat_template=tok.chat_template, add_bos=tok.add_bos)


def gguf_vocab_of_tiktoken(tok) -> dict:
    """Meta's Llama 3 tokenizer as GGUF "gpt2" metadata with pre type "llama-bpe" (as llama.cpp's
    converter writes it): tokens in the byte alphabet, merges recovered from the ranks."""
    from llama3.tokenizer.chat import LLAMA3_HEADER_TEMPLATE

    n_ranks = tok.vocab_size - len(tok.special_tokens)
    tokens = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    vocab = {t: i for i, t in enumerate(tokens[:n_ranks])}
    merges = merges_from_priority(vocab, vocab)
    return dict(model="gpt2", pre="llama-bpe", tokens=tokens,
                token_types=[NORMAL] * n_ranks + [CONTROL] * len(tok.special_tokens),
                merges=[f"{a} {b}" for a, b in merges], bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                chat_template=tok.chat_template or LLAMA3_HEADER_TEMPLATE, add_bos=True)
