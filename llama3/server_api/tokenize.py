"""POST /tokenize, POST /detokenize and GET /tokenizer_info: the model's own tokenizer over HTTP.

The shapes are vLLM's, which lm-evaluation-harness's `local-completions` detects and uses
(so it needs no Hugging Face tokenizer of its own):

    POST /tokenize    {"prompt": "Hi"} or {"messages": [...]}, "add_special_tokens": true
                      -> {"tokens": [...], "count": n, "max_model_len": context, "pieces": [...]}
    POST /detokenize  {"tokens": [...]} -> {"prompt": "Hi"}
    GET  /tokenizer_info -> {"bos_token", "eos_token", "pad_token", "chat_template", "vocab_size", ...}

As in vLLM (and Hugging Face tokenizers), special-token text in /tokenize's prompt becomes the
special token ("<|im_end|>" -> its id); the completion endpoints encode prompts as plain text.
`pieces` spell each token as the vocabulary does (byte-level: a space is "Ġ").
"""

from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama3.server_api.fields import RequestError


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True              # text: the model's own begin-of-text rule
    add_generation_prompt: bool = True           # messages: end with the assistant's header
    return_token_strs: bool = False              # vLLM's name for pieces, returned as token_strs too

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) or messages (a conversation)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def register(app, llm, parse, check_key) -> None:
    """Add the three endpoints to the app (parse/check_key: the app's request parsing and key check)."""
    tokenizer = llm.tokenizer

    def special(token_id):
        return None if token_id is None else tokenizer.decode([token_id])

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req: TokenizeRequest = await parse(request, TokenizeRequest)
        if req.messages is not None:
            ids = tokenizer.encode_chat(req.messages, add_generation_prompt=req.add_generation_prompt)
        else:
            ids = tokenizer.encode(req.prompt, bos=None if req.add_special_tokens else False, allow_special=True)
        pieces = [tokenizer.id_to_piece(i) for i in ids]
        body = {"tokens": ids, "count": len(ids), "max_model_len": llm.config.max_seq_len, "pieces": pieces}
        return {**body, "token_strs": pieces} if req.return_token_strs else body

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req: DetokenizeRequest = await parse(request, DetokenizeRequest)
        bad = [i for i in req.tokens if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                               param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_key(request)
        template = getattr(tokenizer.chat_format, "template", None)
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                "bos_token": special(tokenizer.bos_id), "eos_token": special(tokenizer.eos_id),
                "pad_token": special(tokenizer.pad_id), "chat_template": template,
                "model_max_length": llm.config.max_seq_len}
