"""Tokenizers: text <-> token ids, and chat messages -> prompt ids, for every supported model kind.

    load_tokenizer()                        Meta's Llama 3 tokenizer (shipped in the llama-models package)
    load_tokenizer("path/to/folder")        tokenizer.json (+ tokenizer_config.json) or a tiktoken tokenizer.model
    load_tokenizer("model.gguf")            the vocabulary and chat template embedded in a GGUF file
    load_tokenizer("smollm2-135m-instruct") the default model's tokenizer

All return a `Tokenizer` (base.py) with the same methods: encode, decode,
encode_chat, render_chat, id_to_piece, piece_to_id, stream_decoder, save.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llama3.tokenizer.base import StreamDecoder, Tokenizer, TokenizerError

__all__ = ["Tokenizer", "TokenizerError", "StreamDecoder", "load_tokenizer", "find_tokenizer",
           "llama3_tokenizer_path"]


def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 `tokenizer.model`, as shipped in the llama-models package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        raise TokenizerError("Meta's Llama 3 tokenizer comes with the llama-models package; "
                             "run: pip install llama-models (or pass a tokenizer folder)")
    path = Path(spec.origin).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; reinstall llama-models: pip install --force-reinstall llama-models")
    return path


def _load_tiktoken_folder(folder: Path, model_file: Path) -> Tokenizer:
    from llama3.checkpoint.files import read_json
    from llama3.tokenizer.hf import _pick_template
    from llama3.tokenizer.llama3_tiktoken import Llama3Tokenizer

    template = None
    if (folder / "tokenizer_config.json").is_file():
        template = _pick_template(read_json(folder / "tokenizer_config.json", TokenizerError).get("chat_template"))
    return Llama3Tokenizer(model_file, chat_template=template)


def find_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer stored with a checkpoint (a folder or a .gguf file), or None if it has none.

    In a folder, tokenizer.json wins over tokenizer.model (a Hugging Face Llama 3 folder
    has both); tokenizer.model must be a tiktoken file (Meta's Llama 3 format).
    Files that are present but unreadable raise TokenizerError.
    """
    from llama3.tokenizer.llama3_tiktoken import is_tiktoken_file

    path = Path(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from llama3.checkpoint.gguf_file import read_metadata
            from llama3.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata

            meta = read_metadata(path)
            if meta.get("tokenizer.ggml.model", "no_vocab") == "no_vocab" or "tokenizer.ggml.tokens" not in meta:
                return None  # a GGUF written without a vocabulary
            return tokenizer_from_gguf_metadata(meta, str(path))
        if path.name == "tokenizer.json" or path.name == "tokenizer.model":
            path = path.parent
        else:
            return None
    if not path.is_dir():
        return None
    if (path / "tokenizer.json").is_file():
        from llama3.tokenizer.hf import load_hf_folder

        return load_hf_folder(path)
    for model_file in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if model_file.is_file():
            if not is_tiktoken_file(model_file):
                raise TokenizerError(f"{model_file} is not a tiktoken BPE file (a SentencePiece model?); "
                                     "put the model's tokenizer.json in the folder instead")
            return _load_tiktoken_folder(path, model_file)
    return None


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """A tokenizer from a source; None -> Meta's Llama 3 tokenizer.

    source: a folder (tokenizer.json or tokenizer.model), a tokenizer.json /
    tokenizer.model / .gguf file, a built-in model name ("smollm2-135m-instruct"),
    "hf:ORG/NAME" (a model on the Hugging Face Hub), or "llama3" for Meta's Llama 3 tokenizer.
    Missing or unusable -> TokenizerError.
    """
    if source is None or str(source).lower() in ("llama3", "llama-3", "meta-llama3"):
        from llama3.tokenizer.llama3_tiktoken import Llama3Tokenizer

        return Llama3Tokenizer(llama3_tokenizer_path())
    if str(source).startswith("hf:"):  # a model on the Hugging Face Hub: its tokenizer files (or GGUF)
        from llama3.checkpoint.hub import resolve

        source = resolve(str(source), only="tokenizer")
    path = Path(source)
    if not path.exists():
        from llama3.llm import BUILTIN_MODELS  # (imports torch: only for names that are not paths)

        if str(source).lower() in BUILTIN_MODELS:
            return load_tokenizer(BUILTIN_MODELS[str(source).lower()]())
        raise TokenizerError(f"{source}: no such file or folder (and not a built-in name: "
                             f"llama3, {', '.join(BUILTIN_MODELS)})")
    tokenizer = find_tokenizer(path)
    if tokenizer is None:
        raise TokenizerError(f"{source}: no tokenizer found; a folder needs tokenizer.json or tokenizer.model, "
                             "a file must be .gguf, tokenizer.json or tokenizer.model")
    return tokenizer
