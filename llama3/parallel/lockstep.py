"""Keeping the ranks of a tensor-parallel model in step: every forward must run on all of them.

Each block's all-reduce waits for every rank, so a forward that only rank 0 runs would wait
forever.  Two ways in which the ranks stay together:

  * the same code on every rank (`generate`, `perplexity`, `bench`): each rank runs the same
    loop over the same prompt; sampling happens on rank 0 and the ids are broadcast
    (`tp.sample_on_rank0`), so every rank feeds the same token.  The body runs `inside()`.
  * rank 0 leads an engine (`chat`, `serve`): only rank 0 reads stdin or listens, admits
    requests, schedules and samples.  Before each engine step it broadcasts the step's
    description - the token ids laid side by side, each sequence's (block table, first
    position, end), and the indices whose logits are wanted - on a control group, and every
    other rank (`follow`) runs `Engine.forward` on exactly that step over its own paged
    cache, whose block tables therefore equal rank 0's.  `None` tells the followers to stop.

The control group (gloo, objects pickled) has no practical timeout, since a server may sit
idle for days between requests; the model's own collectives keep the short one
(LLAMA3_TP_TIMEOUT).  A forward on rank 0 outside these two paths (e.g. /explain, echo's
prompt scoring, the Lab) is refused with a Llama3Error instead of hanging: a pre-hook on
the token embedding checks that the calling thread is `inside()`.
"""

from __future__ import annotations

import contextlib
import datetime
import threading

import torch

from llama3.errors import Llama3Error

IDLE_TIMEOUT = datetime.timedelta(days=365)   # the control group's: followers wait for the next request
_state = threading.local()
_control = None


def control_group():
    """The gloo group rank 0's commands travel on (made once, collectively, on every rank)."""
    import torch.distributed as dist

    global _control
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return _control


@contextlib.contextmanager
def inside():
    """Mark this thread's forwards as run by every rank together."""
    before = getattr(_state, "active", False)
    _state.active = True
    try:
        yield
    finally:
        _state.active = before


def always_inside() -> None:
    """Mark this thread's forwards, from now on, as run by every rank together (perplexity, bench)."""
    _state.active = True


def leave() -> None:
    """Undo `always_inside` for this thread."""
    _state.active = False


def guard(model) -> None:
    """Refuse a forward that the other ranks would not run (it would wait on them forever)."""
    def check(module, args):
        if not getattr(_state, "active", False):
            raise Llama3Error("this needs a forward of the model that only rank 0 would run (e.g. /explain, "
                              "echo, the Lab); it is not available with --tp")
        return None

    model.tok_embeddings.register_forward_pre_hook(check)


def broadcast(value=None):
    """Rank 0's picklable `value` on every rank, over the control group."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def lead(engine) -> None:
    """Rank 0: broadcast each engine step's description before running it."""
    forward = engine.forward

    def mirrored(tokens: torch.Tensor, rows, want):
        # tokens [1, N]; rows [(block table, first position, end)] per sequence; want: token indices
        from llama3.parallel.tp import collective_errors

        with collective_errors(), inside():
            broadcast((tokens[0].tolist(), [(list(t), b, e) for t, b, e in rows], list(want)))
            return forward(tokens, rows, want)

    engine.forward = mirrored


def stop_followers() -> None:
    """Rank 0: tell the followers there will be no more steps."""
    broadcast(None)


def follow(engine) -> None:
    """Ranks 1..N-1: run rank 0's engine steps until it says stop."""
    from llama3.parallel.tp import collective_errors

    with collective_errors():
        while (step := broadcast()) is not None:
            ids, rows, want = step
            with inside():
                engine.forward(torch.tensor([ids], dtype=torch.long, device=engine.device), rows, want)


def shared_engine(model, tokenizer, config=None):
    """An Engine on every rank with rank 0's KV budget and parallel limit (so the followers' paged
    caches have as many blocks as rank 0's block tables use); rank 0's leads, the others follow."""
    import dataclasses

    import torch.distributed as dist

    from llama3.engine import Engine, EngineConfig

    config = config or EngineConfig()
    if dist.get_rank() == 0:
        try:
            engine = Engine(model, tokenizer, config)
        except Llama3Error as e:  # e.g. a --kv-memory too small: the followers stop as well
            broadcast(("error", str(e)))
            raise
        broadcast(("ok", (engine.budget, engine.parallel)))
        lead(engine)
        return engine
    kind, value = broadcast()
    if kind == "error":
        raise SystemExit(2)   # rank 0 says why
    budget, parallel = value
    return Engine(model, tokenizer, dataclasses.replace(config, kv_memory=budget, parallel=parallel))
