"""Perplexity: the sliding-window computation equals a direct per-token cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from llama3.errors import Llama3Error
from llama3.llm import LLM
from llama3.perplexity import model_logits_fn, perplexity, perplexity_of_ids, plan_windows


class ByteTokenizer:
    """Bytes as token ids (enough for a 101-token tiny model: text of ASCII below 'e')."""

    def encode(self, text):
        return list(text.encode())


def direct_nll(model, ids, context, stride):
    """-log p of each token i >= 1, computed alone: the model sees tokens[begin:i+1], where begin
    is the start of the first window (begin = k * stride) that reaches token i."""
    total = 0.0
    with torch.no_grad():
        for i in range(1, len(ids)):
            k = 0
            while k * stride + context <= i:
                k += 1
            begin = k * stride
            logits = model(torch.tensor([ids[begin:i + 1]]))[0, -2]       # [V]: predicts token i
            total -= float(F.log_softmax(logits.double(), -1)[ids[i]])
    return total / (len(ids) - 1)


def test_whole_text_in_one_window_equals_cross_entropy(tiny_model):
    ids = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity_of_ids(model_logits_fn(tiny_model), ids, context=32, stride=16)
    with torch.no_grad():
        logits = tiny_model(torch.tensor([ids]))[0]
    want = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    assert result.n_windows == 1 and result.n_scored == 19
    assert result.perplexity == pytest.approx(math.exp(float(want)), rel=1e-5)


@pytest.mark.parametrize("context,stride", [(8, 4), (8, 7), (6, 1), (5, 3)])
def test_sliding_window_equals_direct_per_token(tiny_model, context, stride):
    ids = torch.randint(0, 101, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    result = perplexity_of_ids(model_logits_fn(tiny_model), ids, context, stride)
    assert result.n_scored == 22
    assert result.nll == pytest.approx(direct_nll(tiny_model, ids, context, stride), rel=1e-5)


def test_windows_score_every_token_once():
    for n, context, stride in [(2, 2, 1), (100, 10, 3), (37, 16, 15), (16, 16, 8)]:
        windows = plan_windows(n, context, stride)
        scored = [t for w in windows for t in range(w.end - w.n_scored, w.end)]
        assert scored == list(range(1, n))
        assert all(w.end - w.begin <= context and w.n_scored < w.end - w.begin for w in windows)


@pytest.mark.parametrize("context,stride,n", [(1, 1, 10), (8, 8, 10), (8, 0, 10), (8, 4, 1)])
def test_bad_windows_raise(context, stride, n):
    with pytest.raises(Llama3Error):
        plan_windows(n, context, stride)


def test_perplexity_of_text_uses_the_tokenizer(tiny_model, tiny_config):
    llm = LLM(tiny_model, tiny_config, ByteTokenizer())
    text = "abc ABC 0123 =<>? " * 3
    result = perplexity(llm, text, context=16, stride=8)
    want = perplexity_of_ids(model_logits_fn(tiny_model), list(text.encode()), 16, 8)
    assert result == want
    with pytest.raises(Llama3Error):
        perplexity(LLM(tiny_model, tiny_config, None), text)
    with pytest.raises(Llama3Error):
        perplexity(llm, text, context=tiny_config.max_seq_len + 1)
    for bad, message in [(dict(context=0), "context=0"), (dict(context=1), "context=1"),
                         (dict(stride=0), "stride=0"), (dict(max_tokens=-5), "max_tokens=-5"),
                         (dict(max_tokens=0), "max_tokens=0")]:
        with pytest.raises(Llama3Error, match=message):
            perplexity(llm, text, **bad)
    with pytest.raises(Llama3Error, match="stride=0"):
        perplexity_of_ids(model_logits_fn(tiny_model), list(text.encode()), 16, 0)
    assert perplexity(llm, text, context=16, stride=8, max_tokens=20).n_scored == 19
