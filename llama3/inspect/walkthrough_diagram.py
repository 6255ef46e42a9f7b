"""The encoder/decoder picture of the walkthrough, drawn by matplotlib from a ModelConfig.

Left: the original Transformer (Vaswani et al. 2017; T5 has the same two halves), an
encoder stack and a decoder stack joined by cross-attention.  Right: the live model, a
Llama, which keeps only the decoder and drops its cross-attention.  The right panel's
numbers (blocks, heads, widths, vocabulary) come from the config it is given.
"""

from __future__ import annotations

from llama3.config import ModelConfig
from llama3.inspect.figures import new_figure, save_figure

COLOURS = {"attention": "#cfe2f3", "masked": "#9fc5e8", "cross": "#f4b183", "norm": "#fff2cc",
           "ffn": "#d9ead3", "io": "#eeeeee", "residual": "#ffffff"}
ROW = 0.62          # height of one box, in axis units
GAP = 0.22          # space between boxes


def _box(ax, x: float, y: float, width: float, text: str, kind: str) -> tuple[float, float]:
    """One labelled box with its lower-left corner at (x, y); returns its top centre."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), width, ROW, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=COLOURS[kind], edgecolor="#555555", linewidth=0.8))
    ax.text(x + width / 2, y + ROW / 2, text, ha="center", va="center", fontsize=7.2)
    return x + width / 2, y + ROW


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], colour: str = "#444444", **kw) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.0, **kw))


def _stack(ax, x: float, width: float, below: list[tuple[str, str]], repeated: list[tuple[str, str]],
           above: list[tuple[str, str]], repeat_label: str, label_right: bool = False,
           ) -> dict[str, tuple[float, float, float]]:
    """Boxes bottom to top, the `repeated` ones framed as one block; returns text -> (x, y, width).
    A "residual" box gets a skip line from the input of the sub-layer it closes (the last "norm")."""
    from matplotlib.patches import Rectangle

    where, y, previous, branch = {}, 0.3, None, None
    for group in (below, repeated, above):
        if group is repeated:
            frame_bottom = y - GAP / 2
        for text, kind in group:
            if kind == "norm":
                branch = y - GAP / 2                          # the stream splits here: norm -> sub-layer, and the skip
            top = _box(ax, x, y, width, text, kind)
            if kind == "residual" and branch is not None:
                side = x + width + 0.12
                ax.plot([x + width / 2, side, side], [branch, branch, y + ROW / 2], color="#444444", lw=0.9)
                _arrow(ax, (side, y + ROW / 2), (x + width, y + ROW / 2))
            if previous is not None:
                _arrow(ax, previous, (x + width / 2, y))
            where[text], previous, y = (x, y, width), top, y + ROW + GAP
        if group is repeated:
            frame_top = y - GAP / 2
            ax.add_patch(Rectangle((x - 0.15, frame_bottom), width + 0.35, frame_top - frame_bottom, fill=False,
                                   linestyle="--", edgecolor="#888888", linewidth=0.9))
            ax.text(x + width + 0.35 if label_right else x - 0.25, (frame_bottom + frame_top) / 2, repeat_label,
                    ha="left" if label_right else "right", va="center", fontsize=8, rotation=90)
    return where


def plot_encoder_decoder(config: ModelConfig, path, model_name: str = "this model"):
    """Two panels: encoder-decoder (2017 Transformer, T5) and decoder-only (Llama, with config's numbers)."""
    fig = new_figure(11.0, 6.4)
    left, right = fig.subplots(1, 2, width_ratios=[2.0, 1.15])
    for ax in (left, right):
        ax.set_xlim(-0.6, 10.6 if ax is left else 5.6)
        ax.set_ylim(0, 9.9)
        ax.axis("off")

    encoder = _stack(left, 0.4, 3.8,
                     [("input tokens (the whole source text)", "io"), ("embedding + positions", "io")],
                     [("self-attention: every token sees every token", "attention"), ("add & norm", "norm"),
                      ("feed-forward", "ffn"), ("add & norm", "norm")],
                     [("encoder output: one vector per source token", "io")], "× N encoder blocks")
    decoder = _stack(left, 5.6, 4.3,
                     [("output tokens so far (shifted right)", "io"), ("embedding + positions", "io")],
                     [("masked self-attention: only earlier tokens", "masked"), ("add & norm", "norm"),
                      ("cross-attention: k, v from the encoder", "cross"), ("add & norm", "norm"),
                      ("feed-forward", "ffn"), ("add & norm", "norm")],
                     [("linear → softmax → next token", "io")], "× N decoder blocks", label_right=True)
    ex, ey, ew = encoder["encoder output: one vector per source token"]
    cx, cy, _ = decoder["cross-attention: k, v from the encoder"]
    _arrow(left, (ex + ew, ey + ROW / 2), (cx, cy + ROW / 2), colour="#c55a11", connectionstyle="arc3,rad=-0.25")
    left.text(2.3, 6.6, "encoder (BERT keeps only this half)", ha="center", fontsize=9, weight="bold")
    left.text(7.75, 8.25, "decoder", ha="center", fontsize=9, weight="bold")
    left.set_title("encoder-decoder: the 2017 Transformer, T5", fontsize=10)

    c = config
    _stack(right, 0.5, 4.6,
           [("tokens [B, T]", "io"), (f"tok_embeddings  {c.vocab_size} × {c.dim}", "io")],
           [("RMSNorm", "norm"),
            (f"masked self-attention, RoPE\n{c.n_heads} query heads, {c.n_kv_heads} key/value heads", "masked"),
            ("+ residual", "residual"), ("RMSNorm", "norm"),
            (f"SwiGLU feed-forward  {c.dim} → {c.hidden_dim} → {c.dim}", "ffn"), ("+ residual", "residual")],
           [("RMSNorm", "norm"), (f"output  {c.dim} → {c.vocab_size}" + (" (tied)" if c.tie_embeddings else ""), "io"),
            ("softmax → next token", "io")], f"× {c.n_layers} blocks")
    right.set_title(f"decoder-only: GPT, Llama ({model_name})\nno encoder, no cross-attention", fontsize=10)
    return save_figure(fig, path)
