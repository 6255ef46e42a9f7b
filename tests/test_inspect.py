"""llama3.inspect on tiny random models: the trace, attention maps, logit lens, RoPE plots, explain.

The trace recomputes each block from its captured input; these tests check its
numbers against what the model itself computed, observed through independent
forward hooks on the model's own submodules."""

import numpy as np
import pytest
import torch

from conftest import make_config, make_model
from llama3.errors import Llama3Error
from llama3.inspect.attention import attention_maps, describe_attention, plot_attention
from llama3.inspect.capture import capture, recording
from llama3.inspect.explain import explain_answer
from llama3.inspect.logit_lens import logit_lens, plot_logit_lens, render_table
from llama3.inspect.rope import plot_rope, render_rope
from llama3.inspect.trace import trace
from llama3.llm import LLM

IDS = [1, 17, 42, 9, 63, 5, 88]


class CharTokenizer:
    """A trivial tokenizer: one id per character (enough for labels and encode)."""

    vocab_size, bos_id, eos_id, pad_id = 101, 1, 2, None
    stop_ids = [2]
    special_tokens = {"<s>": 1, "</s>": 2}

    def encode(self, text, bos=None, eos=False, allow_special=False):
        return [1] + [10 + ord(c) % 90 for c in text]

    def decode(self, ids):
        return "".join({1: "<s>", 2: "</s>"}.get(i, chr(i - 10 + 32)) for i in ids)

    def id_to_piece(self, i):
        return self.decode([i])


@pytest.fixture
def llm():
    model = make_model()
    return LLM(model, model.config, tokenizer=CharTokenizer())


def all_steps(step):
    yield step
    for child in step.children:
        yield from all_steps(child)


def find(root, name):
    return next(s for s in all_steps(root) if s.name == name)


def test_capture_leaves_the_model_as_it_was(llm):
    model = llm.model
    tokens = torch.tensor([IDS])
    plain = model(tokens)
    cap = capture(model, tokens, attention_layers="all")
    assert all(layer.attention.fused for layer in model.layers)
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(cap.logits, plain, rtol=1e-5, atol=1e-5)  # explicit path == fused path
    with pytest.raises(IndexError):  # hooks and flags are restored even when the forward pass fails
        capture(model, torch.tensor([[1, 500]]), attention_layers="all")
    assert all(layer.attention.fused for layer in model.layers)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("layer", [0, 1])
def test_trace_equals_the_models_own_intermediates(llm, layer):
    model = llm.model
    block = model.layers[layer]
    watched = {"norm_in": block.attention_norm, "q": block.attention.wq, "k": block.attention.wk,
               "wo": block.attention.wo, "ffn_norm": block.ffn_norm, "gate": block.feed_forward.w1,
               "down": block.feed_forward.w2, "block": block, "final": model.norm}
    with recording(watched) as seen:
        result = trace(llm, IDS, layer=layer)
    root = result.root
    torch.testing.assert_close(find(root, "x̂ = attention_norm(x)").tensor, seen["norm_in"])
    torch.testing.assert_close(find(root, "q = wq(x̂)").tensor, seen["q"])
    torch.testing.assert_close(find(root, "k = wk(x̂)").tensor, seen["k"])
    torch.testing.assert_close(find(root, "output projection wo").tensor, seen["wo"])
    torch.testing.assert_close(find(root, "ĥ = ffn_norm(h)").tensor, seen["ffn_norm"])
    torch.testing.assert_close(find(root, "gate = w1(ĥ)").tensor, seen["gate"])
    torch.testing.assert_close(find(root, "down = w2(·)").tensor, seen["down"])
    torch.testing.assert_close(find(root, "residual add: out = h + ffn").tensor, seen["block"])
    torch.testing.assert_close(find(root, "final norm").tensor, seen["final"])
    torch.testing.assert_close(find(root, "logits = output(norm(h))").tensor, model(torch.tensor([IDS])))
    assert result.checks[layer]["block_output_max_abs_diff"] < 1e-6
    assert result.checks[layer]["weights_max_abs_diff"] < 1e-6
    # shapes with named dimensions: T=7, H=4, Hkv=2, Dh=16 in the tiny config
    assert find(root, "q rotated").shape == "[B=1, T=7, H=4, Dh=16]"
    assert find(root, "k rotated").shape == "[B=1, T=7, Hkv=2, Dh=16]"
    assert find(root, "repeat KV heads ×2").children[0].shape == "[B=1, H=4, S=7, Dh=16]"
    assert find(root, "softmax → attention weights").shape == "[B=1, H=4, T=7, S=7]"
    assert find(root, "gate = w1(ĥ)").shape == "[B=1, T=7, F=96]"
    # the statistics are those of the tensor
    q = seen["q"].float()
    stats = find(root, "q = wq(x̂)").stats
    assert stats["mean"] == pytest.approx(q.mean().item(), abs=1e-6)
    assert stats["max"] == pytest.approx(q.max().item())
    # the top next tokens are the model's
    assert result.top_next[0]["id"] == model(torch.tensor([IDS]))[0, -1].argmax().item()


def test_trace_renders_tree_and_json(llm):
    result = trace(llm, "hello", layer=-1)
    text = result.render()
    for word in ("embedding", "block 0", "block 1", "RoPE", "causal mask", "softmax", "SwiGLU",
                 "residual add", "final norm", "logits", "next token", "[B=1, T=6, D=64]"):
        assert word in text
    d = result.to_dict()
    assert d["ids"] == CharTokenizer().encode("hello") and len(d["tokens"]) == 6
    names = [s["name"] for s in d["steps"]]
    assert names[:4] == ["text", "tokens", "ids", "embedding: h = tok_embeddings[ids]"]
    assert "children" in d["steps"][names.index("block 1")] and "children" not in d["steps"][names.index("block 0")]
    import json

    json.dumps(d)  # plain data only


def test_attention_rows_sum_to_one_and_nothing_above_the_diagonal(llm):
    maps = attention_maps(llm, IDS, layer=1)
    w = maps.weights                                            # [H, T, T]
    assert w.shape == (4, len(IDS), len(IDS))
    torch.testing.assert_close(w.sum(-1), torch.ones(4, len(IDS)))
    assert torch.all(torch.triu(w, diagonal=1) == 0)
    assert w[:, 0, 0].eq(1).all()  # the first token can only look at itself
    assert "head  3 (kv 1)" in describe_attention(maps)


def test_gqa_heads_of_one_group_share_keys_but_not_maps():
    model = make_model(make_config(n_heads=4, n_kv_heads=1))
    maps = attention_maps(LLM(model, model.config), IDS, layer=0)
    assert maps.n_rep == 4 and not torch.allclose(maps.weights[0], maps.weights[1])


def test_logit_lens_last_row_is_the_models_prediction(llm):
    lens = logit_lens(llm, IDS)
    assert lens.top_ids.shape == (1 + 2, len(IDS)) and lens.rows[0] == "embedding"
    predicted = llm.model(torch.tensor([IDS]))[0].argmax(-1)
    assert torch.equal(lens.top_ids[-1], predicted)
    assert lens.top_probs.min() > 0 and lens.top_probs.max() <= 1
    table = render_table(lens, max_positions=4)
    assert "block 1" in table and "first 3 positions not shown" in table


def picture_ok(path, min_px=200, max_px=5000):
    from matplotlib.image import imread

    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert min_px <= width <= max_px and min_px <= height <= max_px, (width, height)
    assert float(np.var(pixels[..., :3])) > 1e-3, "the picture is blank"


def test_pictures_are_written_and_show_something(llm, tmp_path):
    maps = attention_maps(llm, IDS, layer=-1)
    picture_ok(plot_attention(maps, tmp_path / "grid.png"))
    picture_ok(plot_attention(maps, tmp_path / "head.png", head=2))
    picture_ok(plot_logit_lens(logit_lens(llm, IDS), tmp_path / "lens.png"))
    from llama3.config import get_preset

    picture_ok(plot_rope(get_preset("llama-3.1-8b"), tmp_path / "rope.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "head.png", "lens.png", "rope.png"]  # no temp files


def test_rope_table_follows_metas_bands():
    from llama3.config import get_preset

    text = render_rope(get_preset("llama-3.1-8b"))
    # Dh=128, theta=500000: pair i has wavelength 2π·500000^(2i/128); < 2048 for i <= 28, > 8192 for i >= 35
    assert "keeps pairs with wavelength < 2048 (29 pairs)" in text
    assert "slows those > 8192 (29 pairs)" in text
    last = [line for line in text.splitlines() if line.strip().startswith("63 ")][0].split()
    assert float(last[3]) == pytest.approx(8 * float(last[2]), rel=1e-3)      # factor 8 slows the slowest pair 8x
    assert float(last[4]) == pytest.approx(32 * float(last[2]), rel=1e-3)


def test_bad_requests_raise_llama3_error(llm, tmp_path):
    with pytest.raises(Llama3Error, match="layer 5 does not exist"):
        trace(llm, IDS, layer=5)
    with pytest.raises(Llama3Error, match="head 9 does not exist"):
        plot_attention(attention_maps(llm, IDS), tmp_path / "x.png", head=9)
    with pytest.raises(Llama3Error, match=r"\.png"):
        plot_attention(attention_maps(llm, IDS), tmp_path / "x.txt")
    with pytest.raises(Llama3Error, match="outside the vocabulary"):
        trace(llm, [1, 500])
    with pytest.raises(Llama3Error, match="no tokenizer"):
        trace(LLM(llm.model, llm.config), "text")
    too_long = "x" * llm.config.max_seq_len  # + BOS: one token more than the context holds
    for view in (trace, attention_maps, logit_lens):
        with pytest.raises(Llama3Error, match=f"{llm.config.max_seq_len + 1} tokens but the model's context holds"):
            view(llm, too_long)


def test_explain_matches_greedy_generation(llm):
    model, prompt = llm.model, [1, 30, 31, 32]
    ids = list(prompt)
    for _ in range(4):  # greedy, step by step, without a cache: an independent loop
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    answer = ids[len(prompt):] + [2]  # pretend the model then chose the stop token
    e = explain_answer(llm, prompt, answer, top_k=3, layer=0)
    assert [s["chosen"]["id"] for s in e.steps] == answer
    assert all(s["chosen"]["rank"] == 1 for s in e.steps[:4])
    p = model(torch.tensor([ids]))[0, -1].softmax(-1)
    assert e.steps[-1]["chosen"]["prob"] == pytest.approx(p[2].item(), rel=1e-4)
    assert "stop token </s> (id 2)" in e.ended_by
    assert len(e.attention) == 4 and e.query == CharTokenizer().decode([ids[-1]])
    text = e.render()
    assert "<s>·1" in text and "▸" in text and "head  3 (kv 1)" in text
    cut = explain_answer(llm, prompt, answer[:-1], stop_reason="length")
    assert "length limit" in cut.ended_by
