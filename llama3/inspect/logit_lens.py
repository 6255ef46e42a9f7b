"""`llama3 inspect logit-lens`: what would the model say if it stopped after block l?

The residual stream h [B, T, D] after every block has the same shape as the last
one, so the model's own final norm and output head can read it early:
logits_l = output(norm(h_l)).  Watching the top token change from layer to layer
shows when the answer forms.  The last row *is* the model's real prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama3.inspect.capture import capture
from llama3.inspect.figures import new_figure, save_figure
from llama3.inspect.tokens import as_batch, encode_prompt, token_labels


@dataclass
class LogitLens:
    ids: list[int]
    labels: list[str]            # input tokens, T of them
    rows: list[str]              # "embedding", "block 0", ..., "block L-1"
    top_ids: torch.Tensor        # [L+1, T] most likely next token read at each layer and position
    top_probs: torch.Tensor      # [L+1, T] its probability
    top_labels: list[list[str]]  # [L+1][T] printable top tokens


@torch.no_grad()
def logit_lens(llm, prompt: str | list[int]) -> LogitLens:
    """Apply the final norm + output head to the stream after the embedding and after each block."""
    model = llm.model
    ids = encode_prompt(llm, prompt)
    cap = capture(model, as_batch(llm, ids))
    streams = [cap.embedding] + cap.block_outputs                      # L+1 x [1, T, D]
    top_ids, top_probs = [], []
    for h in streams:
        probs = model.output(model.norm(h)).float().softmax(-1)[0]     # [T, V]
        p, i = probs.max(-1)                                           # [T] each
        top_ids.append(i.cpu())
        top_probs.append(p.cpu())
    top_ids, top_probs = torch.stack(top_ids), torch.stack(top_probs)  # [L+1, T]
    rows = ["embedding"] + [f"block {i}" for i in range(len(model.layers))]
    labels = [token_labels(llm.tokenizer, r) for r in top_ids.tolist()]
    return LogitLens(ids, token_labels(llm.tokenizer, ids), rows, top_ids, top_probs, labels)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def label_legend(labels: list[str], width: int) -> str:
    """What the marks in token labels mean, and the full text of every label `_cut` shortens."""
    cut = sorted({lab for lab in labels if len(lab) > width})
    legend = "␣ space, ↵ newline, ⇥ tab; … = cut to fit"
    if cut:
        legend += ": " + ", ".join(f"{_cut(lab, width)} is {lab}" for lab in cut[:4]) + (", …" if len(cut) > 4 else "")
    return legend


def render_table(lens: LogitLens, max_positions: int = 8, cell: int = 11) -> str:
    """Rows = layers (last at the bottom), columns = the last `max_positions` input positions."""
    first = max(0, len(lens.ids) - max_positions)
    cols = range(first, len(lens.ids))
    head = f"{'':<10}" + "".join(f"{_cut(lens.labels[j], cell - 1):<{cell}}" for j in cols)
    lines = ["top next-token guess read at each layer (columns: input tokens; each cell: top token, probability)",
             head, "-" * len(head)]
    for r, name in enumerate(lens.rows):
        cells = "".join(f"{_cut(lens.top_labels[r][j], cell - 6)} {lens.top_probs[r, j]:.2f} ".ljust(cell)[:cell]
                        for j in cols)
        lines.append(f"{name:<10}{cells}")
    lines.append(label_legend([lens.top_labels[r][j] for r in range(len(lens.rows)) for j in cols], cell - 6))
    if first:
        lines.append(f"(first {first} positions not shown; the picture has them all)")
    return "\n".join(lines)


def plot_logit_lens(lens: LogitLens, path):
    """Heatmap of the top token's probability, layer × position, each cell labelled with the token."""
    n_rows, t = lens.top_probs.shape
    fig = new_figure(min(24.0, 2.5 + 0.95 * t), min(30.0, 1.5 + 0.28 * n_rows))
    ax = fig.add_subplot()
    image = ax.imshow(lens.top_probs.numpy(), cmap="magma", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for r in range(n_rows):
        for j in range(t):
            p = float(lens.top_probs[r, j])
            ax.text(j, r, _cut(lens.top_labels[r][j], 8), ha="center", va="center", fontsize=7,
                    color="black" if p > 0.45 else "white")
    ax.set_xticks(range(t), lens.labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), lens.rows, fontsize=7)
    ax.set_xlabel("input token (the guess is for the token after it)\n" + label_legend(
        [lab for row in lens.top_labels for lab in row] + lens.labels, 8), fontsize=8)
    ax.set_ylabel("read after")
    ax.set_title("logit lens: top next token and its probability at every layer", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.6, label="probability of the top token")
    return save_figure(fig, path)
