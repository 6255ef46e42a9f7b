"""Request fields beyond text generation, and how they become GenerationSettings.

Mixed into server.py's request models:
    SamplingFields     n, presence_penalty, frequency_penalty, logit_bias        (both endpoints)
    CompletionFields   logprobs: K (0-20), echo                                  (/v1/completions)
    ChatFields         logprobs: bool, top_logprobs: K (0-20),                   (/v1/chat/completions)
                       tools, tool_choice, parallel_tool_calls (server_api/tools.py)
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from llama3.errors import Llama3Error
from llama3.generate import GenerationSettings
from llama3.sampling import MAX_LOGPROBS, SamplingError

MAX_CHOICES = 16  # n: each choice is a sequence in the batch (OpenAI allows 128; memory decides here)


class RequestError(Llama3Error):
    """A request the server refuses: HTTP `status` with OpenAI's error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


class SamplingFields(BaseModel):
    n: int = Field(1, ge=1, le=MAX_CHOICES)                  # choices per prompt, sharing the prompt
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None               # {"token id": -100..100}
    response_format: dict | None = None                      # text / json_object / json_schema (structured.py)


class CompletionFields(BaseModel):
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # K most likely alternatives per token
    echo: bool = False                                       # return the prompt too, with its logprobs


class ChatFields(BaseModel):
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    tools: list | None = None                                # [{"type": "function", "function": {...}}]
    tool_choice: str | dict | None = None                    # auto / none / required / {"type": "function", ...}
    parallel_tool_calls: bool = True                         # more than one call per answer

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("echo is a /v1/completions field; send the prompt there to score it")
        return echo


def parse_prompts(prompt) -> list[str | list[int]]:
    """A completions `prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    def ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in value)

    if isinstance(prompt, str):
        return [prompt]
    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return list(prompt)
    raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists "
                     "(none of them empty)")


def encode_prompts(tokenizer, prompts: list[str | list[int]]) -> list[list[int]]:
    """Text prompts tokenized, token-id prompts checked against the vocabulary."""
    encoded = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            encoded.append(tokenizer.encode(prompt))
            continue
        if min(prompt) < 0 or max(prompt) >= tokenizer.vocab_size:
            raise RequestError(f"prompt {index} has token ids outside the vocabulary [0, {tokenizer.vocab_size})",
                               param="prompt")
        encoded.append(list(prompt))
    if any(not ids for ids in encoded):
        raise RequestError("a prompt is empty (no tokens); give it some text", param="prompt")
    return encoded


def logprobs_wanted(req) -> int | None:
    """None: no logprobs; K: the chosen token's and the K best (chat: top_logprobs needs logprobs)."""
    if isinstance(req, ChatFields):
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError("top_logprobs needs \"logprobs\": true", param="top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


def settings_for(req, max_new_tokens: int, stop: list[str]) -> GenerationSettings:
    """The request's GenerationSettings; an invalid value -> RequestError naming it."""
    bias = None
    if req.logit_bias:
        try:
            bias = {int(token): value for token, value in req.logit_bias.items()}
        except ValueError:
            raise RequestError("logit_bias keys are token ids, e.g. {\"1234\": -100}", param="logit_bias") from None
    try:
        return GenerationSettings(max_new_tokens=max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed, stop=stop, presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty, logit_bias=bias,
                                  logprobs=logprobs_wanted(req))
    except SamplingError as error:
        raise RequestError(str(error), param=error.param) from None
