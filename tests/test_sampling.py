"""Sampling rules: each filter keeps exactly the tokens it should (property tests on made-up
distributions, checked by plain-Python definitions and against transformers' logits processors)."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llama3.errors import Llama3Error
from llama3.sampling import (apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p, draw, sample,
                             validate_sampling)

# Clearly distinct logits in a moderate range: ties would make "the k best" ambiguous.
logit_lists = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40, unique=True).filter(
    lambda values: min(b - a for a, b in zip(sorted(values), sorted(values)[1:])) > 1e-3)


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def probabilities(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


@given(logit_lists, st.integers(1, 50))
def test_top_k_keeps_the_k_best(values, k):
    logits = torch.tensor([values])
    best_first = sorted(range(len(values)), key=lambda i: -values[i])
    assert kept(apply_top_k(logits, k)) == set(best_first[:k])


@given(logit_lists, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus(values, p):
    probs = probabilities(values)
    best_first = sorted(range(len(values)), key=lambda i: -probs[i])
    mass, nucleus = 0.0, []
    for i in best_first:  # the fewest best tokens whose mass reaches p
        nucleus.append(i)
        mass += probs[i]
        assume(abs(mass - p) > 1e-5)  # float32 vs float64 rounding right at the boundary is undecidable
        if mass >= p:
            break
    assert kept(apply_top_p(torch.tensor([values]), p)) == set(nucleus)


@given(logit_lists, st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_near_the_best(values, min_p):
    probs = probabilities(values)
    assume(all(abs(q / max(probs) - min_p) > 1e-5 for q in probs))
    expected = {i for i, q in enumerate(probs) if q >= min_p * max(probs)}
    assert kept(apply_min_p(torch.tensor([values]), min_p)) == expected


def test_filters_off_keep_everything():
    logits = torch.randn(3, 50)
    for filtered in (apply_top_k(logits, 0), apply_top_p(logits, 1.0), apply_min_p(logits, 0.0)):
        assert torch.equal(filtered, logits)


def test_filters_match_transformers():
    import transformers  # the reference: a dev dependency, never skipped
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    ours_vs_theirs = [
        (apply_top_k(logits, 17), transformers.TopKLogitsWarper(17)(ids, logits.clone())),
        (apply_top_p(logits, 0.8), transformers.TopPLogitsWarper(0.8)(ids, logits.clone())),
        (apply_min_p(logits, 0.1), transformers.MinPLogitsWarper(0.1)(ids, logits.clone())),
    ]
    for ours, theirs in ours_vs_theirs:
        assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


def test_repetition_penalty_matches_transformers():
    import transformers  # the reference: a dev dependency, never skipped
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1)) * 2
    history = torch.tensor([[3, 5, 5, 7], [0, 29, 12, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, history, True)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), theirs)


def test_draw_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).expand(20000, 5)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=5).float() / 20000
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)
    assert counts[4] == 0  # probability 0 is never drawn


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(8, 100)
    a = sample(logits, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample(logits, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))


def test_repetition_penalty_can_change_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, repetition_penalty=1.2, seen=seen).item() == 1
    assert sample(logits).item() == 0


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
    dict(top_k=-1), dict(top_k=2.5), dict(min_p=-0.1), dict(min_p=1.1), dict(repetition_penalty=0.0),
    dict(max_new_tokens=0), dict(seed="x"), dict(seed=2**64), dict(seed=-2**63 - 1),
])
def test_invalid_values_raise_a_clear_error(bad):
    name = next(iter(bad))
    with pytest.raises(Llama3Error, match=name):
        validate_sampling(**bad)


@settings(max_examples=30)
@given(st.one_of(st.just(0.0), st.floats(1e-6, 5)), st.integers(0, 100), st.floats(1e-6, 1), st.floats(0, 1),
       st.floats(0.1, 3))
def test_valid_values_pass(temperature, top_k, top_p, min_p, penalty):
    validate_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=penalty)


def test_seed_range_matches_torch_generator():
    for seed in (-2**63, 2**64 - 1):
        validate_sampling(seed=seed)
        torch.Generator().manual_seed(seed)
