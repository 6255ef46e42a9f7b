"""Causal experiments, through forward hooks on the readable model: activation patching and ablation.

Pictures of attention show where information *could* flow; these experiments show where it
*does* matter, by changing one activation and watching the answer.

Activation patching.  Run a clean prompt ("The capital of France is") and a corrupted one of
the same length ("The capital of Italy is").  Their answers differ, measured as a logit
difference at the last position:  diff = logit[answer] - logit[wrong]  (e.g. " Paris" minus
" Rome").  Then run the corrupted prompt again, but copy ONE activation from the clean run
into it: the residual stream after block l at position t ("resid"), what block l's attention
adds there ("attn"), what its feed-forward adds there ("ffn"), or one attention head's output
at every position ("heads": the head's slice of the input to `wo`).  How much of the answer
comes back,

    restored = (patched_diff - corrupted_diff) / (clean_diff - corrupted_diff),

is 1 where that activation carries everything the answer needs and 0 where it carries
nothing.  The result is a [layers, positions] map ([layers, heads] for "heads").

Ablation switches parts off: a head (its slice of `wo`'s input set to zero) or a whole block
(its output replaced by its input, so it adds nothing), and reports the new top tokens.

Every intervention is a hook on a module of llama3/model.py (a block, its `attention`, its
`feed_forward`, the attention's `wo`), registered for one forward pass and removed afterwards;
hooks act only on the thread that registered them, so a server generating on another thread
at the same time is not touched.  Shapes use the legend of llama3/model.py.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from llama3.errors import Llama3Error
from llama3.inspect.capture import resolve_layers
from llama3.inspect.tokens import as_batch, encode_prompt, token_label, token_labels

SITES = {"resid": "the residual stream after the block", "attn": "what the block's attention adds",
         "ffn": "what the block's feed-forward adds", "heads": "one attention head's output (every position)"}
BATCH = 16  # patched runs per forward pass (one batch row per position or head)


# -------------------------------------------------------------------- hooks
@contextmanager
def hooked(module: torch.nn.Module, hook, pre: bool = False):
    """Register `hook` (a forward hook, or a forward pre-hook with pre=True) for the `with` body.

    The hook runs only for forward passes on the calling thread; removed on exit, also on errors."""
    owner = threading.get_ident()

    def guarded(mod, *rest):
        return hook(mod, *rest) if threading.get_ident() == owner else None

    handle = module.register_forward_pre_hook(guarded) if pre else module.register_forward_hook(guarded)
    try:
        yield
    finally:
        handle.remove()


def site_module(model, site: str, layer: int) -> tuple[torch.nn.Module, bool]:
    """The module whose output (or, for heads, whose input: pre=True) a site names."""
    block = model.layers[layer]
    return {"resid": (block, False), "attn": (block.attention, False), "ffn": (block.feed_forward, False),
            "heads": (block.attention.wo, True)}[site]


def record_sites(model, tokens: torch.Tensor, site: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward pass of tokens [1, T] -> (each layer's activation at `site`, logits [1, T, V]).
    resid/attn/ffn: [1, T, D]; heads: [1, T, H*Dh] (the concatenated heads entering wo)."""
    seen: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for i in range(len(model.layers)):
            module, pre = site_module(model, site, i)

            def keep(mod, args, *output, i=i, pre=pre):
                seen[i] = (args[0] if pre else output[0]).detach().clone()

            stack.enter_context(hooked(module, keep, pre))
        logits = model(tokens).float()
    return [seen[i] for i in range(len(model.layers))], logits


def resolve_token(llm, token: int | str | None, what: str) -> int | None:
    """A token given as an id or as text that is exactly one token (e.g. " Paris") -> its id."""
    if token is None:
        return None
    if isinstance(token, int) or (isinstance(token, str) and token.lstrip("#").isdigit() and token.startswith("#")):
        i = int(str(token).lstrip("#"))
        if not 0 <= i < llm.config.vocab_size:
            raise Llama3Error(f"{what} id {i} is outside the vocabulary (0..{llm.config.vocab_size - 1})")
        return i
    if llm.tokenizer is None:
        raise Llama3Error(f"{what} {token!r}: this model has no tokenizer; give a token id as #ID")
    ids = list(llm.tokenizer.encode(token, bos=False))
    if len(ids) != 1:
        pieces = " | ".join(token_labels(llm.tokenizer, ids)) or "nothing"
        raise Llama3Error(f"{what} {token!r} is {len(ids)} tokens ({pieces}), not one; give one token "
                          "(mind the leading space, e.g. ' Paris') or an id as #ID")
    return ids[0]


# ----------------------------------------------------------------- patching
@dataclass
class PatchResult:
    site: str
    clean: list[str]              # the clean prompt's tokens (printable)
    corrupted: list[str]          # the corrupted prompt's tokens
    answer: tuple[int, str]       # (id, token) the clean prompt should answer
    wrong: tuple[int, str]        # (id, token) the corrupted prompt answers instead
    clean_diff: float             # logit[answer] - logit[wrong] at the last position, clean run
    corrupted_diff: float         # the same, corrupted run
    patched_diff: torch.Tensor    # [L, T] ([L, H] for heads): the same, after each patch
    restored: torch.Tensor        # [L, T] ([L, H]): (patched - corrupted) / (clean - corrupted)
    rows: list[str]               # "block 0" .. "block L-1"
    columns: list[str]            # position labels "t: clean/corrupted" or "head h (kv k)"

    def to_dict(self) -> dict:
        return {"site": self.site, "site_means": SITES[self.site], "clean": self.clean, "corrupted": self.corrupted,
                "answer": {"id": self.answer[0], "token": self.answer[1]},
                "wrong": {"id": self.wrong[0], "token": self.wrong[1]},
                "clean_diff": self.clean_diff, "corrupted_diff": self.corrupted_diff,
                "rows": self.rows, "columns": self.columns,
                "restored": self.restored.tolist(), "patched_diff": self.patched_diff.tolist()}


def logit_diff(logits: torch.Tensor, answer: int, wrong: int) -> torch.Tensor:
    """logits [..., T, V] -> logit[answer] - logit[wrong] at the last position, [...]."""
    last = logits[..., -1, :].float()
    return last[..., answer] - last[..., wrong]


@torch.no_grad()
def patch(llm, clean: str | list[int], corrupted: str | list[int], answer: int | str | None = None,
          wrong: int | str | None = None, site: str = "resid", layers=None) -> PatchResult:
    """Activation patching from the clean run into the corrupted one at every (layer, position).

    answer / wrong: the two competing next tokens (ids, or text of exactly one token); by default
    the clean run's top token and the corrupted run's top token.  site: "resid", "attn", "ffn"
    or "heads" (see SITES).  layers: None (all) or which layers to patch (rows of the result).
    """
    if site not in SITES:
        raise Llama3Error(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
    model = llm.model
    clean_ids, bad_ids = encode_prompt(llm, clean), encode_prompt(llm, corrupted)
    if len(clean_ids) != len(bad_ids):
        raise Llama3Error(f"the clean prompt has {len(clean_ids)} tokens and the corrupted one {len(bad_ids)}; "
                          "patching copies position by position, so give prompts of the same length in tokens")
    rows = resolve_layers(model, "all" if layers is None else layers)
    clean_acts, clean_logits = record_sites(model, as_batch(llm, clean_ids), site)
    bad_tokens = as_batch(llm, bad_ids)
    bad_logits = model(bad_tokens).float()
    answer_id = resolve_token(llm, answer, "answer")
    wrong_id = resolve_token(llm, wrong, "wrong")
    answer_id = int(clean_logits[0, -1].argmax()) if answer_id is None else answer_id
    wrong_id = int(bad_logits[0, -1].argmax()) if wrong_id is None else wrong_id
    if answer_id == wrong_id:
        raise Llama3Error(f"answer and wrong are the same token ({token_label(llm.tokenizer, answer_id)!r}): both "
                          "prompts predict it; name two different tokens with answer= and wrong=")
    clean_diff = float(logit_diff(clean_logits[0], answer_id, wrong_id))
    bad_diff = float(logit_diff(bad_logits[0], answer_id, wrong_id))
    if abs(clean_diff - bad_diff) < 1e-6:
        raise Llama3Error(f"the two prompts give the same logit difference ({clean_diff:.3g}) between "
                          f"{token_label(llm.tokenizer, answer_id)!r} and {token_label(llm.tokenizer, wrong_id)!r}, "
                          "so there is nothing to restore; choose prompts or tokens they disagree on")

    t, c = len(clean_ids), llm.config
    variants = c.n_heads if site == "heads" else t            # one patched run per head, or per position
    patched = torch.empty(len(rows), variants)
    for r, layer in enumerate(rows):
        module, pre = site_module(model, site, layer)
        source = clean_acts[layer]                            # [1, T, D] or [1, T, H*Dh]
        for start in range(0, variants, BATCH):
            which = list(range(start, min(start + BATCH, variants)))

            def swap(mod, args, *output, which=which, source=source, pre=pre):
                value = (args[0] if pre else output[0]).clone()      # [n, T, D] or [n, T, H*Dh]
                for n, k in enumerate(which):
                    if site == "heads":                              # head k at every position
                        cols = slice(k * c.head_dim, (k + 1) * c.head_dim)
                        value[n, :, cols] = source[0, :, cols]
                    else:                                            # every channel at position k
                        value[n, k] = source[0, k]
                return (value,) + tuple(args[1:]) if pre else value

            with hooked(module, swap, pre):
                logits = model(bad_tokens.expand(len(which), -1)).float()  # [n, T, V]
            patched[r, start:start + len(which)] = logit_diff(logits, answer_id, wrong_id).cpu()
    restored = (patched - bad_diff) / (clean_diff - bad_diff)
    tok = llm.tokenizer
    clean_labels, bad_labels = token_labels(tok, clean_ids), token_labels(tok, bad_ids)
    if site == "heads":
        columns = [f"head {h} (kv {h // c.n_rep})" for h in range(c.n_heads)]
    else:
        columns = [f"{j}: {a}" if a == b else f"{j}: {a}/{b}" for j, (a, b) in enumerate(zip(clean_labels, bad_labels))]
    return PatchResult(site, clean_labels, bad_labels, (answer_id, token_label(tok, answer_id)),
                       (wrong_id, token_label(tok, wrong_id)), clean_diff, bad_diff, patched, restored,
                       [f"block {i}" for i in rows], columns)


def plot_patching(result: PatchResult, path):
    """The restored fraction as a heatmap: rows = blocks (first at the bottom), columns = positions or heads."""
    from llama3.inspect.figures import new_figure, save_figure

    n_rows, n_cols = result.restored.shape
    fig = new_figure(min(24.0, 3.0 + 0.7 * n_cols), min(30.0, 2.0 + 0.25 * n_rows))
    ax = fig.add_subplot()
    limit = max(1.0, float(result.restored.abs().max()))
    image = ax.imshow(result.restored.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    ax.set_xticks(range(n_cols), result.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), result.rows, fontsize=7)
    ax.set_xlabel("head patched (all positions)" if result.site == "heads" else "position patched")
    ax.set_title(f"activation patching ({SITES[result.site]}): share of "
                 f"logit[{result.answer[1]}] − logit[{result.wrong[1]}] restored", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.6, label="restored fraction (1 = the clean answer)")
    return save_figure(fig, path)


# ----------------------------------------------------------------- ablation
@dataclass
class Ablation:
    tokens: list[str]
    switched_off: list[str]       # "head 3.1", "block 5", ...
    before: list[dict]            # top next tokens of the intact model [{"id", "token", "prob"}]
    after: list[dict]             # ... with the parts switched off

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "switched_off": self.switched_off, "before": self.before, "after": self.after}


def _top(tok, logits: torch.Tensor, k: int) -> list[dict]:
    probs = logits.float().softmax(-1)                                   # [V]
    best = probs.topk(min(k, probs.numel()))
    return [{"id": int(i), "token": token_label(tok, int(i)), "prob": float(p)}
            for p, i in zip(best.values, best.indices)]


@torch.no_grad()
def ablate(llm, prompt: str | list[int], heads=(), blocks=(), top_k: int = 5) -> Ablation:
    """Switch off attention heads ((layer, head) pairs: the head's output zeroed before `wo`) and whole
    blocks (layer indices: the block's output is its input), and compare the next-token top_k."""
    model, c = llm.model, llm.config
    ids = encode_prompt(llm, prompt)
    tokens = as_batch(llm, ids)
    heads = [(resolve_layers(model, layer)[0], int(h)) for layer, h in heads]
    blocks = sorted(set(resolve_layers(model, list(blocks))))
    for layer, h in heads:
        if not 0 <= h < c.n_heads:
            raise Llama3Error(f"head {h} does not exist; layer {layer} has heads 0..{c.n_heads - 1}")
    if not heads and not blocks:
        raise Llama3Error("nothing to switch off: name at least one head (layer.head) or block")
    before = model(tokens)[0, -1]
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)

    def silence(heads_off):
        def pre(mod, args):
            x = args[0].clone()                                          # [B, T, H*Dh]
            for h in heads_off:
                x[..., h * c.head_dim:(h + 1) * c.head_dim] = 0
            return (x,) + tuple(args[1:])
        return pre

    def skip(mod, args, output):                                         # the block adds nothing
        return args[0]

    with ExitStack() as stack:
        for layer, off in by_layer.items():
            stack.enter_context(hooked(model.layers[layer].attention.wo, silence(off), pre=True))
        for layer in blocks:
            stack.enter_context(hooked(model.layers[layer], skip))
        after = model(tokens)[0, -1]
    names = [f"head {layer}.{h}" for layer, h in heads] + [f"block {b}" for b in blocks]
    return Ablation(token_labels(llm.tokenizer, ids), names, _top(llm.tokenizer, before, top_k),
                    _top(llm.tokenizer, after, top_k))
