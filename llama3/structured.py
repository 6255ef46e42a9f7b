"""Structured output: answers that always parse as JSON (and validate against a JSON schema),
enforced token by token by a grammar engine through the Sampler's logits-processor hook.

    grammar = compile_json(llm.tokenizer, llm.config.vocab_size, schema)   # or schema=None: any JSON object
    sampler = Sampler(vocab, temperature=1.0, processor=GrammarProcessor(grammar))
    schema_problem(schema)   # why the engine cannot use a schema, or None (no tokenizer needed)
    compile_json(..., before="<tool_call>\n", after="\n</tool_call>", most=4)   # tools.py's forced calls

Each step the processor asks the engine which tokens may come next (a bitmask over the
vocabulary) and sets every other logit to -inf; `accept` moves the engine's matcher on by the
token taken.  Once the JSON value is complete only the tokenizer's stop ids are allowed, so the
sequence ends there.  A `max_tokens` too small for the value still cuts it (finish_reason "length").

The engine is xgrammar (https://github.com/mlc-ai/xgrammar), not llguidance: both install from
PyPI as CPU wheels here, but xgrammar takes a plain list of token byte strings (every tokenizer
of ours gives `token_bytes(i)`: the GGUF vocabulary, HF tokenizer.json, Meta's tiktoken), it
compiles JSON schemas itself (`compile_json_schema`, with strict mode), keeps a compiled grammar
per tokenizer in a cache, and fills its bitmask in C++ without a Python loop over the vocabulary;
llguidance's Python side expects a transformers or tiktoken tokenizer object and a grammar
written in its own Lark dialect.  Special (control) tokens are given to xgrammar as empty
strings, which it treats as never allowed inside the grammar: a model cannot end a turn in the
middle of a string.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

from llama3.errors import Llama3Error

ANY_JSON_OBJECT = {"type": "object"}


class SchemaError(Llama3Error):
    """A JSON schema (or response_format) the grammar engine cannot use; the server answers 400."""



def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise Llama3Error("structured output needs the grammar engine xgrammar: pip install xgrammar "
                          "(or pip install 'llama3[serve]')") from None
    return xgrammar


_compilers: dict[int, object] = {}  # id(tokenizer) -> (tokenizer, xgrammar.GrammarCompiler)
_lock = threading.Lock()


def _compiler(tokenizer, vocab_size: int):
    """One GrammarCompiler per tokenizer (its vocabulary is read once; compiled grammars are cached)."""
    xgr = _xgrammar()
    with _lock:
        entry = _compilers.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            special = set(tokenizer.special_tokens.values())
            vocab = [b"" if i in special else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
            vocab += [b""] * (vocab_size - len(vocab))           # padding rows of the embedding
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                     stop_token_ids=list(tokenizer.stop_ids))
            entry = (tokenizer, xgr.GrammarCompiler(info, max_threads=1))
            _compilers[id(tokenizer)] = entry
        return entry[1]


@dataclass
class JsonGrammar:
    """A compiled grammar for one JSON schema and one tokenizer; make a GrammarProcessor per sequence."""

    compiled: object
    vocab_size: int
    schema: dict

    def processor(self) -> "GrammarProcessor":
        return GrammarProcessor(self)


def _first_line(error: Exception) -> str:
    """The engine's complaint in one line, without the time and C++ file xgrammar puts before it."""
    import re

    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)


def _schema(schema) -> dict:
    if schema is None:
        return ANY_JSON_OBJECT
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise SchemaError(f"the JSON schema is not valid JSON ({error})") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema is a JSON object, got {type(schema).__name__}")
    return schema


def schema_problem(schema: dict) -> str | None:
    """Why the grammar engine cannot use this JSON schema (one line), or None.  No tokenizer needed:
    for checking a request's schemas before anything is compiled for a vocabulary."""
    try:
        _xgrammar().Grammar.from_json_schema(json.dumps(_schema(schema)), any_whitespace=False, strict_mode=True)
    except SchemaError as error:
        return str(error)
    except (RuntimeError, ValueError, TypeError) as error:
        return _first_line(error)
    return None


def compile_json(tokenizer, vocab_size: int, schema: dict | None = None, *, strict: bool = True,
                 before: str = "", after: str = "", most: int = 1) -> JsonGrammar:
    """A grammar for JSON that validates against `schema` (None: any JSON object).
    With `before` / `after`: the value is written between those two texts; with `most` > 1: 1 to
    `most` such blocks, one per line (tools.py's <tool_call> blocks).  An unusable schema ->
    SchemaError saying why."""
    schema = _schema(schema)
    if not tokenizer.stop_ids:
        raise SchemaError("structured output needs a tokenizer with a stop token (it ends the answer once the "
                          "JSON value is complete)")
    xgr = _xgrammar()
    compiler = _compiler(tokenizer, vocab_size)
    try:
        if not (before or after or most > 1):
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
        else:
            def text(value: str):
                return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(value)}")
            value = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
            block = xgr.Grammar.concat(*[g for g in (before and text(before), value, after and text(after)) if g])
            compiled = compiler.compile_grammar(xgr.Grammar.union(*[
                xgr.Grammar.concat(*([block, text("\n")] * (k - 1) + [block])) for k in range(1, most + 1)]))
    except (RuntimeError, ValueError, TypeError) as error:
        raise SchemaError(f"the grammar engine cannot compile this JSON schema: {_first_line(error)}") from None
    return JsonGrammar(compiled, vocab_size, schema)


class GrammarProcessor:
    """The Sampler's LogitsProcessor for one sequence: -inf on every token the grammar forbids next."""

    def __init__(self, grammar: JsonGrammar):
        xgr = _xgrammar()
        self.xgr, self.grammar = xgr, grammar
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)   # [1, ceil(V / 32)] int32

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] -> logits [V] with the forbidden tokens at -inf (a finished grammar: stop ids only)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        masked = logits.float().cpu().clone()[None]                          # [1, V]
        self.xgr.apply_token_bitmask_inplace(masked, self.bitmask)
        return masked[0].to(logits.device)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(int(token)):
            raise Llama3Error(f"token {token} was taken against the grammar (a logit_bias of +100 can force "
                              "a token the JSON schema forbids; leave it out with response_format)")

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


def json_samplers(llm, prompt_ids: list[list[int]], settings, schema: dict | None, seeds=None) -> list:
    """One Sampler per prompt (seeded `seeds[i]`, default settings.seed), each with its own
    GrammarProcessor for `schema` (None: any JSON object); the grammar is compiled once."""
    from llama3.sampling import Sampler

    grammar = compile_json(llm.tokenizer, llm.config.vocab_size, schema)
    seeds = seeds or [settings.seed] * len(prompt_ids)
    return [Sampler.from_settings(settings, llm.config.vocab_size, prompt_ids=ids, seed=seed,
                                  processor=grammar.processor(), device=llm.device)
            for ids, seed in zip(prompt_ids, seeds)]
