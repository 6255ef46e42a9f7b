"""The paged KV cache: every sequence's keys and values in one pool of fixed-size blocks.

    k, v: [n_layers, n_blocks, Hkv, block_size, Dh]    (indexed so; stored [n_layers, Hkv, n_blocks, block_size, Dh])

A sequence owns a list of blocks (its block table); position p of it sits in block
table[p // block_size] at offset p % block_size (its "slot" is block * block_size + offset).
In memory each key/value head has its own run of every block, one after the other (head-major,
as in KVCache): a head's block_size positions of block b are followed by its positions of block
b + 1.  So a sequence whose blocks were handed out in order (the pool hands out free blocks in
order) has each head's keys in one stream, read as a KVCache's are; with each block holding all
heads side by side instead, a head read 4 KB and skipped the others' 8 KB, and the attention of a
step at 1,000 positions took 1.2-1.4x the contiguous cache's (benchmarks/attention_kernel.py).
`k`, `v` are views in block-first order, so indexing them reads the same as if they were stored
so.  The pool is allocated once, with `torch.empty`, so on the CPU its pages cost memory only once
tokens are written into them.

One engine step runs ONE forward of the readable model over every running sequence's new
tokens laid side by side (`tokens [1, N]`, each with its own position).  In each layer the
model's `Attention.forward` calls `StepCache.attend(layer_id, start_pos, q, k, v, mask)`
(tokens first: q [1, N, H, Dh], k, v [1, N, Hkv, Dh]): the N new keys/values are written to their slots and each new token attends over the keys
of its own sequence at positions up to its own, read from the blocks where they lie:

    C++   `torch.ops.llama3.paged_attend` (llama3/fast/paged_attention.cpp): every decoding
          sequence of the step in one call, through each sequence's block table, grouped-query
          heads sharing their key/value head without copies;
    else  `paged_attention_torch`: per sequence, its keys gathered from its blocks and
          model.py's own `fused_attention` (prompt chunks; the CUDA path; where the C++ does
          not build).

A model whose attention runs the explicit path (`Attention.fused = False`: inspection hooks)
calls `update` instead: the keys/values of every sequence side by side [1, Hkv, S, Dh]
with `mask` [1, 1, N, S] keeping sequences apart (built only then).
"""

from __future__ import annotations

import torch

from llama3.config import ModelConfig
from llama3.model import fused_attention

# A sequence with more new tokens than this in a step (a prompt chunk) attends through PyTorch's
# SDPA over its gathered blocks: its blocked kernel beats one dot product per (query, key) on many
# queries (measured: 25 new tokens over 1,500 cached ones took seconds through the C++ loop).
KERNEL_MAX_QUERIES = 4
# Block tables of a recorded decoding step are padded to at least this many blocks (2,048 tokens of
# 16): a request that crosses the width records its step again (4 eager steps and a ~250 ms trace,
# once per width); at 64 a 1,000-token prompt did so 24 tokens into its answer (SmolLM2 int4: 67.5
# tok/s that request, 78-80 the next ones).  The padding costs a longer table tensor a step, nothing
# in the kernel (it reads a row's blocks only up to its position).
TABLE_WIDTH = 128


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV memory of one token position: keys and values of every layer."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()


def paged_kernel(device: torch.device, dtype: torch.dtype):
    """`torch.ops.llama3` where its paged_attend can read this cache (CPU, float32/bfloat16, built); else None."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    from llama3.fast import kernels

    namespace = kernels.library()
    return namespace if namespace is not None and hasattr(namespace, "paged_attend") else None


class PagedKVCache:
    """The block pool's tensors.  `step(...)` makes the cache object of one forward.
    use_kernel: False forces the PyTorch path (tests compare the two).  `attend_in_blocks =
    False` makes every layer read the keys side by side through `update` (the way before
    paged_attend; benchmarks/engine_lone_client.py compares the two)."""

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str | None = None, use_kernel: bool = True):
        stored = (config.n_layers, config.n_kv_heads, n_blocks, block_size, config.head_dim)
        # on a GPU zeros: a CUDA graph's padded step (llama3/fast/cuda_decode.py) reads whole blocks, and a
        # slot never written must hold a finite number (its attention weight is 0, but 0 x NaN is NaN)
        alloc = torch.empty if torch.device(device or "cpu").type == "cpu" else torch.zeros
        self.k = alloc(stored, dtype=dtype, device=device).transpose(1, 2)   # [n_layers, n_blocks, Hkv, bs, Dh]
        self.v = alloc(stored, dtype=dtype, device=device).transpose(1, 2)
        self.block_size, self.n_blocks = block_size, n_blocks
        self.device = self.k.device
        self.kernel = paged_kernel(self.device, dtype) if use_kernel else None
        self.attend_in_blocks = True
        # each layer's blocks, views [n_blocks, Hkv, block_size, Dh]: a recorded step takes them as
        # inputs one by one, so it replays no per-layer indexing (60 selects a SmolLM2 step)
        self.layers = [(self.k[i], self.v[i]) for i in range(config.n_layers)]

    def slots(self, table: list[int], begin: int, end: int) -> list[int]:
        """The slots of positions begin..end-1 of a sequence with block table `table`."""
        size = self.block_size
        return [table[p // size] * size + p % size for p in range(begin, end)]

    def copy_positions(self, source: int, target: int, count: int) -> None:
        """Copy the first `count` positions of block `source` into block `target` (every layer)."""
        self.k[:, target, :, :count] = self.k[:, source, :, :count]
        self.v[:, target, :, :count] = self.v[:, source, :, :count]

    def step(self, rows: list[tuple[list[int], int, int]]) -> "StepCache":
        """The cache of one forward.  rows: per sequence (block table, first new position, end),
        in the order their new tokens are laid side by side; positions 0..end-1 are read."""
        return StepCache(self, rows)


def gathered_blocks(table: list[int], end: int, block_size: int, device) -> torch.Tensor:
    """The blocks holding positions 0..end-1 of a sequence, as an index tensor."""
    return torch.tensor(table[:-(-end // block_size)], dtype=torch.long, device=device)


def paged_attention_torch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          rows: list[tuple[list[int], int, int]], block_size: int,
                          out: torch.Tensor | None = None, firsts: list[int] | None = None,
                          blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """What paged_attend computes, in PyTorch: q [N, H, Dh] (the rows' new tokens side by side);
    keys, values [n_blocks, Hkv, block_size, Dh] (one layer of the pool) -> [N, H, Dh].  Each row's keys are
    gathered from its blocks and attended by model.py's `fused_attention`, its new tokens being
    the last of its positions (causal within the row).  firsts: where each row's tokens start
    in q (default: one after the other); out: written in place; blocks: the rows' block indices."""
    out = torch.empty_like(q) if out is None else out
    first = 0
    for index, (table, begin, end) in enumerate(rows):
        first = firsts[index] if firsts is not None else first
        new = end - begin
        held = blocks[index] if blocks is not None else gathered_blocks(table, end, block_size, keys.device)
        k = keys[held].transpose(0, 1).flatten(1, 2)[:, :end]                    # [Hkv, S, Dh]
        v = values[held].transpose(0, 1).flatten(1, 2)[:, :end]
        heads = fused_attention(q[first:first + new].transpose(0, 1)[None],       # [1, H, T, Dh]
                                k[None].to(q.dtype), v[None].to(q.dtype), None)
        out[first:first + new] = heads[0].transpose(0, 1)                         # [T, H, Dh]
        first += new
    return out


class StepCache:
    """What one forward sees: `positions` [1, N] to pass to the model, `attend` (and `update`,
    `mask` for the explicit attention path) for the model to call in each layer.

    Which rows take which path: a row with at most KERNEL_MAX_QUERIES new tokens (decoding) goes
    to the C++ kernel, all such rows in one call; a prompt chunk goes to SDPA over its gathered
    blocks (blocked matrix products beat one dot product per query and key on many queries)."""

    def __init__(self, pool: PagedKVCache, rows: list[tuple[list[int], int, int]]):
        self.pool, self.rows = pool, rows
        device, size = pool.device, pool.block_size
        write, query_row, query_pos = [], [], []
        for row, (table, begin, end) in enumerate(rows):
            write += pool.slots(table, begin, end)
            query_row += [row] * (end - begin)
            query_pos += range(begin, end)
        self.n_tokens = len(write)
        # [N] each: the slots' blocks and offsets, split here (two small tensors, no ATen ops)
        self.write_block = torch.tensor([slot // size for slot in write], dtype=torch.long, device=device)
        self.write_offset = torch.tensor([slot % size for slot in write], dtype=torch.long, device=device)
        self.query_pos = torch.tensor(query_pos, dtype=torch.long, device=device)       # [N]
        self.positions = self.query_pos[None, :]                                        # [1, N]
        self._query_row, self._mask, self._read = query_row, None, None
        # split the rows between the kernel and SDPA; firsts: where each row's tokens start
        firsts = [0]
        for _, begin, end in rows:
            firsts.append(firsts[-1] + end - begin)
        short = [pool.kernel is not None and end - begin <= KERNEL_MAX_QUERIES for _, begin, end in rows]
        self.kernel_rows = [i for i, yes in enumerate(short) if yes]
        self.sdpa_rows = [rows[i] for i, yes in enumerate(short) if not yes]
        self.sdpa_firsts = [firsts[i] for i, yes in enumerate(short) if not yes]
        self.sdpa_blocks = None      # their block indices, made on the first attend (a step replayed on a
                                     # GPU never reads them: one host->device copy a row saved)
        self.kernel_tokens = None                    # all tokens go to the kernel (or none do)
        if self.kernel_rows:
            kernel = [rows[i] for i in self.kernel_rows]
            width = max(-(-end // size) for _, _, end in kernel)
            self._table_lists = [table[:width] for table, _, _ in kernel]              # graph_inputs pads these too
            self.tables = self._padded_tables(width)                                   # [R', M]
            self.kernel_row = torch.tensor([j for j, (_, b, e) in enumerate(kernel) for _ in range(b, e)],
                                           dtype=torch.long)                           # [N']
            if self.sdpa_rows:
                tokens = [t for i in self.kernel_rows for t in range(firsts[i], firsts[i + 1])]
                self.kernel_tokens = torch.tensor(tokens, dtype=torch.long)             # [N']
                self.kernel_pos = self.query_pos[self.kernel_tokens]
            else:
                self.kernel_pos = self.query_pos

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [1, N, Hkv, Dh] into their slots; -> the layer's pool twice, [n_blocks, Hkv, block_size, Dh]."""
        keys, values = self.pool.layers[layer]
        keys[self.write_block, :, self.write_offset] = k[0].to(keys.dtype)                    # [N, Hkv, Dh]
        values[self.write_block, :, self.write_offset] = v[0].to(values.dtype)
        return keys, values

    def attend(self, layer: int, start_pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
        """Store k, v [1, N, Hkv, Dh] and attend q [1, N, H, Dh] over each token's own sequence,
        in the blocks (start_pos and mask are unused: every token has its own row and position)
        -> [1, N, H, Dh]; None when the pool's attend_in_blocks is off (the model then calls update)."""
        if not self.pool.attend_in_blocks:
            return None
        keys, values = self._store(layer, k, v)
        queries = q[0]                                                                  # [N, H, Dh]
        if not self.sdpa_rows:                                                          # decoding only
            out = self._kernel(queries, keys, values)
        else:
            if self.sdpa_blocks is None:
                self.sdpa_blocks = [gathered_blocks(table, end, self.pool.block_size, self.pool.device)
                                    for table, _, end in self.sdpa_rows]
            out = paged_attention_torch(queries, keys, values, self.sdpa_rows, self.pool.block_size,
                                        out=torch.empty_like(queries), firsts=self.sdpa_firsts,
                                        blocks=self.sdpa_blocks)
            if self.kernel_rows:
                out[self.kernel_tokens] = self._kernel(queries[self.kernel_tokens], keys, values)
        return out[None]                                                                # [1, N, H, Dh]

    def _padded_tables(self, width: int) -> torch.Tensor:
        """The kernel rows' block tables, each padded with block 0 to `width` -> [R', width] (CPU)."""
        return torch.tensor([table + [0] * (width - len(table)) for table in self._table_lists], dtype=torch.long)

    def graph_inputs(self) -> tuple[torch.Tensor, ...] | None:
        """This step as tensors only, for a recorded decoding step (llama3/fast/graph.py replays the
        model's forward with these as inputs): (write_block, write_offset, tables, kernel_row,
        kernel_pos, keys 0, values 0, keys 1, ...), each layer's pool a view of its own.  The tables
        are padded to TABLE_WIDTH blocks or the next power of two (the kernel reads a row's blocks
        only up to its position), so one record serves every length up to 2,048 tokens, and a longer
        one records again only at 4,096, 8,192, ... tokens.  None unless every token is a decoding
        row attended by the C++ kernel."""
        if self.sdpa_rows or not self.kernel_rows or not self.pool.attend_in_blocks:
            return None
        width = max(TABLE_WIDTH, 1 << (self.tables.shape[1] - 1).bit_length())
        tables = self._padded_tables(width)                                            # [R, width]
        return (self.write_block, self.write_offset, tables, self.kernel_row, self.kernel_pos,
                *(t for pair in self.pool.layers for t in pair))

    def replayed(self, write_block, write_offset, tables, kernel_row, kernel_pos, *layers) -> "RecordedStep":
        """The cache a recorded step sees: the same `attend`, on `graph_inputs()`'s tensors only."""
        return RecordedStep(self.pool.kernel, self.pool.block_size, list(zip(layers[0::2], layers[1::2])),
                            write_block, write_offset, tables, kernel_row, kernel_pos)

    def _kernel(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.pool.kernel.paged_attend(queries, keys, values, self.tables, self.kernel_row,
                                             self.kernel_pos, self.pool.block_size)

    # ---------------------------------------------- the explicit path (Attention.fused = False)
    @property
    def mask(self) -> torch.Tensor:
        """[1, 1, N, S]: a new token sees the keys of its own sequence up to its own position."""
        if self._mask is None:
            device = self.pool.device
            key_row, key_pos, read = [], [], []
            for row, (table, _, end) in enumerate(self.rows):
                key_row += [row] * end
                key_pos += range(end)
                read += self.pool.slots(table, 0, end)
            as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
            read = as_tensor(read)
            self._read = (read // self.pool.block_size, read % self.pool.block_size)
            self._mask = ((as_tensor(self._query_row)[:, None] == as_tensor(key_row)[None, :])
                          & (as_tensor(key_pos)[None, :] <= self.query_pos[:, None]))[None, None]
        return self._mask

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [1, Hkv, N, Dh] (start_pos is unused: every token has its own slot);
        return the keys and values of the step's sequences side by side, [1, Hkv, S, Dh]."""
        keys, values = self._store(layer, k.transpose(1, 2), v.transpose(1, 2))
        self.mask  # noqa: B018  (builds the read slots)
        blocks, offsets = self._read
        return (keys[blocks, :, offsets].transpose(0, 1)[None],                        # [1, Hkv, S, Dh]
                values[blocks, :, offsets].transpose(0, 1)[None])


class RecordedStep:
    """`StepCache.attend` for decoding rows only, written on tensors alone (no Python lists), so that a
    trace of model.py's forward over it (llama3/fast/graph.py) holds every step of that shape:
    layers: each layer's (keys, values) [n_blocks, Hkv, block_size, Dh]; write_block, write_offset,
    kernel_row, kernel_pos [N]; tables [R, M]."""

    def __init__(self, kernel, block_size: int, layers, write_block, write_offset, tables, kernel_row, kernel_pos):
        self.kernel, self.block_size, self.layers = kernel, block_size, layers
        self.write_block, self.write_offset = write_block, write_offset
        self.tables, self.kernel_row, self.kernel_pos = tables, kernel_row, kernel_pos

    def attend(self, layer: int, start_pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None):
        """q [1, N, H, Dh]; k, v [1, N, Hkv, Dh] -> [1, N, H, Dh] (StepCache.attend's)."""
        keys, values = self.layers[layer]                                               # [n_blocks, Hkv, bs, Dh]
        # k, v written at their slots by the kernel itself, q taken tokens first as model.py hands it:
        # one operator call, where indexing them in and turning heads first and back cost ~13 a block
        return self.kernel.paged_store_attend(q, keys, values, k, v, self.write_block, self.write_offset,
                                              self.tables, self.kernel_row, self.kernel_pos, self.block_size)
