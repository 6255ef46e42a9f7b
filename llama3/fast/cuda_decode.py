"""The engine's decoding steps on a CUDA GPU: a static padded batch, captured once per bucket as a
CUDA graph and replayed; and sampling for every row of a step on the device, one host read a step.

On a GPU a small model's decoding step is launch-bound: SmolLM2-135M's 30 blocks launch ~750 small
kernels a token from Python, which take longer than the arithmetic.  A CUDA graph
(`torch.cuda.CUDAGraph`) records the kernels of one step once and replays them with one launch, if
nothing about the step changes: no tensor may change shape or address.  The engine's steps change
every time (sequences come and go; each has its own block table and position), so a step here is
laid into fixed buffers first:

    bucket      the step's N decoding sequences padded to B = the next of 1, 2, 4, ... 256 rows;
                a padding row repeats row 0 (its token, position, block table and write slot, and
                the keys it writes are row 0's own: the duplicate write stores the same numbers)
    width       block tables padded to W = 64 blocks (1,024 tokens) or the next power of two
    buffers     tokens [1, B], positions [1, B], write slots [B], tables [B, W]: filled each step
                (one host->device copy), read by the graph at fixed addresses
    attention   `PaddedStep.attend`: the new keys and values written into their blocks of the
                engine's pool (`llama3/engine/paged_cache.py`), each row's blocks gathered
                [B, Hkv, W x block_size, Dh] and attended by model.py's `fused_attention` with the
                positions past the row's own masked off; grouped-query heads as n_rep queries of
                their key/value head, without copies

One graph per (B, W, pool): captured on a side stream after warm-up runs of the same step (the
warm-ups write the same keys into the same slots, so they change nothing), replayed on every later
step of that shape.  The forward captured is model.py's `Transformer.forward`; nothing here says
what a block computes.  Prompt chunks, steps mixing prompts and decoding, hooks, more than 256
sequences, and steps whose gathered slots (B x W x block_size) pass GATHER_LIMIT run eagerly.
`capture=False` runs the same padded step without capturing (how the CPU
tests check it); LLAMA3_GRAPH=0 turns the padded path off.

    model.forward = CudaGraphs(model)         # what apply_plan does on CUDA (plan.cuda_graphs)

Sampling (`pick_rows`): sampling.py's `Sampler.pick` reads each row's token back to the host,
one device->host sync a row a step.  `pick_rows` computes every row's token of a step on the device
with sampling.py's own functions (rows with equal settings in one batched call: / temperature ->
top-k -> top-p -> min-p -> softmax; each row's draw from its own torch.Generator, as `draw` does)
and reads them back at once: the same tokens as `Sampler.pick` for the same logits and seeds.
"""

from __future__ import annotations

import weakref

import torch

from llama3.fast import graph
from llama3.fast.graph import DecodeGraphs
from llama3.model import fused_attention
from llama3.sampling import apply_min_p, apply_top_k, apply_top_p

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)   # rows of a padded decoding step
TABLE_WIDTH = 64                                # blocks of a padded table at least (1,024 tokens of 16)
WARMUP = 2                                      # eager runs before a capture (cuBLAS handles, lazy init)
# A padded step gathers B x W x block_size key and value slots a layer; beyond this many it runs eagerly
# (B = 32 rows up to 8,192 tokens; SmolLM2 bf16: ~200 MB a layer, freed before the next)
GATHER_LIMIT = 1 << 18


def bucket_of(rows: int) -> int | None:
    """The padded batch size for `rows` decoding sequences; None beyond the largest bucket."""
    return next((b for b in BUCKETS if b >= rows), None)


def width_of(blocks: int) -> int:
    """The padded block-table width for tables of `blocks` blocks: TABLE_WIDTH or the next power of two."""
    return max(TABLE_WIDTH, 1 << max(0, blocks - 1).bit_length())


class PaddedStep:
    """The cache model.py's forward sees in a padded step: `attend` on fixed tensors only.
    k, v: the pool [n_layers, n_blocks, Hkv, bs, Dh]; write_block, write_offset, source [B];
    tables [B, W]; visible [B, 1, 1, W x bs] bool."""

    def __init__(self, k, v, block_size, write_block, write_offset, source, tables, visible):
        self.k, self.v, self.block_size = k, v, block_size
        self.write_block, self.write_offset, self.source = write_block, write_offset, source
        self.tables, self.visible = tables, visible

    def attend(self, layer: int, start_pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
        """q [1, B, H, Dh]; k, v [1, B, Hkv, Dh] (row b's new key and value) -> [1, B, H, Dh]."""
        keys, values = self.k[layer], self.v[layer]                                   # [n_blocks, Hkv, bs, Dh]
        keys[self.write_block, :, self.write_offset] = k[0][self.source].to(keys.dtype)
        values[self.write_block, :, self.write_offset] = v[0][self.source].to(values.dtype)
        rows, heads, kv_heads, dh = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
        held_k = keys[self.tables].transpose(1, 2).flatten(2, 3)                      # [B, Hkv, W*bs, Dh]
        held_v = values[self.tables].transpose(1, 2).flatten(2, 3)
        # query head h uses key/value head h // n_rep: the n_rep heads of a group are n_rep queries of it
        grouped = q[0].reshape(rows, kv_heads, heads // kv_heads, dh)                 # [B, Hkv, n_rep, Dh]
        out = fused_attention(grouped, held_k.to(q.dtype), held_v.to(q.dtype), self.visible)
        return out.reshape(rows, heads, dh)[None]                                     # [1, B, H, Dh]


class _Bucket:
    """The fixed buffers of one (B, W, pool) shape, and its graph once captured."""

    def __init__(self, pool, rows: int, width: int):
        device = pool.device
        self.pool_ref = weakref.ref(pool.k)     # a graph holds the pool's address, not the pool
        self.rows, self.width, self.block_size = rows, width, pool.block_size
        self.host = torch.zeros(rows * (4 + width), dtype=torch.long)                 # packed, then one copy
        self.packed = torch.zeros_like(self.host, device=device)
        b = rows
        self.positions = self.packed[:b].view(1, b)
        self.write_block, self.write_offset = self.packed[b:2 * b], self.packed[2 * b:3 * b]
        self.source = self.packed[3 * b:4 * b]
        self.tables = self.packed[4 * b:].view(b, width)
        self.tokens = torch.zeros(1, b, dtype=torch.long, device=device)
        self.key_slots = torch.arange(width * pool.block_size, device=device)         # [W*bs]
        self.graph: torch.cuda.CUDAGraph | None | bool = None                         # False: cannot capture
        self.out: torch.Tensor | None = None

    def load(self, tokens: torch.Tensor, rows: list[tuple[list[int], int, int]]) -> None:
        """Fill the buffers for this step: tokens [1, N] on the device; rows (table, begin, begin + 1)."""
        n, b, w, size = len(rows), self.rows, self.width, self.block_size
        positions, blocks, offsets, tables = [], [], [], []
        for index in list(range(n)) + [0] * (b - n):                                   # padding repeats row 0
            table, begin, _ = rows[index]
            positions.append(begin)
            blocks.append(table[begin // size])
            offsets.append(begin % size)
            used = table[:begin // size + 1]
            tables += used + [0] * (w - len(used))
        source = list(range(n)) + [0] * (b - n)
        self.host.copy_(torch.tensor(positions + blocks + offsets + source + tables, dtype=torch.long))
        self.packed.copy_(self.host)
        self.tokens[:, :n].copy_(tokens)
        if n < b:
            self.tokens[:, n:].copy_(tokens[:, :1].expand(1, b - n))

    def forward(self, eager, pool, last_only: bool) -> torch.Tensor:
        """model.py's forward over the buffers (what a graph captures) -> logits [1, B, V]."""
        visible = (self.key_slots[None, :] <= self.positions[0][:, None])[:, None, None, :]   # [B, 1, 1, W*bs]
        cache = PaddedStep(pool.k, pool.v, pool.block_size, self.write_block, self.write_offset, self.source,
                           self.tables, visible)
        self.out = eager(self.tokens, 0, cache, self.positions, None, last_only)
        return self.out


class CudaGraphs(DecodeGraphs):
    """`model.forward` replaced by this on CUDA: the engine's decoding steps padded to a bucket and
    replayed from a CUDA graph (see the module docstring); everything else runs model.py's forward.
    `pick_rows` is how the engine samples with it.  capture: None = on CUDA devices."""

    def __init__(self, model, capture: bool | None = None):
        super().__init__(model)
        self.capture = capture
        self.buckets: dict[tuple, _Bucket] = {}
        self.captures = 0              # graphs captured (tests, benchmarks)
        self.padded_steps = 0          # steps run through a bucket, replayed or not

    def __deepcopy__(self, memo):
        return CudaGraphs(memo.get(id(self.model), self.model), self.capture)

    def __reduce__(self):
        return (CudaGraphs, (self.model, self.capture))

    def pick_rows(self, samplers: list, logits: torch.Tensor) -> list[int | None]:
        """The engine's sampling with this forward: every row's token on the device (`pick_rows`)."""
        return pick_rows(samplers, logits)

    def __call__(self, tokens, start_pos=0, cache=None, positions=None, mask=None, last_only=False):
        rows = self._decoding_rows(tokens, cache, positions, mask)
        if rows is None:
            return self.eager(tokens, start_pos, cache, positions, mask, last_only)
        if self.stamp is None or self._stamp() != self.stamp:
            self._restamp()
        if not self.pure:
            return self.eager(tokens, start_pos, cache, positions, mask, last_only)
        pool = cache.pool
        size = pool.block_size
        rows_padded, width = bucket_of(len(rows)), width_of(max(begin // size + 1 for _, begin, _ in rows))
        if rows_padded * width * size > GATHER_LIMIT:
            return self.eager(tokens, start_pos, cache, positions, mask, last_only)
        bucket = self._bucket(pool, rows_padded, width, last_only)
        bucket.load(tokens, rows)
        self.padded_steps += 1
        capture = self.capture if self.capture is not None else tokens.device.type == "cuda"
        if bucket.graph is None and capture:
            bucket.graph = self._capture(bucket, pool, last_only)
        if bucket.graph:
            bucket.graph.replay()
            self.replays += 1
            out = bucket.out
        else:
            out = bucket.forward(self.eager, pool, last_only)
        return out[:, :len(rows)].clone()          # the graph's output is overwritten by the next replay

    def _decoding_rows(self, tokens, cache, positions, mask):
        """The step's rows if it is a paged step of decoding sequences only that a bucket can hold."""
        rows = getattr(cache, "rows", None)
        if (rows is None or getattr(cache, "graph_inputs", None) is None or not graph.enabled() or mask is not None
                or torch.is_grad_enabled() or tokens.dim() != 2 or tokens.shape[0] != 1
                or tokens.shape[1] != len(rows) or bucket_of(len(rows)) is None or positions is None
                or not cache.pool.attend_in_blocks or not self._hook_free()):
            return None
        if any(end - begin != 1 for _, begin, end in rows):
            return None
        if self.model.rope.cos.shape[0] < self.model.config.max_seq_len or self.model.rope.cos.device != tokens.device:
            # tables for every position, built now: a graph reads them at a fixed address
            self.model.rope(torch.zeros(1, dtype=torch.long, device=tokens.device), self.model.config.max_seq_len)
            self._restamp()
        return rows

    def _bucket(self, pool, rows: int, width: int, last_only: bool) -> _Bucket:
        key = (id(pool.k), rows, width, last_only)
        bucket = self.buckets.get(key)
        if bucket is None or bucket.pool_ref() is not pool.k:
            for stale in [k for k, b in self.buckets.items() if b.pool_ref() is None]:  # engines gone
                del self.buckets[stale]
            bucket = self.buckets[key] = _Bucket(pool, rows, width)
        return bucket

    def _capture(self, bucket: _Bucket, pool, last_only: bool):
        """Warm up on a side stream, then capture the padded step (torch.cuda.graph); False where
        it cannot be captured (the bucket then runs eagerly)."""
        device = bucket.tokens.device
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    bucket.forward(self.eager, pool, last_only)
            torch.cuda.current_stream(device).wait_stream(side)
            captured = torch.cuda.CUDAGraph()
            # thread_local: other threads (a server's, making a request's samplers) may use CUDA meanwhile
            with torch.cuda.graph(captured, capture_error_mode="thread_local"):
                bucket.forward(self.eager, pool, last_only)
        except Exception as error:  # an operator that cannot be captured: this shape stays eager
            import warnings

            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {type(error).__name__}: {error}"[:300])
            return False
        self.captures += 1
        return captured

    def _restamp(self) -> None:
        super()._restamp()
        self.buckets.clear()


def install(model) -> object:
    """Decode the engine's steps through CUDA graphs on `model` (in place): `model.forward = CudaGraphs(model)`."""
    model.forward = CudaGraphs(model)
    return model


# ------------------------------------------------------------ sampling on the device
def pick_rows(samplers: list, logits: torch.Tensor) -> list[int | None]:
    """One token per row of logits [B, V] from each row's `llama3.sampling.Sampler` (None: a finished
    row, skipped), the same tokens as `Sampler.pick` row by row, with one device->host read for the
    step.  Rows with a logits processor (a grammar) or logprobs to record take `Sampler.pick`."""
    out: list[int | None] = [None] * len(samplers)
    live = [i for i, s in enumerate(samplers) if s is not None]
    if not live:
        return out
    if all(samplers[i].plain_greedy for i in live):
        for i, token in zip(live, logits[live].argmax(dim=-1).tolist()):
            out[i] = token
        return out
    batched = []
    for i in live:
        s = samplers[i]
        if s.processor is not None or s.logprobs is not None:
            out[i] = s.pick(logits[i])
        else:
            batched.append(i)
    if not batched:
        return out
    raw = logits[batched].float()                                                    # [R, V]
    for j, i in enumerate(batched):
        s = samplers[i]
        if s.bias is not None or s.seen is not None or s.counts is not None:
            raw[j] = s.adjust(raw[j])
    chosen = torch.empty(len(batched), dtype=torch.long, device=logits.device)      # [R]
    groups: dict[tuple, list[int]] = {}
    for j, i in enumerate(batched):
        s = samplers[i]
        groups.setdefault((s.temperature, s.top_k, s.top_p, s.min_p), []).append(j)
    for (temperature, top_k, top_p, min_p), members in groups.items():
        index = torch.tensor(members, device=logits.device)
        if temperature == 0:
            chosen[index] = raw[index].argmax(dim=-1)
            continue
        filtered = apply_min_p(apply_top_p(apply_top_k(raw[index] / temperature, top_k), top_p), min_p)
        probs = filtered.softmax(dim=-1)                                             # [G, V]
        # each row's race from its own generator, drawn as sampling.draw draws it
        race = torch.stack([torch.empty(probs.shape[-1], dtype=probs.dtype, device=probs.device).exponential_(
            1.0, generator=samplers[batched[j]].generator) for j in members])
        chosen[index] = (probs / race).argmax(dim=-1)
    for j, token in enumerate(chosen.tolist()):
        samplers[batched[j]].accept(token)
        out[batched[j]] = token
    return out
