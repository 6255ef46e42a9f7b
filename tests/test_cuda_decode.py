"""The GPU decoding path (llama3/fast/cuda_decode.py) on the CPU: everything but the CUDA graph capture.

The plan chooses it for 'cuda' devices (from the name alone, nothing allocated); the padded step
(a bucket of B rows, block tables padded, padding rows repeating row 0) gives the tokens and
logits of the engine's own eager steps; `pick_rows` (every row's token on the device, one host
read) gives the tokens of `Sampler.pick` row by row for the same logits and seeds.  The capture
and replay themselves run in tests/test_device.py on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import make_config, make_model
from llama3.engine import Engine, EngineConfig
from llama3.engine.paged_cache import paged_attention_torch
from llama3.fast.cuda_decode import CudaGraphs, PaddedStep, bucket_of, pick_rows, width_of
from llama3.fast.plan import apply_plan, choose_plan
from llama3.generate import GenerationSettings, generate_tokens
from llama3.sampling import Sampler


def sharp_model(seed: int = 0, **config):
    """Peaked logits, so greedy tokens are not decided by rounding-level near-ties."""
    model = make_model(make_config(**config), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return model


def prompts_of(lengths, vocab=101, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def padded(model, capture=False):
    fast = copy.deepcopy(model)
    fast.forward = CudaGraphs(fast, capture=capture)
    return fast


def engine_for(model, prompts, settings, **config) -> Engine:
    """Engine.sized_for with its pool zeroed, as PagedKVCache makes it on a GPU (a padded step reads
    whole blocks: a slot never written must hold a finite number; on the CPU the pool is torch.empty)."""
    engine = Engine.sized_for(model, None, prompts, settings, block_size=4, **config)
    engine.cache.k.zero_()
    engine.cache.v.zero_()
    return engine


# ------------------------------------------------------------ the plan
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_plan_chooses_cuda_graphs_on_cuda_devices(name):
    plan = choose_plan(device=name, dtype=torch.bfloat16)       # a device name only: nothing is allocated
    assert plan.cuda_graphs and plan.kernels == "PyTorch" and not plan.graph
    assert "llama3/fast/cuda_decode.py" in plan.describe()
    cpu = choose_plan(device="cpu", dtype=torch.float32)
    assert not cpu.cuda_graphs and "cuda_decode" not in cpu.describe()


def test_plan_cuda_graphs_off_with_llama3_graph_0_or_not_native(monkeypatch):
    assert not choose_plan(device="cuda", dtype=torch.bfloat16, native=False).cuda_graphs  # torch.compile's callers
    monkeypatch.setenv("LLAMA3_GRAPH", "0")
    assert not choose_plan(device="cuda", dtype=torch.bfloat16).cuda_graphs


def test_apply_plan_installs_the_cuda_path():
    """What apply_plan does for a CUDA plan, on a CPU model: model.forward becomes CudaGraphs and the
    engine samples through it."""
    from llama3.fast.graph import graphs_of
    from llama3.fast.plan import plan_of

    model = make_model()
    plan = dataclasses.replace(choose_plan(model, fuse=False, native=False), cuda_graphs=True)
    apply_plan(model, plan)
    assert isinstance(graphs_of(model), CudaGraphs) and graphs_of(model).capture is None
    assert "CUDA graphs" in plan_of(model)


def test_buckets_and_widths():
    assert [bucket_of(n) for n in (1, 2, 3, 5, 8, 9, 32, 33, 256)] == [1, 2, 4, 8, 8, 16, 32, 64, 256]
    assert bucket_of(257) is None
    assert [width_of(n) for n in (1, 64, 65, 128, 129)] == [64, 64, 128, 128, 256]


# ------------------------------------------------------------ the padded step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_attend_equals_paged_attention(dtype):
    """Three decoding rows in a bucket of 4 (the 4th repeats row 0), tables padded to 8 blocks:
    each row's output equals paged_attention_torch's (model.py's attention over its own blocks),
    and the pool changes only in the three rows' write slots."""
    size, heads, kv_heads, dh, n_blocks = 4, 6, 2, 8, 40
    gen = torch.Generator().manual_seed(0)
    k_pool = torch.randn(2, n_blocks, kv_heads, size, dh, generator=gen).to(dtype)
    v_pool = torch.randn(2, n_blocks, kv_heads, size, dh, generator=gen).to(dtype)
    rows = [([7, 3, 33, 12, 20], 17, 18), ([0, 25, 9], 9, 10), ([38], 0, 1)]        # (table, begin, end)
    width, bucket = 8, 4
    order = [0, 1, 2, 0]
    positions = torch.tensor([rows[i][1] for i in order])
    write_block = torch.tensor([rows[i][0][rows[i][1] // size] for i in order])
    write_offset = torch.tensor([rows[i][1] % size for i in order])
    source = torch.tensor([0, 1, 2, 0])
    tables = torch.tensor([rows[i][0] + [0] * (width - len(rows[i][0])) for i in order])
    visible = (torch.arange(width * size)[None, :] <= positions[:, None])[:, None, None, :]
    q = torch.randn(1, bucket, heads, dh, generator=gen).to(dtype)                  # tokens first, as model.py
    q[:, 3] = q[:, 0]
    k = torch.randn(1, bucket, kv_heads, dh, generator=gen).to(dtype)
    v = torch.randn(1, bucket, kv_heads, dh, generator=gen).to(dtype)
    want_k, want_v = k_pool.clone(), v_pool.clone()
    for j in range(3):
        want_k[1, write_block[j], :, write_offset[j]] = k[0, j]
        want_v[1, write_block[j], :, write_offset[j]] = v[0, j]
    want = paged_attention_torch(q[0, :3], want_k[1], want_v[1], rows, size)         # [3, H, Dh]
    step = PaddedStep(k_pool, v_pool, size, write_block, write_offset, source, tables, visible)
    got = step.attend(1, 0, q, k, v)                                                 # [1, 4, H, Dh]
    assert torch.equal(k_pool, want_k) and torch.equal(v_pool, want_v)              # the padding row wrote row 0's
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[0, :3].float(), want.float(), **tol)
    # the padding row's answer is row 0's (to SDPA's last bit: on the CPU it may round identical rows of a
    # batch differently, 3e-8 seen); what it writes is exactly row 0's (the pool, above)
    torch.testing.assert_close(got[0, 3].float(), got[0, 0].float(), **tol)


@pytest.mark.parametrize("lengths", [[5], [3, 21, 9], [2, 7, 4, 11, 6]])
def test_engine_padded_steps_equal_eager_steps(lengths):
    """The engine with the CUDA path's padded steps (capture off) gives the eager engine's greedy
    tokens: 1 row, 3 rows (bucket 4), 5 rows (bucket 8); blocks of 4, so tables grow mid-answer."""
    model = sharp_model()
    fast = padded(model)
    prompts, settings = prompts_of(lengths), GenerationSettings(max_new_tokens=12)
    want = Engine.sized_for(model, None, prompts, settings, block_size=4).run(prompts, settings)
    engine = engine_for(fast, prompts, settings)
    got = engine.run(prompts, settings)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    graphs = fast.forward
    assert graphs.padded_steps >= 11 and graphs.captures == 0 and graphs.replays == 0
    assert {key[1] for key in graphs.buckets} == {bucket_of(len(lengths))}


def test_engine_padded_steps_sampled_equal_eager():
    """Seeded sampling with every rule, rows sampled on the device (`pick_rows`): the eager engine's
    tokens, a row's choices, and the padded step's logits within float tolerance."""
    model = sharp_model(seed=2)
    fast = padded(model)
    prompts = prompts_of([4, 13, 8])
    settings = GenerationSettings(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.9, min_p=0.02,
                                  repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2,
                                  logit_bias={5: -3.0, 7: 2.0}, seed=11)
    want = Engine.sized_for(model, None, prompts, settings, block_size=4).run(prompts, settings)
    got = engine_for(fast, prompts, settings).run(prompts, settings)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert fast.forward.padded_steps > 0


class ReplayedGraph:
    """Stands in for a captured torch.cuda.CUDAGraph on the CPU: replay() reruns the captured step on
    the same buffers, which is what a graph's replay computes.  Checks the bookkeeping around a graph:
    buffers loaded before each replay, the output read after it, one capture per bucket."""

    def __init__(self, graphs, bucket, pool, last_only):
        self.step = lambda: bucket.forward(graphs.eager, pool, last_only)

    def replay(self):
        self.step()


def test_engine_replays_one_capture_per_bucket(monkeypatch):
    def capture(self, bucket, pool, last_only):
        bucket.out = None                     # a replay must write the output
        self.captures += 1
        return ReplayedGraph(self, bucket, pool, last_only)

    monkeypatch.setattr(CudaGraphs, "_capture", capture)
    model = sharp_model(seed=3)
    fast = padded(model, capture=True)
    settings = GenerationSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5)
    for lengths in ([4], [3, 8, 5], [6, 2, 9, 4, 7]):
        prompts = prompts_of(lengths, seed=len(lengths))
        want = Engine.sized_for(model, None, prompts, settings, block_size=4).run(prompts, settings)
        got = engine_for(fast, prompts, settings).run(prompts, settings)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    graphs = fast.forward
    assert graphs.captures == 3 and graphs.replays == graphs.padded_steps == 3 * 9


def test_padded_step_logits_equal_model_forward():
    """One decoding step of 3 sequences (a bucket of 4) through the engine's forward: each row's
    logits equal the uncached forward over that sequence."""
    model = sharp_model()
    fast = padded(model)
    engine = Engine(fast, None, EngineConfig(kv_memory=40 * 4 * 512, block_size=4, prefix_cache=False))
    engine.cache.k.zero_()
    engine.cache.v.zero_()
    prompts, new = prompts_of([6, 10, 3]), [11, 12, 13]
    tables = [[engine.pool.allocate() for _ in range(-(-(len(ids) + 1) // 4))] for ids in prompts]
    ends = [sum(len(p) for p in prompts[:i + 1]) - 1 for i in range(3)]
    engine.forward(torch.tensor([sum(prompts, [])]), [(t, 0, len(p)) for t, p in zip(tables, prompts)], ends)
    assert fast.forward.padded_steps == 0                                   # prompts run eagerly
    rows = [(t, len(p), len(p) + 1) for t, p in zip(tables, prompts)]
    got = engine.forward(torch.tensor([new]), rows, [0, 1, 2])                # [3, V]
    with torch.inference_mode():
        want = torch.stack([model(torch.tensor([ids + [t]]))[0, -1] for ids, t in zip(prompts, new)])
    assert fast.forward.padded_steps == 1 and list(fast.forward.buckets)[0][1:3] == (4, 64)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_hooks_and_prompt_steps_run_eagerly():
    model = sharp_model()
    fast = padded(model)
    prompts, settings = prompts_of([3, 5]), GenerationSettings(max_new_tokens=6)
    calls = []
    handle = fast.layers[0].register_forward_hook(lambda *args: calls.append(1))
    engine_for(fast, prompts, settings).run(prompts, settings)
    handle.remove()
    assert fast.forward.padded_steps == 0 and len(calls) >= 6


def test_steps_gathering_too_much_run_eagerly(monkeypatch):
    """Past GATHER_LIMIT slots (B x W x block_size) a decoding step is not padded: the eager tokens."""
    from llama3.fast import cuda_decode

    model = sharp_model()
    fast = padded(model)
    prompts, settings = prompts_of([3, 9]), GenerationSettings(max_new_tokens=8)
    want = Engine.sized_for(model, None, prompts, settings, block_size=4).run(prompts, settings)
    monkeypatch.setattr(cuda_decode, "GATHER_LIMIT", 2 * 64 * 4 - 1)          # one slot short of B=2, W=64
    got = engine_for(fast, prompts, settings).run(prompts, settings)
    assert [r.token_ids for r in got] == [r.token_ids for r in want] and fast.forward.padded_steps == 0


def test_token_generation_samples_rows_on_the_device():
    """TokenGeneration (generate.py) with the CUDA path installed: the same seeded tokens."""
    model = sharp_model(seed=4)
    fast = padded(model)
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.8, seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    want = generate_tokens(model, prompts, settings)
    list(want)
    got = generate_tokens(fast, prompts, settings)
    list(got)
    assert got.tokens == want.tokens


# ------------------------------------------------------------ sampling on the device
SETTINGS = [
    dict(),                                                                     # greedy
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.8, min_p=0.1),
    dict(temperature=1.0, top_k=30, top_p=0.95, min_p=0.05, repetition_penalty=1.3),
    dict(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.4, logit_bias={3: 5.0, 9: -100.0}),
    dict(temperature=0, repetition_penalty=1.5),                                # greedy with a penalty
    dict(temperature=1.0, logprobs=2),                                          # per row: Sampler.pick
]


def samplers_for(vocab, seed):
    rows = []
    for i, s in enumerate(SETTINGS):
        rows += [Sampler(vocab, seed=seed + i, prompt_ids=[1, 2, 3], **s),
                 Sampler(vocab, seed=seed + 100 + i, prompt_ids=[4, 5], **s)]  # two rows a setting
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pick_rows_equals_sampler_pick(seed):
    """Eight steps over random logits [18, V]: pick_rows and Sampler.pick row by row choose the same
    tokens and leave the same penalty state and generator state; a finished row (None) is skipped."""
    vocab = 97
    ours, theirs = samplers_for(vocab, seed), samplers_for(vocab, seed)
    gen = torch.Generator().manual_seed(seed)
    for step in range(8):
        logits = torch.randn(len(ours), vocab, generator=gen) * 3
        rows_ours = [None if (step >= 5 and i == 3) else s for i, s in enumerate(ours)]
        got = pick_rows(rows_ours, logits)
        want = [None if (step >= 5 and i == 3) else s.pick(logits[i]) for i, s in enumerate(theirs)]
        assert got == want, f"step {step}"
    for a, b in zip(ours, theirs):
        assert torch.equal(a.generator.get_state(), b.generator.get_state())
        for name in ("seen", "counts"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y)
    assert ours[-1].last is not None and ours[-1].last.token == want[-1]


def test_pick_rows_all_greedy_is_one_argmax():
    samplers = [Sampler(50), None, Sampler(50)]
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert pick_rows(samplers, logits) == [int(logits[0].argmax()), None, int(logits[2].argmax())]
    assert pick_rows([None, None], logits[:2]) == [None, None]

