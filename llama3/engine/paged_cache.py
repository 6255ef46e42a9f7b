"""The paged KV cache: every sequence's keys and values in one pool of fixed-size blocks.

    k, v: [n_layers, n_blocks * block_size, Hkv, Dh]    slot = block * block_size + offset

A sequence owns a list of blocks (its block table); position p of it sits in slot
table[p // block_size] * block_size + p % block_size.  The pool is allocated once, with
`torch.empty`, so on the CPU its pages cost memory only once tokens are written into them.

One engine step runs ONE forward of the readable model over every running sequence's new
tokens laid side by side (`tokens [1, N]`, each with its own position).  The model calls
`StepCache.update(layer_id, start_pos, k, v)` in each layer, as it does with `KVCache`:
the N new keys/values are written to their slots, and the keys/values of every sequence
in the step are read back side by side, [1, Hkv, S, Dh] with S the sum of their lengths.
The step's mask [1, 1, N, S] lets a new token see only the keys of its own sequence at
positions up to its own, so sequences never see each other.  Only slots that hold written
keys are read (never an uninitialised one, which could be NaN).
"""

from __future__ import annotations

import torch

from llama3.config import ModelConfig


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV memory of one token position: keys and values of every layer."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()


class PagedKVCache:
    """The block pool's tensors.  `step(...)` makes the cache object of one forward."""

    def __init__(self, config: ModelConfig, n_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        shape = (config.n_layers, n_blocks * block_size, config.n_kv_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size, self.n_blocks = block_size, n_blocks
        self.device = self.k.device

    def slots(self, table: list[int], begin: int, end: int) -> list[int]:
        """The slots of positions begin..end-1 of a sequence with block table `table`."""
        size = self.block_size
        return [table[p // size] * size + p % size for p in range(begin, end)]

    def step(self, rows: list[tuple[list[int], int, int]]) -> "StepCache":
        """The cache of one forward.  rows: per sequence (block table, first new position, end),
        in the order their new tokens are laid side by side; positions 0..end-1 are read."""
        write, read, query_row, query_pos, key_row, key_pos = [], [], [], [], [], []
        for row, (table, begin, end) in enumerate(rows):
            write += self.slots(table, begin, end)
            read += self.slots(table, 0, end)
            query_row += [row] * (end - begin)
            query_pos += range(begin, end)
            key_row += [row] * end
            key_pos += range(end)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        query_pos_t = as_tensor(query_pos)
        mask = ((as_tensor(query_row)[:, None] == as_tensor(key_row)[None, :])
                & (as_tensor(key_pos)[None, :] <= query_pos_t[:, None]))      # [N, S]
        return StepCache(self, as_tensor(write), as_tensor(read), query_pos_t[None, :], mask[None, None])


class StepCache:
    """What one forward sees: `positions` [1, N] and `mask` [1, 1, N, S] to pass to the model,
    and `update` for the model to call in each layer."""

    def __init__(self, pool: PagedKVCache, write: torch.Tensor, read: torch.Tensor,
                 positions: torch.Tensor, mask: torch.Tensor):
        self.pool, self.write, self.read = pool, write, read
        self.positions, self.mask = positions, mask

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [1, Hkv, N, Dh] (start_pos is unused: every token has its own slot);
        return the keys and values of the step's sequences, [1, Hkv, S, Dh]."""
        keys, values = self.pool.k[layer], self.pool.v[layer]                  # [slots, Hkv, Dh]
        keys.index_copy_(0, self.write, k[0].transpose(0, 1).to(keys.dtype))
        values.index_copy_(0, self.write, v[0].transpose(0, 1).to(values.dtype))
        return (keys.index_select(0, self.read).transpose(0, 1)[None],          # [1, Hkv, S, Dh]
                values.index_select(0, self.read).transpose(0, 1)[None])
