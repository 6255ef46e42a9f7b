"""`llama3 inspect attention`: who looks at whom.  Attention weights of one layer as heatmaps.

Row i of a head's map is query token i; column j is key token j; the cell is how
much of token j's value vector flows into token i's output.  Rows sum to 1 and
everything above the diagonal is 0 (the causal mask: no peeking ahead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llama3.errors import Llama3Error
from llama3.inspect.capture import capture, resolve_layers
from llama3.inspect.figures import new_figure, save_figure
from llama3.inspect.tokens import as_batch, encode_prompt, token_labels


@dataclass
class AttentionMaps:
    layer: int
    ids: list[int]
    labels: list[str]
    weights: torch.Tensor   # [H, T, S] float32 on the CPU, S == T
    n_rep: int              # query heads per key/value head

    @property
    def n_heads(self) -> int:
        return self.weights.shape[0]


def attention_maps(llm, prompt: str | list[int], layer: int = -1) -> AttentionMaps:
    """The attention weights [H, T, T] of `layer` (negative counts from the end) for `prompt`."""
    ids = encode_prompt(llm, prompt)
    (layer,) = resolve_layers(llm.model, layer)
    cap = capture(llm.model, as_batch(llm, ids), attention_layers=layer)
    return AttentionMaps(layer, ids, token_labels(llm.tokenizer, ids),
                         cap.attention_weights[layer][0].float().cpu(), llm.config.n_rep)


def check_head(maps: AttentionMaps, head: int | None) -> None:
    if head is not None and not 0 <= head < maps.n_heads:
        raise Llama3Error(f"head {head} does not exist; layer {maps.layer} has heads 0..{maps.n_heads - 1}")


def _draw(ax, weights: torch.Tensor, labels: list[str] | None, title: str):
    """One heatmap; future cells (above the diagonal) left blank."""
    import numpy as np

    t = weights.shape[0]
    future = np.triu(np.ones((t, t), dtype=bool), k=1)
    image = ax.imshow(np.ma.masked_array(weights.numpy(), future), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9)
    if labels is None:
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.set_xticks(range(t), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(t), labels, fontsize=7)
    return image


def plot_attention(maps: AttentionMaps, path, head: int | None = None):
    """One head as a labelled heatmap, or (head=None) a grid with every head of the layer."""
    check_head(maps, head)
    t = len(maps.ids)
    if head is not None:
        side = min(12.0, 2.5 + 0.28 * t)
        fig = new_figure(side + 1.2, side)
        ax = fig.add_subplot()
        image = _draw(ax, maps.weights[head], maps.labels,
                      f"layer {maps.layer}, head {head} (reads kv head {head // maps.n_rep})")
        ax.set_xlabel("key: token attended to")
        ax.set_ylabel("query: token attending")
    else:
        cols = math.ceil(math.sqrt(maps.n_heads))
        rows = math.ceil(maps.n_heads / cols)
        cell = min(4.0, 1.2 + 0.12 * t)
        fig = new_figure(cols * cell + 1.2, rows * cell + 0.6)
        axes = fig.subplots(rows, cols, squeeze=False)
        show_labels = t <= 24
        for h, ax in enumerate(axes.flat):
            if h >= maps.n_heads:
                ax.axis("off")
                continue
            image = _draw(ax, maps.weights[h], maps.labels if show_labels else None,
                          f"head {h} (kv {h // maps.n_rep})")
            if show_labels and h % cols:            # token names only on the left column
                ax.set_yticklabels([])
            if show_labels and h < maps.n_heads - cols:  # ...and the bottom row
                ax.set_xticklabels([])
        fig.suptitle(f"attention weights, layer {maps.layer}: rows = queries, columns = keys", fontsize=11)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention weight")
    return save_figure(fig, path)


def describe_attention(maps: AttentionMaps, head: int | None = None, top: int = 3) -> str:
    """Terminal summary: for each head, where the last token looks (its top keys)."""
    check_head(maps, head)
    heads = range(maps.n_heads) if head is None else [head]
    lines = [f"layer {maps.layer}: where the last token ({maps.labels[-1]}) looks"]
    for h in heads:
        row = maps.weights[h, -1]                                    # [S]
        best = row.topk(min(top, row.numel()))
        spots = ", ".join(f"{maps.labels[j]}@{j} {w:.2f}" for w, j in zip(best.values.tolist(), best.indices.tolist()))
        lines.append(f"  head {h:>2} (kv {h // maps.n_rep}): {spots}")
    return "\n".join(lines)
