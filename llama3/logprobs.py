"""Log-probabilities of tokens, as OpenAI's API reports them.

Two sources:
  * generated tokens: each sequence's `Sampler` records `TokenLogprobs` (log_softmax of the raw
    logits the token was drawn from, before penalties, temperature and filters);
  * prompt tokens (`echo`, what lm-evaluation-harness scores): `prompt_logprobs` runs the model
    over the prompt once and reads, at position t, the log-probability of token t+1.  The first
    token has no context, so its entry is None (OpenAI's `null`).

And two shapes (`chat_logprobs`, `completion_logprobs`): the chat API's
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}` and the legacy completions
API's `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`.
"""

from __future__ import annotations

import codecs

import torch

from llama3.model import KVCache, Transformer
from llama3.sampling import TokenLogprobs

PROMPT_CHUNK = 512  # positions per forward: the logits [T, V] of a long prompt never sit in memory at once


@torch.inference_mode()
def prompt_logprobs(model: Transformer, ids: list[int], top: int) -> list[TokenLogprobs | None]:
    """[None, lp(ids[1] | ids[:1]), ..., lp(ids[-1] | ids[:-1])] with the `top` best at each position."""
    weight = model.tok_embeddings.weight
    cache = KVCache(model.config, 1, len(ids), dtype=weight.dtype, device=weight.device)
    tokens = torch.tensor([ids], device=weight.device)                # [1, T]
    entries: list[TokenLogprobs | None] = [None]
    for begin in range(0, len(ids), PROMPT_CHUNK):
        chunk = tokens[:, begin:begin + PROMPT_CHUNK]
        logprobs = torch.log_softmax(model(chunk, start_pos=begin, cache=cache)[0].float(), dim=-1)  # [T, V]
        targets = tokens[0, begin + 1:begin + 1 + chunk.shape[1]]      # the token each position predicts
        logprobs = logprobs[:len(targets)]
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()   # [T]
        best = logprobs.topk(top, dim=-1) if top > 0 else None
        for t, token in enumerate(targets.tolist()):
            pairs = list(zip(best.indices[t].tolist(), best.values[t].tolist())) if best is not None else []
            entries.append(TokenLogprobs(token, chosen[t], pairs))
    return entries


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, entries: list[TokenLogprobs]) -> dict:
    """OpenAI chat: choices[].logprobs = {"content": [...], "refusal": None}."""
    def item(token: int, logprob: float) -> dict:
        return {"token": _piece(tokenizer, token), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: list[TokenLogprobs | None], ids: list[int],
                        start: int = 0) -> tuple[dict, int]:
    """OpenAI completions: ({"tokens", "token_logprobs", "top_logprobs", "text_offset"}, end) for `ids`
    (entries[i] is None for an echoed first prompt token).  text_offset counts characters of the
    choice's text, the first token sitting at character `start`; `end` is where the next one would."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, position = [], start
    for token in ids:
        offsets.append(position)
        position += len(decoder.decode(tokenizer.token_bytes(token)))
    tops = [None if e is None else {_piece(tokenizer, i): lp for i, lp in e.top} for e in entries]
    return {"tokens": [_piece(tokenizer, t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}, position


def covering(tokenizer, entries: list[TokenLogprobs], text: str) -> list[TokenLogprobs]:
    """The first entries whose tokens spell (at least) `text`: a stop string cuts the text, so the
    tokens after the cut are not part of the answer and get no logprobs either."""
    need, have = len(text.encode()), 0
    for k, entry in enumerate(entries):
        if have >= need:
            return entries[:k]
        have += len(tokenizer.token_bytes(entry.token))
    return entries


def merge_completion_logprobs(first: dict, second: dict) -> dict:
    """The echoed prompt's logprobs followed by the generated ones (one completions object)."""
    return {name: first[name] + second[name] for name in first}
