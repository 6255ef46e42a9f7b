"""Causal experiments (llama3.inspect.patching / attribution) on tiny random models.

Each result is checked against an independent computation: hooks written out here by hand,
the model's weights edited directly, finite differences, or the clean and corrupted runs
themselves -- never against the experiment's own output alone."""

import copy

import pytest
import torch

from conftest import make_model
from llama3.errors import Llama3Error
from llama3.inspect import ablate, attribute, patch, plot_attribution, plot_patching
from llama3.llm import LLM
from test_inspect import CharTokenizer

CLEAN = [1, 17, 42, 9, 63, 5, 88]
CORRUPTED = [1, 17, 42, 30, 63, 5, 88]      # differs at position 3 only
FIRST_DIFFERENT = 3


@pytest.fixture(scope="module")
def llm():
    model = make_model()
    return LLM(model, model.config, tokenizer=CharTokenizer())


def clean_outputs(model, module_of, tokens):
    """The output of module_of(block) for every block, recorded by a plain hand-written hook."""
    seen = []
    handles = [module_of(b).register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
               for b in model.layers]
    with torch.no_grad():
        logits = model(tokens)
    for h in handles:
        h.remove()
    return seen, logits


def hand_patch(model, module, tokens, position, value):
    """Run tokens with module's output at `position` replaced by value[0, position]."""
    def hook(m, a, out):
        out = out.clone()
        out[:, position] = value[0, position]
        return out

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        handle.remove()


def diff(logits, answer, wrong):
    return float(logits[0, -1, answer] - logits[0, -1, wrong])


def test_restoring_the_whole_last_residual_stream_gives_the_clean_logits_exactly(llm):
    model = llm.model
    clean, corrupted = torch.tensor([CLEAN]), torch.tensor([CORRUPTED])
    streams, clean_logits = clean_outputs(model, lambda b: b, clean)
    last = model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, o: streams[-1])
    try:
        with torch.no_grad():
            restored = model(corrupted)
    finally:
        handle.remove()
    assert torch.equal(restored, clean_logits)
    # and patch() agrees: the last position after the last block carries the whole answer
    result = patch(llm, CLEAN, CORRUPTED, site="resid")
    assert result.restored[-1, -1].item() == pytest.approx(1.0, abs=1e-5)
    assert result.patched_diff[-1, -1].item() == pytest.approx(result.clean_diff, abs=1e-5)


def test_patching_nothing_leaves_the_corrupted_logits(llm):
    """Before the first differing token the two runs are identical (attention is causal), so copying
    the clean activation there changes nothing: restored is 0 at every layer, for every site."""
    model = llm.model
    _, corrupted_logits = clean_outputs(model, lambda b: b, torch.tensor([CORRUPTED]))
    for site in ("resid", "attn", "ffn"):
        result = patch(llm, CLEAN, CORRUPTED, site=site)
        assert result.corrupted_diff == pytest.approx(diff(corrupted_logits, *_pair(result)), abs=1e-6)
        assert result.restored[:, :FIRST_DIFFERENT].abs().max().item() < 1e-5
        assert result.restored.shape == (len(model.layers), len(CLEAN))


def _pair(result):
    return result.answer[0], result.wrong[0]


@pytest.mark.parametrize("site, module_of", [("resid", lambda b: b), ("attn", lambda b: b.attention),
                                             ("ffn", lambda b: b.feed_forward)])
def test_patching_equals_a_hand_written_hook(llm, site, module_of):
    model = llm.model
    result = patch(llm, CLEAN, CORRUPTED, site=site)
    answer, wrong = _pair(result)
    clean_acts, clean_logits = clean_outputs(model, module_of, torch.tensor([CLEAN]))
    assert result.clean_diff == pytest.approx(diff(clean_logits, answer, wrong), abs=1e-5)
    for layer in range(len(model.layers)):
        for position in range(len(CLEAN)):
            logits = hand_patch(model, module_of(model.layers[layer]), torch.tensor([CORRUPTED]), position,
                                clean_acts[layer])
            expected = (diff(logits, answer, wrong) - result.corrupted_diff) / (result.clean_diff - result.corrupted_diff)
            assert result.restored[layer, position].item() == pytest.approx(expected, abs=1e-4)


def test_head_patching_equals_copying_the_heads_slice_by_hand(llm):
    model, c = llm.model, llm.config
    result = patch(llm, CLEAN, CORRUPTED, site="heads")
    assert result.restored.shape == (c.n_layers, c.n_heads)
    answer, wrong = _pair(result)
    inputs = []
    handles = [b.attention.wo.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
               for b in model.layers]
    with torch.no_grad():
        model(torch.tensor([CLEAN]))
    for h in handles:
        h.remove()
    layer, head = c.n_layers - 1, 1
    cols = slice(head * c.head_dim, (head + 1) * c.head_dim)

    def pre(m, a):
        x = a[0].clone()
        x[..., cols] = inputs[layer][..., cols]
        return (x,)

    handle = model.layers[layer].attention.wo.register_forward_pre_hook(pre)
    with torch.no_grad():
        logits = model(torch.tensor([CORRUPTED]))
    handle.remove()
    expected = (diff(logits, answer, wrong) - result.corrupted_diff) / (result.clean_diff - result.corrupted_diff)
    assert result.restored[layer, head].item() == pytest.approx(expected, abs=1e-4)


def test_hooks_are_gone_afterwards_and_pictures_and_json(llm, tmp_path):
    model = llm.model
    before = model(torch.tensor([CLEAN]))
    result = patch(llm, CLEAN, CORRUPTED, site="attn")
    assert torch.equal(model(torch.tensor([CLEAN])), before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    d = result.to_dict()
    assert len(d["restored"]) == len(model.layers) and len(d["columns"]) == len(CLEAN)
    assert plot_patching(result, tmp_path / "patch.png").stat().st_size > 1000


def test_patching_bad_input(llm):
    with pytest.raises(Llama3Error, match="same length"):
        patch(llm, CLEAN, CLEAN[:-1])
    with pytest.raises(Llama3Error, match="unknown site"):
        patch(llm, CLEAN, CORRUPTED, site="mlp")
    with pytest.raises(Llama3Error, match="nothing to restore"):
        patch(llm, CLEAN, CLEAN, answer=5, wrong=6)
    with pytest.raises(Llama3Error, match="same token"):
        patch(llm, CLEAN, CORRUPTED, answer=5, wrong=5)
    with pytest.raises(Llama3Error, match="not one"):
        patch(llm, CLEAN, CORRUPTED, answer="ab")
    with pytest.raises(Llama3Error, match="outside the vocabulary"):
        patch(llm, CLEAN, CORRUPTED, answer=10**6)


def test_integrated_gradients_are_complete(llm):
    result = attribute(llm, CLEAN, method="integrated_gradients", steps=64, baseline="zero")
    assert result.baseline == "zero" and result.scores.shape == (len(CLEAN),)
    gap = result.output - result.baseline_output
    assert abs(gap) > 1e-3                                      # a real difference to explain
    assert float(result.scores.sum()) == pytest.approx(gap, rel=2e-2, abs=1e-3)
    assert result.completeness_error == pytest.approx(abs(float(result.scores.sum()) - gap), abs=1e-6)
    # the baseline output is the model on the baseline embeddings (zero vectors), via a plain hook
    model = llm.model
    handle = model.tok_embeddings.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    with torch.no_grad():
        f0 = model(torch.tensor([CLEAN]))[0, -1, result.target[0]].item()
    handle.remove()
    assert result.baseline_output == pytest.approx(f0, abs=1e-5)
    with_token = attribute(llm, CLEAN, method="integrated_gradients", steps=32)   # the pad/eos token
    assert with_token.baseline == "</s>"
    assert float(with_token.scores.sum()) == pytest.approx(with_token.output - with_token.baseline_output,
                                                           rel=2e-2, abs=1e-3)


def test_gradient_x_input_matches_finite_differences(llm):
    """score_t = x_t . df/dx_t: shrinking token t's embedding by a factor (1 - eps) moves f by -eps * score_t."""
    model = llm.model
    result = attribute(llm, CLEAN, method="gradient_x_input")
    target = result.target[0]
    eps = 1e-3
    for t in range(len(CLEAN)):
        def shrink(m, a, o, t=t):
            o = o.clone()
            o[:, t] *= 1 - eps
            return o

        handle = model.tok_embeddings.register_forward_hook(shrink)
        with torch.no_grad():
            moved = model(torch.tensor([CLEAN]))[0, -1, target].item()
        handle.remove()
        assert (result.output - moved) / eps == pytest.approx(result.scores[t].item(), rel=0.05, abs=2e-3)


def test_attribution_picture_and_bad_input(llm, tmp_path):
    result = attribute(llm, CLEAN, method="gradient_x_input", target=7)
    assert result.target[0] == 7 and "not attribution" in result.to_dict()["note"]
    assert plot_attribution(result, tmp_path / "attr.png").stat().st_size > 1000
    with pytest.raises(Llama3Error, match="unknown method"):
        attribute(llm, CLEAN, method="saliency")
    with pytest.raises(Llama3Error, match="steps"):
        attribute(llm, CLEAN, steps=0)


def test_ablation_equals_editing_the_weights(llm):
    """A head switched off = its columns of wo zeroed; a block switched off = the block skipped."""
    model, c = llm.model, llm.config
    result = ablate(llm, CLEAN, heads=[(1, 2)], top_k=3)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.layers[1].attention.wo.weight[:, 2 * c.head_dim:3 * c.head_dim] = 0
        probs = edited(torch.tensor([CLEAN]))[0, -1].softmax(-1)
    top = probs.topk(3)
    assert [t["id"] for t in result.after] == top.indices.tolist()
    assert [t["prob"] for t in result.after] == pytest.approx(top.values.tolist(), abs=1e-5)

    result = ablate(llm, CLEAN, blocks=[0], top_k=3)
    with torch.no_grad():
        tokens = torch.tensor([CLEAN])
        cos, sin = model.rope(torch.arange(len(CLEAN)))
        h = model.tok_embeddings(tokens)
        for block in model.layers[1:]:
            h = block(h, cos, sin)
        probs = model.output(model.norm(h))[0, -1].softmax(-1)
    assert [t["id"] for t in result.after] == probs.topk(3).indices.tolist()
    assert result.switched_off == ["block 0"]
    with pytest.raises(Llama3Error, match="nothing to switch off"):
        ablate(llm, CLEAN)
    with pytest.raises(Llama3Error, match="head 9"):
        ablate(llm, CLEAN, heads=[(0, 9)])


def test_hooks_act_only_on_their_own_thread(llm):
    """A server generating on another thread while the lab patches must not see the patch."""
    import threading

    from llama3.inspect.capture import recording
    from llama3.inspect.patching import hooked

    model, tokens = llm.model, torch.tensor([CLEAN])
    with torch.no_grad():
        plain = model(tokens)
    seen_elsewhere = {}
    with hooked(model.layers[0], lambda m, a, o: torch.zeros_like(o)), recording({"b": model.layers[1]}) as seen:
        worker = threading.Thread(target=lambda: seen_elsewhere.update(out=model(tokens).detach()))
        worker.start()
        worker.join()
        assert not seen                                          # the other thread's pass was not recorded
        with torch.no_grad():
            here = model(tokens)
    # close, not equal: a thread of its own may split the matrix products over another thread
    # count (the kernels drop threads on a busy machine), which rounds differently; the patch
    # (layer 0's output zeroed) would change every logit
    torch.testing.assert_close(seen_elsewhere["out"], plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(here, plain, rtol=1e-2, atol=1e-2) and "b" in seen
