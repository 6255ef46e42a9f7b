"""Decoding steps recorded once and replayed without Python: a CPU analogue of a CUDA graph.

Decoding one token of SmolLM2-135M runs model.py's forward: ~1,000 operator calls (the plan's
kernels, views, adds) from ~600 Python-level module and function calls.  On a 2-core CPU the
Python around the calls costs ~4-5 ms a token (measured with a 30-block model too small to
compute anything), next to ~10-20 ms of matrix-vector products.  `torch.jit.trace` runs
model.py's forward once and records the operators it calls; replaying the record runs the
same operators, in the same order, on the same weights, from C++ (TorchScript's interpreter):
the Python goes, the numbers stay (tests/test_fast_graph.py checks they are bit for bit the
eager ones).  Nothing here says what a block computes; the record is whatever model.py's
forward did: for a SmolLM2 block 17 operators (4 matvec, 2 rms_norm, 2 rope, store_attend, 2 residual
adds, unflatten, split, flatten, chunk, silu, mul), each ~0.2-3 us of interpreter and dispatch
besides its work (23 before the cache stored and attended in one call, taking q, k, v tokens first:
2 index_copy_ and 4 transposes a block; the engine's step 25 -> 17 alike).

    model.forward = DecodeGraphs(model)        # what apply_plan does with the C++ kernels

Then `model(tokens, start_pos, cache, positions, mask, last_only)` with one new token per row
and a `KVCache` replays a record, and so does the engine's decoding step over its paged cache (a
cache with `graph_inputs()`: its block pool, write slots and padded block tables are the record's
inputs, `replayed(...)` the cache traced over; one record per number of sequences); anything else
(prompts and prompt chunks, training, hooks, other devices) runs `Transformer.forward` itself.  A record is independent of the position and of the
cache's length: the position, the cache's tensors and a mask over all its slots are inputs
(`_Slots.attend`: the new key/value written at a tensor position and attended over slots
0..position in one C++ call, `store_attend`, the eager step's numbers bit for bit; where an attention
slot is not the C++ kernel's, index_copy_ and attention over every slot with the ones not yet
written masked off: the same numbers as attending over the first start_pos + 1).  One record per (batch size, dtype, mask or not, positions or not, last_only).

When the record would be stale it is dropped and the next step records again: a module's class
method changed (e.g. monkeypatched), a child module or a slot (`RMSNorm.kernel`, `FeedForward.kernel`,
`Attention.rope_kernel`/`attention_kernel`/`fused`) refilled, RoPE's tables regrown.  A slot
holding a function the plan did not put there, or any hook, runs eagerly every time (it may
count calls or read tensors).  LLAMA3_GRAPH=0 turns replay off.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.utils.hooks import RemovableHandle

from llama3 import model as readable
from llama3.fast import kernels

# The slot functions a record may stand for: pure functions of their tensors (no side effects)
PURE_SLOTS = {readable.rms_norm, readable.apply_rope, readable.fused_attention, readable.silu_mul,
              kernels.rms_norm, kernels.rms_norm_torch, kernels.rope, kernels.attention, kernels.silu_mul}


# Eager engine steps of one shape before it is recorded (DecodeGraphs.paged_record_after): a few, so a
# request of a token or two (a probe, a classification) traces nothing, and every longer one replays.
PAGED_RECORD_AFTER = 4


def enabled() -> bool:
    return os.environ.get("LLAMA3_GRAPH", "1") != "0"


class _Slots:
    """A KVCache seen by a recorded step: key/value tensors that are inputs of the record, the new
    token's key and value written at a tensor position.  layers: each layer's (keys, values)
    [B, Hkv, max_len, Dh], the views `KVCache.layers` holds (inputs of the record one by one: no
    per-layer indexing replayed); slot: long [1].

    Where every layer's attention slot is the C++ kernel's (`in_place`), `attend` is one operator
    call a layer (`torch.ops.llama3.store_attend`, fast/cache_attend.cpp): it writes the new key and
    value at the slot and runs that kernel over slots 0..slot, as the eager step's `update` and
    attention slot do, taking q, k, v tokens first as model.py projects them (no transposes
    replayed).  Otherwise `attend` declines and `update` writes them with index_copy_ and returns
    every slot (the mask hides the ones not yet written)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], slot: torch.Tensor, in_place: bool = False):
        self.layers, self.slot, self.in_place = layers, slot, in_place

    def attend(self, layer: int, start_pos: int, q, k, v, mask):
        """q [B, 1, H, Dh]; k, v [B, 1, Hkv, Dh]; mask [B or 1, 1, 1, max_len] -> [B, 1, H, Dh], or None."""
        if not self.in_place:
            return None
        keys, values = self.layers[layer]
        return torch.ops.llama3.store_attend(q, keys, values, k, v, self.slot, mask)

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.layers[layer]                      # [B, Hkv, max_len, Dh]
        keys.index_copy_(2, self.slot, k)                      # k [B, Hkv, 1, Dh] at the slot
        values.index_copy_(2, self.slot, v)
        return keys, values


class DecodeGraphs:
    """`model.forward` replaced by this: replays recorded one-token steps, runs model.py's forward
    for anything else.  See the module docstring."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: dict[tuple, torch.jit.ScriptFunction] = {}
        self.stamp: list | None = None  # what the records depend on (`_stamp`); None: not looked yet
        self.pure = False
        self.hooks_seen_at = None         # RemovableHandle.next_id when the model was last found hook-free
        self.replays = 0                  # steps replayed (for tests and `llama3 bench`)
        # The engine's steps of a shape are recorded after this many eager ones (see _paged: a record
        # costs ~10 eager steps once TorchScript's optimizer is kept off it)
        self.paged_record_after = PAGED_RECORD_AFTER
        self.seen: dict[tuple, int] = {}

    # copies and pickles carry no records (they hold the original's tensors)
    def __deepcopy__(self, memo):
        return DecodeGraphs(memo.get(id(self.model), self.model))

    def __reduce__(self):
        return (DecodeGraphs, (self.model,))

    def eager(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, tokens, start_pos=0, cache=None, positions=None, mask=None, last_only=False):
        if getattr(cache, "graph_inputs", None) is not None:  # the engine's paged step
            return self._paged(tokens, cache, positions, mask, last_only)
        if not self._replayable(tokens, start_pos, cache, positions, mask):
            return self.eager(tokens, start_pos, cache, positions, mask, last_only)
        model = self.model
        batch, length = tokens.shape[0], cache.max_len
        if model.rope.cos.shape[0] < length:  # tables for every slot, built now, not inside a record
            model.rope(torch.zeros(1, dtype=torch.long), length)
        slot = torch.tensor([start_pos])
        if mask is None:
            visible = (torch.arange(length) <= start_pos).view(1, 1, 1, length)  # [1, 1, 1, max_len]
        else:
            visible = mask.new_zeros(mask.shape[0], 1, 1, length)                # [B or 1, 1, 1, max_len]
            visible[..., :mask.shape[-1]] = mask
        key = (batch, cache.k.dtype, positions is None, visible.shape[0], last_only)
        args = (tokens, slot if positions is None else positions, visible, slot,
                *(t for pair in cache.layers for t in pair))  # keys 0, values 0, keys 1, ...

        def step(tokens, positions, visible, slot, *kv):  # traced after _restamp: cpp_attention is current
            layers = list(zip(kv[0::2], kv[1::2]))
            in_place = self.cpp_attention and cache.k.dtype in (torch.float32, torch.bfloat16)
            return self.eager(tokens, 0, _Slots(layers, slot, in_place), positions, visible, last_only)

        # TorchScript's optimizer off, as in _paged: its optimizing run on the second replay cost 110-400 ms
        # of CPU once per record, and optimized replays were no faster (SmolLM2 int4, 1 thread, alternating
        # on one record: 14.9 vs 15.0 ms CPU a step, median of 150)
        with torch.jit.optimized_execution(False):
            return self._replay(key, args, step, lambda: self.eager(tokens, start_pos, cache, positions, mask,
                                                                    last_only))

    def _paged(self, tokens, cache, positions, mask, last_only):
        """A step of the engine (`llama3/engine/paged_cache.py`): one new token per decoding sequence,
        side by side [1, N], each at its own position [1, N]; the cache's `graph_inputs()` (its
        write slots, tables and each layer's block pool as tensors) are the record's inputs, `replayed(...)` the cache
        the record was traced over.  Prompt chunks and anything else run eagerly."""
        inputs = None
        if (enabled() and not torch.is_grad_enabled() and not torch.jit.is_tracing() and mask is None
                and tokens.dim() == 2 and tokens.shape[0] == 1 and tokens.device.type == "cpu"
                and positions is not None and tuple(positions.shape) == tuple(tokens.shape) and self._hook_free()):
            inputs = cache.graph_inputs()
        if inputs is None:
            return self.eager(tokens, 0, cache, positions, mask, last_only)
        model = self.model
        if model.rope.cos.shape[0] < model.config.max_seq_len:  # tables for every position, built now
            model.rope(torch.zeros(1, dtype=torch.long), model.config.max_seq_len)
        key = ("paged", type(cache), tokens.shape[1], inputs[2].shape, inputs[5].dtype, last_only)  # tables, keys 0

        def step(tokens, positions, *tensors):
            return self.eager(tokens, 0, cache.replayed(*tensors), positions, None, last_only)

        # TorchScript's graph optimizer stays off for these records (a thread-local flag, set for this
        # call): on a record of model.py's forward it spent 2-20 s of CPU on the second replay (the
        # profiling executor's optimizing run; the legacy executor's first run alike) and made the
        # replay no faster (SmolLM2 int4, 2 cores, same process, alternating: 16.1 ms CPU a step
        # optimized, 15.4 not, 20.7 eager).  Without it a record costs the trace (~150-180 ms CPU)
        # and one unoptimized first run (~40 ms): ~10 eager steps, not the ~2 s once measured.
        with torch.jit.optimized_execution(False):
            return self._replay(key, (tokens, positions, *inputs), step,
                                lambda: self.eager(tokens, 0, cache, positions, mask, last_only),
                                self.paged_record_after)

    def _replay(self, key, args, step, eager_step, wait: int = 0):
        """The record of `key` run on `args`: traced from `step` the first time (after `wait` eager
        steps of that key), `eager_step()` where the model is not pure or `step` cannot be traced."""
        if self.stamp is None or self._stamp() != self.stamp:
            self._restamp()
        if not self.pure:
            return eager_step()
        record = self.records.get(key)
        if record is None and self.seen.get(key, 0) < wait:  # not worth a trace yet
            self.seen[key] = self.seen.get(key, 0) + 1
            return eager_step()
        if record is None:
            record = self.records[key] = self._trace(step, args)  # False: it cannot be traced
            if self._stamp() != self.stamp:  # recording filled something lazily (scales made on first use)
                self._restamp()
                self.records[key] = record
        if record is False:
            return eager_step()
        self.replays += 1
        return record(*args)

    def _replayable(self, tokens, start_pos, cache, positions, mask) -> bool:
        if not enabled() or type(cache) is not readable.KVCache or torch.is_grad_enabled():
            return False
        if tokens.dim() != 2 or tokens.shape[1] != 1 or tokens.device.type != "cpu" or torch.jit.is_tracing():
            return False
        batch = tokens.shape[0]
        if cache.k.shape[1] != batch or not 0 <= start_pos < cache.max_len or cache.k.device.type != "cpu":
            return False
        if positions is not None and tuple(positions.shape) != (batch, 1):
            return False
        if mask is not None and (mask.dim() != 4 or tuple(mask.shape[1:3]) != (1, 1)
                                 or mask.shape[-1] != start_pos + 1 or mask.dtype != torch.bool
                                 or mask.shape[0] not in (1, batch)):
            return False
        return self._hook_free()

    def _hook_free(self) -> bool:
        """No hook anywhere (inspection reads tensors mid-block: it needs the eager run)."""
        if (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks):
            return False
        if self.hooks_seen_at == RemovableHandle.next_id:  # no hook registered anywhere since the last look
            return True
        for m in self.model.modules():
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                self.hooks_seen_at = None
                return False
        self.hooks_seen_at = RemovableHandle.next_id
        return True

    def _restamp(self) -> None:
        """Something a record depends on changed: drop the records, look at the model afresh."""
        self.records.clear()
        modules = list(self.model.modules())
        self.classes = sorted({type(m) for m in modules}, key=lambda c: c.__qualname__)
        self.parents = [m for m in modules if m._modules]
        self.holders = [m for m in modules if isinstance(m, (readable.RMSNorm, readable.Attention, readable.FeedForward))]
        self.tables = (self.model.rope.cos, self.model.rope.sin)
        self.stamp = self._stamp()
        self.pure = all(m.kernel in PURE_SLOTS for m in modules if isinstance(m, (readable.RMSNorm, readable.FeedForward))) and all(
            m.rope_kernel in PURE_SLOTS and m.attention_kernel in PURE_SLOTS
            for m in modules if isinstance(m, readable.Attention))
        # every attention slot the C++ kernel's: a record's cache may store and attend in one call (_Slots)
        self.cpp_attention = all(m.attention_kernel is kernels.attention
                                 for m in modules if isinstance(m, readable.Attention))

    def _stamp(self) -> list:
        """What a record depends on besides the weights' values: each module class's forward and
        call, every module's children, the slots, RoPE's tables.  ~15 us for SmolLM2's 30 blocks."""
        out = [(c.forward, c.__call__) for c in self.classes]
        for m in self.parents:
            out.extend(m._modules.values())
        for m in self.holders:
            d = m.__dict__
            out.extend([d.get("kernel"), d.get("rope_kernel"), d.get("attention_kernel"), d.get("fused")])
        out += [id(self.model.rope.cos), id(self.model.rope.sin)]  # ids: the tables are held in self.tables
        return out

    def _trace(self, step, args):
        """torch.jit.trace of `step` over `args` (it runs once); False where it cannot be traced."""
        model = self.model
        grads = [p for p in model.parameters() if p.requires_grad]
        try:
            for p in grads:  # the trace keeps weights as constants, which may not require grad
                p.requires_grad_(False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.jit.trace(step, args, check_trace=False)
        except Exception:  # something model.py's forward did that a trace cannot hold: stay eager
            return False
        finally:
            for p in grads:
                p.requires_grad_(True)


def install(model: nn.Module) -> nn.Module:
    """Replay recorded decoding steps on `model` (in place): `model.forward = DecodeGraphs(model)`."""
    # a fresh one each time: a plan applied again may change what no stamp sees (a linear's kernels)
    model.forward = DecodeGraphs(model)
    return model


def graphs_of(model: nn.Module) -> DecodeGraphs | None:
    forward = model.__dict__.get("forward")
    return forward if isinstance(forward, DecodeGraphs) else None
