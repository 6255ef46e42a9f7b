"""Prompts in, token ids and printable token labels out: shared by every view in llama3.inspect."""

from __future__ import annotations

import torch

from llama3.errors import Llama3Error


def encode_prompt(llm, prompt: str | list[int]) -> list[int]:
    """Text -> ids with the model's tokenizer (its own BOS default); a list of ids passes through."""
    if isinstance(prompt, (list, tuple)):
        ids = [int(i) for i in prompt]
    else:
        if llm.tokenizer is None:
            raise Llama3Error("this model has no tokenizer, so text cannot be encoded; "
                              "load a checkpoint with tokenizer files or pass token ids")
        ids = list(llm.tokenizer.encode(prompt))
    if not ids:
        raise Llama3Error("the prompt is empty; give at least one token")
    bad = [i for i in ids if not 0 <= i < llm.config.vocab_size]
    if bad:
        raise Llama3Error(f"token ids {bad[:5]} are outside the vocabulary (0..{llm.config.vocab_size - 1})")
    if len(ids) > llm.config.max_seq_len:
        raise Llama3Error(f"the prompt has {len(ids)} tokens but the model's context holds "
                          f"{llm.config.max_seq_len}; shorten it")
    return ids


def token_label(tokenizer, token_id: int) -> str:
    """How one token reads: its text with whitespace made visible (␣ space, ↵ newline)."""
    if tokenizer is None:
        return f"#{token_id}"
    try:
        text = tokenizer.decode([token_id])
    except Exception:  # a tokenizer may refuse a lone id (e.g. half of a UTF-8 character)
        text = ""
    if not text or text == "\ufffd":
        try:
            text = tokenizer.id_to_piece(token_id)
        except Exception:
            text = f"#{token_id}"
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or f"#{token_id}"


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    return [token_label(tokenizer, i) for i in ids]


def as_batch(llm, ids: list[int]) -> torch.Tensor:
    """ids -> tokens [1, T] on the model's device."""
    return torch.tensor([ids], dtype=torch.long, device=llm.device)
