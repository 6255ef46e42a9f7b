"""`llama3 inspect rope`: how fast each channel pair turns, with and without Llama 3.1 scaling.

RoPE turns channel pair i of a query/key by angle p·f_i at position p, with
f_i = θ^(−2i/Dh) (llama3.model.rope_frequencies).  A pair's wavelength 2π/f_i is
how many positions one full turn takes.  Llama 3.1 scaling keeps fast pairs
(wavelength < 2048) as they are, slows pairs slower than 8192 down by `factor`
(8 for Llama 3.1, 32 for Llama 3.2 1B/3B) and blends the band between.
"""

from __future__ import annotations

import math

import torch

from llama3.config import ModelConfig, RopeScaling
from llama3.inspect.figures import new_figure, save_figure
from llama3.model import rope_frequencies


def rope_variants(config: ModelConfig) -> dict[str, RopeScaling | None]:
    """The scalings worth comparing for this config: none, its own, and the two Llama ones."""
    variants: dict[str, RopeScaling | None] = {"no scaling (Llama 3)": None}
    base = config.rope_scaling or RopeScaling()
    for factor, who in ((8.0, "Llama 3.1"), (32.0, "Llama 3.2 1B/3B")):
        variants[f"factor {factor:g} ({who})"] = RopeScaling(factor, base.low_freq_factor, base.high_freq_factor,
                                                          base.original_max_position_embeddings)
    if config.rope_scaling is not None and config.rope_scaling.factor not in (8.0, 32.0):
        variants[f"factor {config.rope_scaling.factor:g} (this model)"] = config.rope_scaling
    return variants


def rope_curves(config: ModelConfig) -> dict[str, torch.Tensor]:
    """label -> frequencies [Dh/2] for each variant."""
    return {label: rope_frequencies(config.head_dim, config.rope_theta, s) for label, s in rope_variants(config).items()}


def render_rope(config: ModelConfig, every: int | None = None) -> str:
    """A table of frequency and wavelength per pair for each variant, and where the bands fall."""
    curves = rope_curves(config)
    n = config.head_dim // 2
    every = every or max(1, n // 16)
    s = config.rope_scaling or RopeScaling()
    high, low = s.original_max_position_embeddings / s.high_freq_factor, s.original_max_position_embeddings / s.low_freq_factor
    base = curves["no scaling (Llama 3)"]
    wavelength = 2 * math.pi / base
    kept, slowed = int((wavelength < high).sum()), int((wavelength > low).sum())
    lines = [f"RoPE for head_dim Dh={config.head_dim}, theta={config.rope_theta:g}: {n} channel pairs",
             f"pair i turns by p·f_i per position p, f_i = theta^(-2i/Dh); wavelength = 2π/f_i positions",
             f"scaling keeps pairs with wavelength < {high:g} ({kept} pairs), slows those > {low:g} "
             f"({slowed} pairs) by the factor, blends the {n - kept - slowed} between",
             ""]
    labels = list(curves)
    lines.append(f"{'pair':>5} {'frequency':>11} {'wavelength':>11}" + "".join(f"  {'λ ' + l.split(' (')[0]:>16}" for l in labels[1:]))
    for i in list(range(0, n, every)) + ([n - 1] if (n - 1) % every else []):
        row = f"{i:>5} {float(base[i]):>11.4g} {float(wavelength[i]):>11.4g}"
        row += "".join(f"  {2 * math.pi / float(curves[l][i]):>16.4g}" for l in labels[1:])
        lines.append(row)
    return "\n".join(lines)


def plot_rope(config: ModelConfig, path, title: str = ""):
    """Two panels: frequency per pair and wavelength per pair (log scale), one line per variant."""
    curves = rope_curves(config)
    s = config.rope_scaling or RopeScaling()
    high, low = s.original_max_position_embeddings / s.high_freq_factor, s.original_max_position_embeddings / s.low_freq_factor
    fig = new_figure(11.0, 4.2)
    ax_f, ax_w = fig.subplots(1, 2)
    pairs = range(config.head_dim // 2)
    for (label, freqs), style in zip(curves.items(), ("-", "--", ":", "-.")):
        ax_f.plot(pairs, freqs.numpy(), style, label=label, linewidth=1.6)
        ax_w.plot(pairs, (2 * math.pi / freqs).numpy(), style, label=label, linewidth=1.6)
    ax_f.set_yscale("log")
    ax_f.set_xlabel("channel pair i")
    ax_f.set_ylabel("radians per position")
    ax_f.set_title("rotation speed f_i")
    ax_w.set_yscale("log")
    ax_w.axhline(high, color="gray", linewidth=0.8)
    ax_w.axhline(low, color="gray", linewidth=0.8)
    ax_w.text(0, high, f" kept below {high:g}", va="bottom", fontsize=7, color="gray")
    ax_w.text(0, low, f" slowed above {low:g}", va="bottom", fontsize=7, color="gray")
    ax_w.set_xlabel("channel pair i")
    ax_w.set_ylabel("positions per full turn")
    ax_w.set_title("wavelength 2π / f_i")
    ax_w.legend(fontsize=8)
    fig.suptitle(title or f"RoPE, Dh={config.head_dim}, θ={config.rope_theta:g}", fontsize=11)
    return save_figure(fig, path)
