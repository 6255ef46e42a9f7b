"""The walkthrough's concept sections: encoder/decoder, LayerNorm vs RMSNorm, multi-head attention head by
head, the KV cache; and the wording of the residual and logit-lens parts.

Each concept is computed the textbook way (walkthrough_concepts.py) and checked here against an
independent reference: torch.nn.functional.layer_norm, the model's own modules observed through forward
hooks, the model's own forward with and without a KVCache, and byte counts written out by hand."""

import string

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from llama3.inspect.capture import capture, recording
from llama3.inspect.logit_lens import label_legend, logit_lens, render_table
from llama3.inspect.tokens import as_batch, encode_prompt, token_labels
from llama3.inspect.walkthrough import lens_fields, measure, render_walkthrough, residual_fields, trend, trend_text
from llama3.inspect.walkthrough_concepts import (allocated_kv_bytes, attention_head_by_head, compare_norms, decode,
                                                 interleaved_split, kv_cache_bytes, layer_norm_by_formula, split_heads,
                                                 time_decoding)
from llama3.llm import LLM
from test_inspect import CharTokenizer, picture_ok

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def real(default_llm):
    """One watched forward pass of the embedded model: the capture, and x̂ entering every attention."""
    model = default_llm.model
    ids = encode_prompt(default_llm, PROMPT)
    with recording({i: b.attention for i, b in enumerate(model.layers)}, record="input") as normed:
        cap = capture(model, as_batch(default_llm, ids))
    return default_llm, ids, cap, dict(normed)


def wrong_reversed_heads(weight, n_heads):
    """Another wrong head split, written here independently: the right blocks in the reverse order."""
    return split_heads(weight, n_heads).flip(0)


def test_head_by_head_attention_is_the_models_attention_and_catches_a_wrong_split(real):
    llm, ids, cap, normed = real
    cos, sin = llm.model.rope(torch.arange(len(ids)))
    for i in (0, len(llm.model.layers) // 2, len(llm.model.layers) - 1):
        att = llm.model.layers[i].attention
        own = cap.attention_out[i][0].float()                    # what the model's fused attention added
        scale = own.abs().max().item()
        right = (attention_head_by_head(att, normed[i][0], cos, sin) - own).abs().max().item()
        assert right <= 1e-5 * max(1.0, scale), (i, right, scale)
        for wrong in (interleaved_split, wrong_reversed_heads):
            delta = (attention_head_by_head(att, normed[i][0], cos, sin, split=wrong) - own).abs().max().item()
            assert delta > 100 * max(right, 1e-6) and delta > 1e-2 * scale, (i, wrong.__name__, delta)


def test_layer_norm_and_rms_norm_numbers_match_torch_and_the_model(real):
    llm, ids, cap, normed = real
    mid = len(llm.model.layers) // 2
    norm = llm.model.layers[mid].attention_norm
    h = cap.block_inputs[mid][0, -1]
    cmp = compare_norms(h, norm)
    gain = norm.weight.float()
    torch.testing.assert_close(cmp.layer_norm, F.layer_norm(h.float(), (h.numel(),), gain, torch.zeros_like(gain),
                                                            norm.eps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cmp.rms_norm, norm(h).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cmp.rms_norm, normed[mid][0, -1].float(), rtol=1e-5, atol=1e-6)  # the real x̂
    assert cmp.rms ** 2 == pytest.approx(cmp.var + cmp.mean ** 2, rel=1e-5)   # mean(x²) = σ² + μ²
    assert cmp.cosine > 0.99 and cmp.max_delta > 0                              # close, yet not the same thing
    bias = torch.randn_like(gain)                                                # the formula with a real β too
    torch.testing.assert_close(layer_norm_by_formula(h.float(), gain, bias, norm.eps),
                               F.layer_norm(h.float(), (h.numel(),), gain, bias, norm.eps), rtol=1e-5, atol=1e-5)


def test_kv_cache_demo_gives_the_same_tokens_with_less_work(real):
    llm, ids, _, _ = real
    n = 3
    cached = decode(llm.model, ids, n, use_cache=True, count_flops=False)
    full = decode(llm.model, ids, n, use_cache=False, count_flops=False)
    assert cached.tokens == full.tokens and len(cached.tokens) == n
    assert token_labels(llm.tokenizer, cached.tokens[:1]) == ["␣Paris"]
    t = len(ids)
    assert cached.positions == t + n - 1 and full.positions == n * t + n * (n - 1) // 2
    torch.testing.assert_close(cached.last_logits, full.last_logits, rtol=1e-4, atol=1e-3)


def test_kv_cache_work_is_counted_by_torchs_flop_counter():
    """On a tiny model: the counted matmul FLOPs, against the sizes written out by hand."""
    model = make_model()
    c, ids, n = model.config, [1, 17, 42, 9], 3
    cached = decode(model, ids, n, use_cache=True)
    full = decode(model, ids, n, use_cache=False)
    assert cached.tokens == full.tokens
    weights = c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * c.n_kv_heads * c.head_dim + 3 * c.dim * c.hidden_dim)

    def flops(steps):  # steps: (new positions, keys seen by the explicit path's [T, S] scores) per forward
        return sum(2 * t * weights + 2 * c.dim * c.vocab_size + 2 * 2 * c.n_layers * c.n_heads * c.head_dim * t * s
                   for t, s in steps)

    assert cached.flops == flops([(4, 4), (1, 5), (1, 6)])
    assert full.flops == flops([(4, 4), (5, 5), (6, 6)])
    seconds = time_decoding(model, ids, cached.tokens, repeats=1)           # runs both forms; no claim on speed
    assert len(seconds) == 2 and min(seconds) > 0


def test_kv_cache_memory_formula():
    from llama3.config import get_preset

    big = get_preset("llama-3.1-8b")
    assert kv_cache_bytes(big, 1, 2) == 2 * 32 * 8 * 128 * 2                # 128 KiB a token in bfloat16
    assert kv_cache_bytes(big, big.max_seq_len, 2) == 16 * 2**30            # 16 GiB at 128K tokens
    assert allocated_kv_bytes(big, 1000, torch.bfloat16) == kv_cache_bytes(big, 1000, 2)
    tiny = make_model().config
    assert allocated_kv_bytes(tiny, 7, torch.float32) == kv_cache_bytes(tiny, 7, 4) == 2 * 2 * 2 * 16 * 4 * 7


def test_residual_and_lens_wording_follow_the_data(real, tmp_path):
    assert trend_text(trend([1.0, 5.0, 9.0])) == "grows from 1 to 9"
    assert trend_text(trend([1.0, 420.0, 96.0])) == "rises from 1 to 420 after block 0, then falls to 96"
    llm, ids, cap, _ = real
    labels = token_labels(llm.tokenizer, ids)
    fields = residual_fields(cap, labels, tmp_path)
    picture_ok(tmp_path / "walkthrough-residual.png")
    # the embedded model: the first token's stream peaks mid-way and the last blocks cut it down
    assert "`The` (position 0) is the exception" in fields["residual_story"]
    assert "then falls to" in fields["residual_story"] and "cuts it from" in fields["residual_story"]
    lens = logit_lens(llm, ids)
    settled = lens_fields(llm, lens, labels)["lens_settles"]
    last = len(llm.model.layers) - 1
    assert "from block" not in settled or f"block {last} on" not in settled
    assert settled.startswith(f"only in the last row, block {last}")
    assert label_legend(["<filename>", "ab"], 8) == "␣ space, ↵ newline, ⇥ tab; … = cut to fit: <filena… is <filename>"
    assert "… = cut to fit" in render_table(lens)


def placeholders(text: str) -> set[str]:
    return {name.removesuffix("_zh") for _, name, _, _ in string.Formatter().parse(text) if name}


def test_sections_exist_in_both_languages_with_live_numbers(tmp_path):
    from llama3.inspect.walkthrough_en import TEXT as EN
    from llama3.inspect.walkthrough_zh import TEXT as ZH

    assert placeholders(EN) == placeholders(ZH)  # both texts show the same numbers: equally complete
    model = make_model()
    llm = LLM(model, model.config, tokenizer=CharTokenizer(), source="tiny")
    values = measure(llm, tmp_path, decode_tokens=4)
    texts = render_walkthrough(values)
    en, zh = texts["walkthrough.md"], texts["walkthrough.zh.md"]
    for heading in ("## 1. Encoder and decoder", "## 5. LayerNorm vs RMSNorm", "## 7. Multi-head attention, head by head",
                    "## 12. The KV cache, demonstrated"):
        assert heading in en
    for heading in ("## 1. 编码器与解码器", "## 5. LayerNorm 与 RMSNorm", "## 7. 逐头计算的多头注意力", "## 12. KV 缓存：实测演示"):
        assert heading in zh
    assert float(values["mh_delta"]) < 1e-5 < float(values["mh_wrong_min"])
    assert values["kv_same"] == "the same" and values["kv_pos_with"] == len(values["ids"].split(",")) + 3
    for text in (en, zh):
        for key in ("mh_delta", "mh_wrong_min", "ln_delta", "ln_torch_delta", "kv_pos_without", "kv_gflop_with",
                    "l8b_ctx_size", "causal_last", "block_params"):
            assert str(values[key]) in text, key
        assert "img/walkthrough-encoder-decoder.png" in text and "{" not in text.replace("```", "")
    picture_ok(tmp_path / "img" / "walkthrough-encoder-decoder.png")
