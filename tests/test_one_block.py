"""model.py is the only place that says what a block computes: change it there and every path
changes with it (prefill, one-token decoding, a left-padded batch, the C++ kernels' plan, the
trace).  The change here is a deliberate one (RMSNorm doubled, SiLU swapped for GELU); each path
must move away from its old output and agree with the readable forward changed the same way."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_model
from llama3.fast import speed_up
from llama3.generate import GenerationSettings, generate_tokens
from llama3.inspect.trace import trace
from llama3.llm import LLM
from llama3.model import KVCache, RMSNorm

PROMPTS = [[3, 1, 4, 1, 5], [9, 2]]


def outputs(model):
    """What each path produces: prefill logits, cached decoding logits, batched greedy tokens, trace."""
    tokens = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        prefill = model(tokens)
        cache = KVCache(model.config, 1, 8, dtype=model.dtype)
        model(tokens[:, :4], 0, cache)
        decoded = model(tokens[:, 4:], 4, cache)                       # one token through the cache
    run = generate_tokens(model, PROMPTS, GenerationSettings(max_new_tokens=6))
    list(run)
    traced = trace(LLM(model, model.config), PROMPTS[0], layer=1)
    return {"prefill": prefill, "decode": decoded, "batch": run.tokens,
            "trace": traced.root.children[-2].tensor, "trace_out": traced.checks[1]}


def test_changing_the_block_in_model_py_changes_every_path(monkeypatch):
    model = make_model(seed=11)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)                                              # sharper logits: token changes show
    fast = speed_up(copy.deepcopy(model))                             # fused, C++ kernels where they build
    before = {"plain": outputs(model), "fast": outputs(fast)}
    original = RMSNorm.forward
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: 2 * original(self, x))
    monkeypatch.setattr(nn.SiLU, "forward", lambda self, x: F.gelu(x))
    after = {"plain": outputs(model), "fast": outputs(fast)}
    for path in ("plain", "fast"):
        for name in ("prefill", "decode", "trace"):
            assert not torch.allclose(after[path][name], before[path][name], atol=1e-3), (path, name)
        assert after[path]["trace_out"]["block_output_max_abs_diff"] == 0.0
    torch.testing.assert_close(after["fast"]["prefill"], after["plain"]["prefill"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after["fast"]["decode"], after["plain"]["decode"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after["fast"]["trace"], after["plain"]["trace"], rtol=1e-4, atol=1e-4)
    assert after["fast"]["batch"] == after["plain"]["batch"] != before["plain"]["batch"]
