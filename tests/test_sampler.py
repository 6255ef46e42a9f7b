"""`Sampler`: one sequence's sampling state (generator, penalties, logit_bias, processor, logprobs),
checked against the pure functions, plain-Python definitions and transformers' penalty."""

import math

import pytest
import torch

from conftest import make_model
from llama3.generate import GenerationSettings, generate_tokens, row_seeds
from llama3.sampling import (Sampler, SamplingError, argmax_last, exponential_variates, pick_batch, sample,
                             validate_sampling)

V = 50


def logits_row(seed=0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("bad", [dict(top_p=1e-300), dict(temperature=1e-300), dict(repetition_penalty=1e-300),
                                 dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                                 dict(logit_bias={3: 101}), dict(logit_bias={-1: 1}), dict(logprobs=21)])
def test_values_that_round_to_nothing_or_leave_the_range_are_refused(bad):
    name = next(iter(bad))
    with pytest.raises(SamplingError, match=name) as error:
        validate_sampling(**bad)
    assert error.value.param == name


def test_top_p_smaller_than_float32_would_have_kept_nothing():
    """Why 1e-300 is refused: in float32 it is 0, and top-p 0 drops every token (NaN probabilities)."""
    assert torch.tensor(1e-300, dtype=torch.float32).item() == 0.0
    validate_sampling(top_p=1e-6, temperature=1e-6)  # the smallest accepted values work
    token = Sampler(V, temperature=1e-6, top_p=1e-6, seed=0).pick(logits_row())
    assert token == int(logits_row().argmax())


def test_seeded_sampler_equals_the_pure_sample_function():
    logits = logits_row(1)
    sampler = Sampler(V, temperature=0.9, top_k=20, top_p=0.9, seed=5)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        want = int(sample(logits[None], temperature=0.9, top_k=20, top_p=0.9, generator=gen)[0])
        assert sampler.pick(logits) == want


def test_repetition_penalty_state_covers_prompt_and_output():
    logits = logits_row(2)
    sampler = Sampler(V, repetition_penalty=1.5, prompt_ids=[int(logits.argmax())])
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, int(logits.argmax())] = True
    for _ in range(5):
        want = int(sample(logits[None], repetition_penalty=1.5, seen=seen)[0])
        assert sampler.pick(logits) == want
        seen[0, want] = True
    import transformers  # the reference penalty, applied to the same history
    history = torch.tensor([[int(i) for i in torch.nonzero(seen[0]).flatten()]])
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.5)(history, logits[None].clone())[0]
    torch.testing.assert_close(sampler.adjust(logits), theirs)


def test_presence_and_frequency_follow_openai_definition():
    logits = logits_row(3)
    sampler = Sampler(V, presence_penalty=0.7, frequency_penalty=0.4, prompt_ids=[1, 2, 3])
    for token in (4, 4, 9):
        sampler.accept(token)
    counts = {4: 2, 9: 1}  # the prompt does not count
    want = [logits[j].item() - 0.4 * counts.get(j, 0) - 0.7 * (j in counts) for j in range(V)]
    torch.testing.assert_close(sampler.adjust(logits), torch.tensor(want))
    greedy = Sampler(V, frequency_penalty=2.0)
    picked = [greedy.pick(torch.zeros(V).index_fill_(0, torch.tensor([7]), 3.0)) for _ in range(4)]
    assert picked[:2] == [7, 7] and picked[2] != 7  # 3 - 2*2 < 0: the third pick moves on


def test_logit_bias_bans_and_forces():
    logits = logits_row(4)
    best = int(logits.argmax())
    banned = Sampler(V, temperature=1.5, logit_bias={best: -100}, seed=0)
    assert best not in {banned.pick(logits) for _ in range(300)}
    forced = Sampler(V, temperature=1.5, logit_bias={11: 100}, seed=0)
    assert {forced.pick(logits) for _ in range(300)} == {11}
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        Sampler(V, logit_bias={V: 5})


def test_logprobs_come_from_the_raw_distribution():
    logits = logits_row(5)
    sampler = Sampler(V, temperature=1.3, top_k=3, logit_bias={0: 50}, logprobs=4, seed=1)
    token = sampler.pick(logits)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert token == 0  # the bias decides the pick, not the reported probabilities
    assert math.isclose(sampler.last.logprob, reference[0].item(), abs_tol=1e-5)
    best = reference.topk(4)
    assert [i for i, _ in sampler.last.top] == best.indices.tolist()
    assert all(math.isclose(lp, ref, abs_tol=1e-5) for (_, lp), ref in zip(sampler.last.top, best.values.tolist()))


def test_processor_masks_first_and_hears_every_token():
    class OnlyEven:
        def __init__(self):
            self.accepted = []

        def __call__(self, logits):
            return logits.masked_fill(torch.arange(V) % 2 == 1, float("-inf"))

        def accept(self, token):
            self.accepted.append(token)

    processor = OnlyEven()
    sampler = Sampler(V, temperature=1.0, seed=3, processor=processor)
    picked = [sampler.pick(logits_row(i)) for i in range(30)]
    assert all(t % 2 == 0 for t in picked) and processor.accepted == picked


def test_pick_batch_greedy_fast_path_equals_per_row():
    logits = torch.randn(4, V)
    plain = [Sampler(V) for _ in range(4)]
    recorded = [Sampler(V, logprobs=0) for _ in range(4)]
    assert pick_batch(plain, logits) == pick_batch(recorded, logits) == logits.argmax(-1).tolist()
    assert pick_batch([plain[0], None, plain[2], plain[3]], logits)[1] is None


def test_seeded_rows_of_a_batch_equal_each_prompt_alone_and_n_seeds_differ(tiny_model):
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=9, presence_penalty=0.5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    batch = generate_tokens(tiny_model, prompts, settings)
    list(batch)
    for row, prompt in enumerate(prompts):
        alone = generate_tokens(tiny_model, [prompt], settings)
        list(alone)
        assert alone.tokens[0] == batch.tokens[row]
    vocab = tiny_model.config.vocab_size
    samplers = [Sampler.from_settings(settings, vocab, seed=s) for s in row_seeds(9, 3)]
    choices = generate_tokens(tiny_model, [prompts[0]] * 3, settings, samplers=samplers)
    list(choices)
    assert choices.tokens[0] == batch.tokens[0] and len({tuple(t) for t in choices.tokens}) == 3
    assert row_seeds(2**63 - 1, 2) == [2**63 - 1, -2**63]


def test_generation_records_logprobs_per_step(tiny_model):
    settings = GenerationSettings(max_new_tokens=4, temperature=0.0, logprobs=2)
    gen = generate_tokens(tiny_model, [[1, 2, 3]], settings, return_logits=True)
    for step in gen:
        want = torch.log_softmax(step.logits[0].float(), -1)
        assert step.logprobs[0].token == step.tokens[0] == int(want.argmax())
        assert math.isclose(step.logprobs[0].logprob, want.max().item(), abs_tol=1e-5)
        assert len(step.logprobs[0].top) == 2


@pytest.mark.parametrize("vocab, scale", [(V, 3.0), (49152, 0.5), (49152, 3.0), (49152, 12.0), (300, 0.01)])
def test_top_p_nucleus_draw_picks_the_tokens_sample_picks(vocab, scale):
    """Sampler's top-p (no top-k / min-p) reads the nucleus from a topk that doubles until it holds
    it, not a sort of the row: the same ids as sample()'s apply_top_p + draw with the same seed,
    whether the nucleus is a few tokens (peaked rows) or nearly all of them (flat: scale 0.01)."""
    for trial in range(12):
        logits = torch.randn(vocab, generator=torch.Generator().manual_seed(trial)) * scale
        for temperature, top_p in [(0.7, 0.9), (1.0, 0.95), (1.3, 0.5), (0.2, 0.999), (1.0, 1.0), (0.6, 1.0)]:
            sampler = Sampler(vocab, temperature=temperature, top_p=top_p, seed=trial)
            gen = torch.Generator().manual_seed(trial)
            for _ in range(3):
                want = int(sample(logits[None], temperature=temperature, top_p=top_p, generator=gen)[0])
                assert sampler.pick(logits) == want


@pytest.mark.parametrize("size", [1, 7, 49152])
def test_exponential_variates_are_exponential_s_own_and_leave_the_generator_alike(size):
    """The race's variates without exponential_'s one-at-a-time loop: bit for bit the numbers
    exponential_ draws from the same generator, and the generator's next numbers agree after."""
    for seed in range(6):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            assert torch.equal(exponential_variates(size, ours, "cpu"),
                               torch.empty(size).exponential_(1.0, generator=theirs))
        assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))


def test_pick_runs_its_operators_on_one_thread_and_sets_the_count_back():
    """A pick's whole-row operators must not open OpenMP regions (their workers spin on the cores
    the decoding pool needs): inside pick PyTorch has one thread, after it the caller's count."""
    import threading

    counts = []

    class Recorder:
        def __call__(self, logits):
            counts.append(torch.get_num_threads())
            return logits

        def accept(self, token):
            counts.append(torch.get_num_threads())

    def run():
        torch.set_num_threads(2)
        for settings in [dict(), dict(temperature=0.7, top_p=0.9, seed=0), dict(temperature=1.0, seed=0, logprobs=2)]:
            Sampler(V, processor=Recorder(), **settings).pick(logits_row())
            counts.append(("after", torch.get_num_threads()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert counts == [1, 1, ("after", 2)] * 3


def test_argmax_last_is_torch_argmax_ties_nans_and_strides_included():
    """The NumPy argmax that greedy decoding and the race's draw use gives torch's index: the
    first of equal maxima, the first NaN, a row of -inf's first id; 1-D and [B, V] rows, strided
    views; other dtypes and tensors needing grad go to torch itself."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 49152, generator=gen)
    rows[1, [7, 300, 40000]] = 50.0                     # three equal maxima: the first
    rows[2, [11, 900]] = float("nan")                   # NaN is the maximum: the first NaN
    rows[3] = float("-inf")                             # all -inf: id 0
    rows[4, -1] = 99.0                                  # the last id
    cases = [rows, rows[0], rows[1], rows[:, ::3], rows.t().contiguous().t(), rows[:, 100:].flip(-1)]
    with torch.inference_mode():
        cases.append(rows.clone())                      # an inference tensor, as the engine's logits are
    for x in cases:
        got = argmax_last(x)
        assert got.dtype == torch.long and torch.equal(got, x.argmax(dim=-1)), x.shape
    assert argmax_last(rows[1]).item() == 7 and argmax_last(rows[2]).item() == 11
    half, grad = rows.bfloat16(), rows[:2].clone().requires_grad_()
    assert torch.equal(argmax_last(half), half.argmax(dim=-1)) and torch.equal(argmax_last(grad), grad.argmax(dim=-1))
