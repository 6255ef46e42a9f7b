"""Watch a forward pass from the outside: forward hooks that record activations, then vanish.

The model itself has no inspection flags.  To see inside we

  * register forward hooks on the modules we care about (the embedding, each
    block, each block's attention and feed-forward, the final norm), run one
    ordinary forward pass, and remove the hooks again;
  * to see attention weights, switch the chosen layers to the explicit
    attention path (`layer.attention.fused = False`) for this one pass and hook
    `layer.attention.softmax`, the nn.Softmax whose output *is* the weight
    matrix [B, H, T, S].  The fused flag is restored afterwards.

So a forward pass nobody is watching runs exactly as before: no hooks, fused
attention.  Shapes use the legend of llama3/model.py.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from llama3.errors import Llama3Error
from llama3.model import Transformer


@dataclass
class Capture:
    """What one watched forward pass saw.  Lists are indexed by layer."""

    tokens: torch.Tensor                     # [B, T] the input ids
    embedding: torch.Tensor                  # [B, T, D] tok_embeddings(tokens)
    block_inputs: list[torch.Tensor]         # [B, T, D] the residual stream entering each block
    attention_out: list[torch.Tensor]        # [B, T, D] what attention adds to the stream (after wo)
    ffn_out: list[torch.Tensor]              # [B, T, D] what the feed-forward adds
    block_outputs: list[torch.Tensor]        # [B, T, D] the stream leaving each block
    final_norm: torch.Tensor                 # [B, T, D] norm(last block output)
    logits: torch.Tensor                     # [B, T, V] float32
    attention_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, T, S]


@contextmanager
def explicit_attention(model: Transformer, layers):
    """Route `layers` through the explicit softmax(QKᵀ/√Dh)·V path; restore each `fused` flag on exit."""
    saved = {i: model.layers[i].attention.fused for i in layers}
    try:
        for i in saved:
            model.layers[i].attention.fused = False
        yield
    finally:
        for i, fused in saved.items():
            model.layers[i].attention.fused = fused


@contextmanager
def recording(modules: dict[str, torch.nn.Module], record: str = "output"):
    """Hook each named module; yields a dict name -> its last output (or first input), detached.

    Hooks are removed on exit, also when the forward pass raises.  They record only forward passes
    on the calling thread, so a server generating on another thread meanwhile is not recorded."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    owner = threading.get_ident()
    for name, module in modules.items():
        def hook(mod, args, output, name=name):
            if threading.get_ident() != owner:
                return
            value = args[0] if record == "input" else output
            seen[name] = (value[0] if isinstance(value, tuple) else value).detach()
        handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def resolve_layers(model: Transformer, layers) -> list[int]:
    """None -> []; "all" -> every layer; ints (negative counts from the end) -> checked indices."""
    n = len(model.layers)
    if layers is None:
        return []
    if layers == "all":
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if not -n <= i < n:
            raise Llama3Error(f"layer {i} does not exist; this model has layers 0..{n - 1} (or -1 for the last)")
        out.append(i % n)
    return out


@torch.no_grad()
def capture(model: Transformer, tokens: torch.Tensor, attention_layers=None) -> Capture:
    """Run `model` once on tokens [B, T] and record the residual stream at every block boundary.

    attention_layers: None, "all", a layer index or a list of them: whose attention
    weights [B, H, T, S] to record (those layers run the explicit path for this call).
    """
    layers = resolve_layers(model, attention_layers)
    outputs = {"embedding": model.tok_embeddings, "norm": model.norm}
    for i, block in enumerate(model.layers):
        outputs[f"block{i}"] = block
        outputs[f"attention{i}"] = block.attention
        outputs[f"ffn{i}"] = block.feed_forward
    softmaxes = {f"weights{i}": model.layers[i].attention.softmax for i in layers}
    inputs = {f"block{i}": block for i, block in enumerate(model.layers)}
    with explicit_attention(model, layers), recording(outputs) as out, \
            recording(softmaxes) as weights, recording(inputs, record="input") as ins:
        logits = model(tokens)
    n = len(model.layers)
    return Capture(
        tokens=tokens,
        embedding=out["embedding"],
        block_inputs=[ins[f"block{i}"] for i in range(n)],
        attention_out=[out[f"attention{i}"] for i in range(n)],
        ffn_out=[out[f"ffn{i}"] for i in range(n)],
        block_outputs=[out[f"block{i}"] for i in range(n)],
        final_norm=out["norm"],
        logits=logits,
        attention_weights={i: weights[f"weights{i}"] for i in layers},
    )
