"""Tensor-parallel inference: N processes each hold 1/N of every block (`torchrun ... --tp N`).

Uses PyTorch's own engine, `torch.distributed.tensor.parallel` over a 1-D `DeviceMesh`
(gloo on CPUs, NCCL on GPUs), applied from outside model.py, which stays the one
definition of the block:

    tok_embeddings  RowwiseParallel   rows = vocabulary split; each rank looks up its ids,
                                      the partial embeddings are summed (all-reduce)
    wq wk wv w1 w3  ColwiseParallel   output rows split: rank r computes its heads / F slice
    wo w2           RowwiseParallel   input columns split; the partial outputs are all-reduced
    output          ColwiseParallel   vocabulary split, logits all-gathered (Replicate)
    norms, RoPE     replicated

Heads are split by key/value-head groups: rank r holds kv heads r*Hkv/N.. and the n_rep query
heads that share each of them, so attention needs no communication.  N must divide n_kv_heads.
Each rank's `model.config` is the per-rank view (H/N, Hkv/N heads), so the KV cache that
generation allocates from it holds only the rank's heads; `model.full_config` is the model's.

Loading: the model is built on the `meta` device, parallelized, and each parameter is then
replaced by a DTensor whose local tensor is this rank's slice read from the memory-mapped
checkpoint (`llama3.parallel.slices`): no rank ever holds a whole weight matrix.

Sampling runs once, on rank 0, and the token is broadcast, so every rank feeds the same id and
seeded output equals one process's.  Every collective has a timeout (LLAMA3_TP_TIMEOUT seconds,
default 600), and a failed or timed-out collective (while loading, in a forward, in a broadcast)
becomes a CollectiveError naming the rank.  How the ranks keep their forwards together is
lockstep.py's; the commands' `--tp` is launch.py's.
The NCCL path (CUDA) is written but was not tested: the machine this was built on has no GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
from torch import nn

from llama3.config import ModelConfig
from llama3.errors import Llama3Error, ServiceError

COLWISE = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROWWISE = ("attention.wo", "feed_forward.w2")


def timeout_seconds() -> float:
    try:
        return float(os.environ.get("LLAMA3_TP_TIMEOUT", "600"))
    except ValueError:
        raise Llama3Error("LLAMA3_TP_TIMEOUT must be a number of seconds") from None


def possible_tp(config: ModelConfig) -> list[int]:
    return [n for n in range(1, config.n_kv_heads + 1) if config.n_kv_heads % n == 0]


def check_tp(config: ModelConfig, tp: int) -> None:
    """N must divide the key/value heads (whole groups per rank)."""
    if tp < 1 or config.n_kv_heads % tp:
        raise Llama3Error(f"--tp {tp}: the model has {config.n_kv_heads} key/value heads, which must split evenly "
                          f"over the ranks; possible --tp values: {', '.join(map(str, possible_tp(config)))}")


def check_world(tp: int) -> None:
    """The processes torchrun started must be exactly --tp of them."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        raise Llama3Error(f"--tp {tp} needs {tp} processes: run it as "
                          f"`torchrun --nproc-per-node {tp} -m llama3 ... --tp {tp}`")
    if not world.isdigit() or int(world) != tp:
        raise Llama3Error(f"--tp {tp} but torchrun started {world} processes (WORLD_SIZE={world}); "
                          f"use --nproc-per-node {tp}, or --tp {world}")


def init_mesh(tp: int):
    """Join the process group (gloo on CPU, NCCL when CUDA is there) with timeouts -> 1-D DeviceMesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    check_world(tp)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
    return init_device_mesh("cuda" if cuda else "cpu", (tp,))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def tp_plan(config: ModelConfig) -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate())}
    for i in range(config.n_layers):
        plan.update({f"layers.{i}.{m}": ColwiseParallel() for m in COLWISE})
        plan.update({f"layers.{i}.{m}": RowwiseParallel() for m in ROWWISE})
    return plan


def shard_range(size: int, tp: int, index: int) -> tuple[int, int]:
    """Rows start:stop of shard `index` of `size`, as DTensor's Shard (torch.chunk) cuts them."""
    chunk = -(-size // tp)
    start = min(size, index * chunk)
    return start, min(size, start + chunk)


def parallelize(config: ModelConfig, reader, mesh, dtype: torch.dtype):
    """A Transformer whose parameters are DTensors holding this rank's slices (read by `reader`)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    from llama3.model import Transformer

    tp, me = mesh.size(), mesh.get_local_rank()
    with torch.device("meta"):
        model = Transformer(config)
    parallelize_module(model, mesh, tp_plan(config))
    for name, p in list(model.named_parameters()):
        if name == "output.weight" and config.tie_embeddings:
            continue
        module_name, _, attr = name.rpartition(".")
        if isinstance(p, DTensor):
            dim = p.placements[0].dim
            local = reader.read(name, dim, *shard_range(p.shape[dim], tp, me))
            local = local.to(device=mesh.device_type, dtype=dtype).contiguous()
            expected = list(p.to_local().shape)
            if list(local.shape) != expected:
                raise Llama3Error(f"tensor {name!r}: slice {list(local.shape)} but the config needs {expected}; "
                                  "the config contradicts the weights")
            value = DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        else:
            value = reader.read(name, None).to(device=mesh.device_type, dtype=dtype).contiguous()
        setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=False))
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight   # the same vocabulary slice serves both
    for layer in model.layers:
        layer.attention.n_heads //= tp
        layer.attention.n_kv_heads //= tp
    model.full_config = config
    model.config = config.replace(n_heads=config.n_heads // tp, n_kv_heads=config.n_kv_heads // tp,
                                  head_dim=config.head_dim)   # what this rank's KV cache holds
    return model.eval()


def load_tp(source, tp: int, dtype: torch.dtype | str | None = None):
    """Join the torchrun group and load `source` split over its `tp` ranks -> LLM (model = this rank's part)."""
    from llama3.tokenizer import find_tokenizer
    from llama3.llm import LLM, parse_dtype, resolve_source
    from llama3.parallel.slices import open_slices

    path = resolve_source(source)
    config, reader = open_slices(path)
    check_tp(config, tp)
    mesh = init_mesh(tp)
    with collective_errors():
        model = parallelize(config, reader, mesh, parse_dtype(dtype) or torch.float32)
    forward = model.forward

    def forward_or_one_line(*args, **kwargs):  # a peer gone mid-forward: CollectiveError, not a traceback
        with collective_errors():
            return forward(*args, **kwargs)

    model.forward = forward_or_one_line
    return LLM(model=model, config=config, tokenizer=find_tokenizer(path), source=str(source or path))


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights this rank holds (each tensor once: a tied head is not counted twice)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.data_ptr() not in seen:
            seen.add(local.data_ptr())
            total += local.numel() * local.element_size()
    return total


class CollectiveError(ServiceError):
    """A collective failed or timed out: another rank stopped, or did not answer in time (the server: 503)."""


def collective_error(cause: BaseException, rank: int) -> CollectiveError:
    """The one line for a collective that failed with `cause` on `rank`: what failed, what to do."""
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    return CollectiveError(f"rank {rank}: a tensor-parallel collective failed ({first}); another rank stopped or "
                           f"did not answer within LLAMA3_TP_TIMEOUT={timeout_seconds():g} s; restart the whole "
                           "torchrun command (every rank)")


@contextlib.contextmanager
def collective_errors():
    """A collective that fails (a peer died) or times out -> CollectiveError naming this rank.
    A rank other than 0 also writes it to the real stderr (its sys.stderr is quiet, see launch.py)."""
    import sys

    import torch.distributed as dist

    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if isinstance(e, Llama3Error) or not dist.is_initialized():
            raise
        error = collective_error(e, dist.get_rank())
        if dist.get_rank() != 0:
            print(f"error: {error}", file=sys.__stderr__, flush=True)
        raise error from None


def sample_on_rank0(tokens) -> None:
    """Make a TokenGeneration sample on rank 0 only and broadcast the ids, so all ranks agree."""
    import torch.distributed as dist

    pick = tokens._pick

    @torch.inference_mode()
    def broadcast_pick(logits):
        # ids [B]: the chosen id per row, -1 for a finished row (which TokenGeneration reports as None)
        if dist.get_rank() == 0:
            _, chosen = pick(logits)
            ids = torch.tensor([-1 if i is None else i for i in chosen], dtype=torch.long, device=logits.device)
        else:
            ids = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        dist.broadcast(ids, src=0)
        as_list = [None if i < 0 else i for i in ids.tolist()]
        return ids.clamp(min=0), as_list

    tokens._pick = broadcast_pick


def broadcast_text(text: str | None) -> str:
    """Rank 0's text (e.g. read from stdin) on every rank."""
    import torch.distributed as dist

    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
