""""Walk one forward pass": the trace of llama3.inspect.trace as a list of steps for the page.

Each step carries the live tensor's shape and statistics, a small heatmap of it (at most
HEAT_ROWS x HEAT_COLS cells, averaged down), the lines of llama3/model.py that compute it
(found with `inspect.getsourcelines`, so they follow the code), and the section of the
walkthrough (English and Chinese) that explains it.  The walkthrough's texts are read from
llama3.inspect.walkthrough_en / walkthrough_zh and filled with `walkthrough.measure`'s
numbers for this model, so new or changed sections show up here without edits.
"""

from __future__ import annotations

import inspect as pyinspect
import re
import string
import tempfile
import threading

import torch

import llama3.model as model_module
from llama3.errors import Llama3Error
from llama3.inspect.capture import resolve_layers
from llama3.inspect.trace import trace

HEAT_ROWS, HEAT_COLS = 24, 48

# step name (its start) -> (the model.py object that computes it, a piece of its line, the walkthrough
# heading words that explain it).  Names are those of llama3.inspect.trace.
M = model_module
STEPS = [
    ("tokens", None, "", ("tokens",)),
    ("ids", None, "", ("tokens",)),
    ("embedding", M.Transformer.forward, "tok_embeddings(tokens)", ("embedding",)),
    ("x̂ = attention_norm", M.rms_norm, "rsqrt", ("rmsnorm",)),
    ("q = wq", M.Attention.project_qkv, "self.wq(x)", ("self-attention",)),
    ("k = wk", M.Attention.project_qkv, "self.wq(x)", ("self-attention",)),
    ("v = wv", M.Attention.project_qkv, "self.wq(x)", ("self-attention",)),
    ("split into heads", M.Attention.forward, "q.view(batch", ("grouped-query", "multi-head")),
    ("RoPE", M.apply_rope, "pairs * rotation", ("rope",)),
    ("repeat KV", M.repeat_kv, "repeat_interleave", ("grouped-query",)),
    ("scores", M.Attention.explicit_attention, "self.scores(q @ k", ("self-attention",)),
    ("causal mask", M.Attention.explicit_attention, "masked_fill", ("self-attention",)),
    ("softmax", M.Attention.explicit_attention, "weights = self.softmax(", ("self-attention",)),
    ("weighted sum", M.Attention.explicit_attention, "return weights @ v", ("self-attention",)),
    ("concat heads", M.Attention.forward, "reshape(batch, seqlen, -1)", ("multi-head", "self-attention")),
    ("output projection", M.Attention.forward, "return self.wo(out)", ("self-attention",)),
    ("residual add: h", M.TransformerBlock.forward, "x + self.attention(self.attention_norm", ("residual",)),
    ("ĥ = ffn_norm", M.rms_norm, "rsqrt", ("rmsnorm",)),
    ("gate = w1", M.FeedForward.forward, "self.w2(self.hidden(self.act", ("swiglu",)),
    ("silu(gate) *", M.FeedForward.forward, "self.w2(self.hidden(self.act", ("swiglu",)),
    ("silu(gate)", M.FeedForward.forward, "self.w2(self.hidden(self.act", ("swiglu",)),
    ("up = w3", M.FeedForward.forward, "self.w2(self.hidden(self.act", ("swiglu",)),
    ("down = w2", M.FeedForward.forward, "self.w2(self.hidden(self.act", ("swiglu",)),
    ("residual add: out", M.TransformerBlock.forward, "h + self.feed_forward(self.ffn_norm", ("residual",)),
    ("block", M.TransformerBlock.forward, "x + self.attention(self.attention_norm", ("residual",)),
    ("final norm", M.Transformer.forward, "self.output(self.norm(h))", ("rmsnorm", "logits")),
    ("logits", M.Transformer.forward, "self.output(self.norm(h))", ("logits",)),
    ("next token", M.Transformer.forward, "self.output(self.norm(h))", ("logits",)),
]


def code_of(obj, needle: str, context: int = 2) -> dict:
    """The source lines of `obj` around the first line containing `needle`: {"file", "start", "lines", "focus"}."""
    lines, first = pyinspect.getsourcelines(obj)
    hit = next((k for k, line in enumerate(lines) if needle in line), 0)
    lo, hi = max(0, hit - context), min(len(lines), hit + context + 1)
    return {"file": "llama3/model.py", "function": obj.__qualname__, "start": first + lo,
            "focus": first + hit, "lines": [line.rstrip("\n") for line in lines[lo:hi]]}


def heatmap(tensor: torch.Tensor) -> list[list[float | None]]:
    """A small picture of a tensor: its last two axes (first entry of the others), averaged down
    to at most HEAT_ROWS x HEAT_COLS; -inf (masked) cells become None."""
    x = tensor.detach().float()
    while x.dim() > 2:
        x = x[0]
    if x.dim() == 1:
        x = x[None]
    masked = ~torch.isfinite(x)
    x = x.masked_fill(masked, 0.0)
    rows, cols = min(HEAT_ROWS, x.shape[0]), min(HEAT_COLS, x.shape[1])
    pooled = torch.nn.functional.adaptive_avg_pool2d(x[None, None], (rows, cols))[0, 0]
    hidden = torch.nn.functional.adaptive_max_pool2d(masked.float()[None, None], (rows, cols))[0, 0] > 0
    return [[None if hidden[i, j] and x.shape == pooled.shape else round(float(pooled[i, j]), 5)
             for j in range(cols)] for i in range(rows)]


class _Blank(dict):
    def __missing__(self, key):
        return "…"


def split_sections(text: str) -> list[tuple[str, str]]:
    """Markdown -> [(heading, body)] at each '## ' heading."""
    parts = re.split(r"^## ", text, flags=re.M)
    return [(p.split("\n", 1)[0].strip(), p.split("\n", 1)[1].strip() if "\n" in p else "") for p in parts[1:]]


class Walkthrough:
    """The walkthrough's sections in both languages, filled once per model (measure() runs a few
    forward passes and draws its pictures into a temporary folder)."""

    def __init__(self):
        self._sections: dict[str, list[tuple[str, str]]] | None = None
        self._lock = threading.Lock()

    def sections(self, llm) -> dict[str, list[tuple[str, str]]]:
        with self._lock:
            if self._sections is None:
                from llama3.inspect import walkthrough, walkthrough_en, walkthrough_zh

                try:
                    with tempfile.TemporaryDirectory() as out:
                        values = walkthrough.measure(llm, __import__("pathlib").Path(out))
                except Exception:  # a model measure() cannot run on (e.g. no tokenizer pieces): no numbers
                    values = {}
                texts = {}
                for lang, module in (("en", walkthrough_en), ("zh", walkthrough_zh)):
                    texts[lang] = split_sections(_fill(module.TEXT, values))
                self._sections = texts
            return self._sections


def _fill(text: str, values: dict) -> str:
    """str.format_map, with '…' for any field measure() did not provide."""
    fields = {name for _, name, _, _ in string.Formatter().parse(text) if name}
    filled = _Blank({k: v for k, v in values.items() if k in fields})
    try:
        return text.format_map(filled)
    except (ValueError, IndexError):
        return text


def section_for(sections: dict, words: tuple[str, ...]) -> dict:
    """The first English section whose heading contains one of `words`, and the Chinese one at the same index."""
    en, zh = sections["en"], sections["zh"]
    for word in words:
        for k, (heading, body) in enumerate(en):
            if word in heading.lower():
                other = zh[k] if k < len(zh) else ("", "")
                return {"en": {"title": heading, "text": body}, "zh": {"title": other[0], "text": other[1]}}
    return {"en": {"title": "", "text": ""}, "zh": {"title": "", "text": ""}}


def _flatten(step, depth=0, parent=None):
    """(step, depth, the nearest ancestor's name) for every step under `step`, in reading order."""
    for child in step.children:
        yield child, depth, parent
        yield from _flatten(child, depth + 1, child.name)


@torch.no_grad()
def walk(llm, ids: list[int], layer: int, texts: Walkthrough) -> dict:
    """The forward pass of ids with block `layer` unrolled, as page steps."""
    (index,) = resolve_layers(llm.model, layer)
    block = llm.model.layers[index]
    if not all(hasattr(m, name) for m, names in ((block.attention, ("wq", "wk", "wv")),
                                                  (block.feed_forward, ("w1", "w3"))) for name in names):
        raise Llama3Error("the walk redoes a block with the readable model's own wq/wk/wv and w1/w3, and this "
                          "server runs the fast model with them fused into one matrix each; use `llama3 lab`, "
                          "or `llama3 serve --lab --plain`")
    result = trace(llm, ids, layer=layer)
    sections = texts.sections(llm)
    steps = []
    for node, depth, parent in _flatten(result.root):
        match = next((entry for entry in STEPS if node.name.startswith(entry[0])), None)
        if match is None and parent is not None:  # "q" under "split into heads": its parent's code and text
            match = next((entry for entry in STEPS if parent.startswith(entry[0])), None)
        item = {"name": node.name, "depth": depth, "shape": node.shape, "stats": node.stats, "note": node.note}
        if node.tensor is not None:
            item["heatmap"] = heatmap(node.tensor)
        if match is not None:
            if match[1] is not None:
                item["code"] = code_of(match[1], match[2])
            item["text"] = section_for(sections, match[3])
        steps.append(item)
    return {"tokens": result.labels, "layer": layer, "steps": steps, "top_next": result.top_next,
            "checks": {str(k): v for k, v in result.checks.items()}}
