"""`llama3 doctor`: what is this checkpoint, is it configured like the model it claims to be,
and does our implementation compute what transformers computes on it?

    diagnose(source)                 format, settings, tokenizer facts and warnings
    check_settings(config, ...)      the warnings alone, from a config (+ tokenizer)
    compare_with_transformers(...)   one prompt through both implementations, layer by layer

The warnings encode mistakes people really make with Llama 3 checkpoints: Llama 3.2
1B/3B with the Llama 3.1 RoPE factor 8 instead of 32 (llama-models #166, #241), a
tokenizer whose size disagrees with the embedding (transformers #33791), an instruct
model without a chat template, stop tokens that let answers run on (llama3 #104).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama3.config import PRESETS, ModelConfig
from llama3.errors import Llama3Error

LLAMA3_VOCAB = 128256
LLAMA3_THETA = 500000.0
# preset -> the RoPE factor its family uses (None: no scaling)
FAMILY_FACTOR = {"llama-3-8b": None, "llama-3-70b": None, "llama-3.1-8b": 8.0, "llama-3.1-70b": 8.0,
                 "llama-3.1-405b": 8.0, "llama-3.2-1b": 32.0, "llama-3.2-3b": 32.0}


def _shape(c: ModelConfig) -> tuple:
    return (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim)


def shape_matches(config: ModelConfig) -> list[str]:
    """Presets whose block shapes (width, depth, heads, FFN size) equal this config's."""
    return [name for name in FAMILY_FACTOR if _shape(PRESETS[name]) == _shape(config)]


def check_settings(config: ModelConfig, tokenizer=None, name: str = "", fmt: str = "") -> list[str]:
    """Known mismatches between a config (+ tokenizer) and the Llama 3 model it looks like."""
    warnings = []
    matches = shape_matches(config)
    factor = config.rope_scaling.factor if config.rope_scaling else None
    if any(m.startswith("llama-3.2") for m in matches):
        which = matches[0].removeprefix("llama-").upper()
        if factor != 32.0:
            warnings.append(f"the shape is Llama {which} (dim {config.dim}), which uses RoPE scaling factor 32, "
                            f"but this checkpoint says {factor or 'no scaling'}; positions beyond a few thousand "
                            "tokens will be wrong (llama-models #166): set rope_scaling.factor to 32")
        if not config.tie_embeddings:
            warnings.append(f"Llama {which} ties the output head to the embedding, but this checkpoint has a "
                            "separate output matrix")
    elif matches and factor is not None and factor != 8.0:
        warnings.append(f"the shape is {' or '.join(matches)}, whose Llama 3.1 RoPE scaling factor is 8, "
                        f"but this checkpoint says {factor:g}")
    elif matches and config.tie_embeddings:
        warnings.append(f"{matches[0]} has a separate output head, but this checkpoint ties it to the embedding")
    if config.rope_scaling is None and config.max_seq_len > 8192 and config.rope_theta == LLAMA3_THETA:
        warnings.append(f"max_seq_len is {config.max_seq_len} but RoPE is not scaled; Llama 3 was trained on 8192 "
                        "positions and only Llama 3.1 scaling reaches 128K")
    looks_llama3 = config.vocab_size == LLAMA3_VOCAB or bool(matches)
    if looks_llama3 and config.rope_theta != LLAMA3_THETA:
        warnings.append(f"rope_theta is {config.rope_theta:g}; every Llama 3 model uses {LLAMA3_THETA:g}")
    if tokenizer is None:
        warnings.append("no tokenizer found next to the weights: text cannot be encoded with this checkpoint alone")
        return warnings
    if tokenizer.vocab_size > config.vocab_size:
        warnings.append(f"the tokenizer has {tokenizer.vocab_size} ids but the embedding only {config.vocab_size} "
                        "rows: some tokens would index past the table")
    elif tokenizer.vocab_size < config.vocab_size and config.vocab_size == LLAMA3_VOCAB:
        warnings.append(f"the tokenizer has {tokenizer.vocab_size} ids, Llama 3's embedding {config.vocab_size}: "
                        "special tokens are missing from the tokenizer (transformers #33791)")
    special = tokenizer.special_tokens
    for end_of_turn in ("<|eot_id|>", "<|im_end|>"):
        if end_of_turn in special and special[end_of_turn] not in tokenizer.stop_ids:
            warnings.append(f"{end_of_turn} is not a stop token: chat answers will run past the end of the turn")
    instruct = any(w in name.lower() for w in ("instruct", "chat", "-it"))
    if instruct and fmt != "meta" and not getattr(tokenizer, "chat_template", None):
        warnings.append("the name says instruct/chat, but the checkpoint carries no chat template; "
                        + ("a built-in format is inferred from the special tokens" if tokenizer.chat_format
                           else "chat will not work"))
    return warnings


# ------------------------------------------------------------------ diagnose
@dataclass
class Diagnosis:
    source: str
    format: str
    config: ModelConfig
    settings: dict[str, str]
    warnings: list[str]
    comparison: "Comparison | None" = None

    def to_dict(self) -> dict:
        d = {"source": self.source, "format": self.format, "config": self.config.to_dict(),
             "settings": self.settings, "warnings": self.warnings}
        if self.comparison is not None:
            d["comparison"] = self.comparison.to_dict()
        return d


FORMAT_NAMES = {"hf": "Hugging Face folder (config.json + safetensors)",
                "meta": "Meta folder (params.json + consolidated.*.pth)", "gguf": "GGUF file (llama.cpp)"}


def _chat_template(tokenizer) -> str:
    if tokenizer is None:
        return "-"
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return f"from the checkpoint (Jinja, {len(template)} characters)"
    if tokenizer.chat_format is not None:
        return f"none stored; built-in {type(tokenizer.chat_format).__name__} inferred from the special tokens"
    return "none"


def _hf_generation_stops(path: Path) -> list[int] | None:
    """eos_token_id of an HF folder's generation_config.json (what other tools stop on)."""
    from llama3.checkpoint.files import read_json
    from llama3.errors import CheckpointError

    file = path / "generation_config.json"
    if not file.is_file():
        return None
    eos = read_json(file).get("eos_token_id")
    if eos is None:
        return []
    if isinstance(eos, int) and not isinstance(eos, bool):
        return [eos]
    if isinstance(eos, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        return eos
    raise CheckpointError(f"{file}: eos_token_id must be a token id or a list of token ids, got {eos!r:.60}; "
                          "fix generation_config.json")


def diagnose(source: str | None) -> Diagnosis:
    """Read a checkpoint's configuration and tokenizer (not its weights) and check them."""
    from llama3.checkpoint import detect_format, read_config
    from llama3.llm import resolve_source
    from llama3.tokenizer import find_tokenizer

    path = Path(resolve_source(source))
    fmt = detect_format(path)
    config = read_config(path)
    tokenizer = find_tokenizer(path)
    name = str(source or path.name)
    if fmt == "gguf":
        from llama3.checkpoint.gguf_file import read_metadata

        name += " " + str(read_metadata(path).get("general.name", ""))
    s = config.rope_scaling
    matches = shape_matches(config)
    settings = {
        "format": FORMAT_NAMES[fmt],
        "shape": (f"{config.dim} wide, {config.n_layers} blocks, {config.n_heads} query / {config.n_kv_heads} "
                  f"key-value heads of {config.head_dim}, FFN {config.hidden_dim}"),
        "looks like": ", ".join(matches) if matches else "no Llama 3 preset (a Llama-architecture model)",
        "vocabulary": str(config.vocab_size),
        "rope theta": f"{config.rope_theta:g}",
        "rope scaling": (f"factor {s.factor:g} (low {s.low_freq_factor:g}, high {s.high_freq_factor:g}, "
                         f"original {s.original_max_position_embeddings})" if s else "none"),
        "context": str(config.max_seq_len),
        "output head": "tied to the embedding" if config.tie_embeddings else "its own matrix",
        "tokenizer": "none" if tokenizer is None else f"{type(tokenizer).__name__}, {tokenizer.vocab_size} ids",
        "chat template": _chat_template(tokenizer),
    }
    if tokenizer is not None:
        names = {i: t for t, i in tokenizer.special_tokens.items()}
        settings["stop tokens"] = ", ".join(f"{names.get(i, i)} ({i})" for i in tokenizer.stop_ids) or "none"
    warnings = check_settings(config, tokenizer, name=name, fmt=fmt)
    stops = _hf_generation_stops(path) if fmt == "hf" else None
    if stops is not None and tokenizer is not None and "<|eot_id|>" in tokenizer.special_tokens \
            and tokenizer.special_tokens["<|eot_id|>"] not in stops:
        warnings.append("generation_config.json does not list <|eot_id|> as an end token: other tools using it "
                        "will not stop at the end of an answer (llama3 stops there anyway)")
    return Diagnosis(str(source or path), fmt, config, settings, warnings)


def render_diagnosis(d: Diagnosis) -> str:
    width = max(len(k) for k in d.settings)
    lines = [f"doctor: {d.source}"] + [f"  {k:<{width}}  {v}" for k, v in d.settings.items()]
    lines.append("")
    lines += [f"  ⚠ {w}" for w in d.warnings] or ["  ✓ no known mismatches"]
    if d.comparison is not None:
        lines += ["", d.comparison.render()]
    return "\n".join(lines)


# ------------------------------------------------------- reference comparison
@dataclass
class Comparison:
    """Per stage (embedding, block 0.., final norm, logits): max |Δ|, relative max |Δ|, cosine."""

    reference: str
    ids: list[int]
    stages: list[dict] = field(default_factory=list)
    first_divergence: str | None = None
    tolerance: float = 1e-3

    def to_dict(self) -> dict:
        return {"reference": self.reference, "ids": self.ids, "stages": self.stages,
                "first_divergence": self.first_divergence, "tolerance": self.tolerance}

    def render(self) -> str:
        lines = [f"ours vs {self.reference} on {len(self.ids)} tokens (diverged: a token's ||Δ|| / ||reference|| > {self.tolerance:g})",
                 f"  {'stage':<12} {'max |Δ|':>10} {'relative':>10} {'cosine':>12}"]
        for s in self.stages:
            flag = "  ← first divergence" if s["stage"] == self.first_divergence else ""
            lines.append(f"  {s['stage']:<12} {s['max_abs_diff']:>10.3g} {s['relative']:>10.3g} {s['cosine']:>12.8f}{flag}")
        lines.append(f"  ✓ the two implementations agree at every stage" if self.first_divergence is None
                     else f"  ✗ they diverge first at {self.first_divergence}")
        return "\n".join(lines)


def load_transformers_reference(path: str | Path):
    """transformers' LlamaForCausalLM for an HF folder or a GGUF file, float32, eval mode."""
    from llama3.checkpoint import detect_format

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise Llama3Error("--reference transformers needs the transformers package: pip install transformers") from None
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "meta":
        raise Llama3Error("transformers cannot read Meta folders; convert first "
                          "(llama3 convert SOURCE --to hf OUT) and run doctor on the HF folder OUT")
    if fmt == "gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def reference_stages(hf_model, ids: list[int]) -> list[torch.Tensor]:
    """transformers' residual stream at the same boundaries as ours, captured by hooks:
    embedding, every decoder layer's output, final norm, logits."""
    from llama3.inspect.capture import recording

    inner = hf_model.model
    modules = {"embedding": inner.embed_tokens, "norm": inner.norm}
    modules.update({f"block{i}": layer for i, layer in enumerate(inner.layers)})
    with recording(modules) as seen:
        logits = hf_model(torch.tensor([ids])).logits.float()
    return ([seen["embedding"]] + [seen[f"block{i}"] for i in range(len(inner.layers))]
            + [seen["norm"], logits])


@torch.no_grad()
def compare_stages(ours: list[torch.Tensor], theirs: list[torch.Tensor], names: list[str],
                   reference: str, ids: list[int], tolerance: float = 1e-3) -> Comparison:
    """Stage by stage: max |Δ|, cosine similarity, and the relative error of the worst token,
    max_t ||Δ_t|| / ||reference_t||.  Per token, because a few huge activations (the first token
    often carries values in the thousands) would otherwise hide a real difference elsewhere."""
    result = Comparison(reference, ids, tolerance=tolerance)
    for name, a, b in zip(names, ours, theirs):
        a, b = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])  # [B*T, D or V]
        diff = (a - b).abs().max().item()
        relative = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max().item()
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        result.stages.append({"stage": name, "max_abs_diff": diff, "relative": relative, "cosine": cosine})
        if result.first_divergence is None and relative > tolerance:
            result.first_divergence = name
    return result


def compare_with_transformers(llm, reference_model, ids: list[int], tolerance: float = 1e-3) -> Comparison:
    """Run `ids` through our model and transformers' and compare every block boundary."""
    from llama3.inspect.capture import capture
    from llama3.inspect.tokens import as_batch

    cap = capture(llm.model, as_batch(llm, ids))
    ours = [cap.embedding] + cap.block_outputs + [cap.final_norm, cap.logits]
    theirs = [t.to(llm.device) for t in reference_stages(reference_model, ids)]
    names = ["embedding"] + [f"block {i}" for i in range(len(cap.block_outputs))] + ["final norm", "logits"]
    return compare_stages(ours, theirs, names, "transformers", ids, tolerance)
