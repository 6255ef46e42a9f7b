"""Which KV blocks are free, held by sequences, or kept for the prefix cache.

The KV memory is cut into blocks of `block_size` token positions.  A block is
    free     in no one's hands and holding nothing worth keeping;
    held     by one or more sequences (`refs[block]` of them: a shared prompt prefix);
    cached   held by nobody but holding a full block of an earlier prompt, findable by the
             hash of its tokens and of everything before them, and reused by the next request
             that starts the same way.  Cached blocks are lent out least recently used first
             when no free block is left.
A block is only shared once it is full, and nobody writes into a full block, so
sharing needs no copying.  (The n choices of one prompt share its full blocks from the
moment it is prefilled; each gets its own copy of the prompt's last, partial block:
`Engine._fork`.)

Keys: `chain_key(parent, tokens)` hashes the block's tokens together with the key of
the block before it, so a block is found only after the same whole prefix; a key
names the exact tokens at exact positions, which is what the keys and values depend on.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class NoFreeBlock(Exception):
    """Every block is held by a running sequence (the scheduler preempts one and retries)."""


def chain_key(parent: bytes, tokens) -> bytes:
    """The prefix-cache key of a full block: a hash of the previous block's key and this block's ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Bookkeeping for `n_blocks` blocks (the tensors live in `PagedKVCache`)."""

    def __init__(self, n_blocks: int, block_size: int):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.refs = [0] * n_blocks
        self.free: deque[int] = deque(range(n_blocks))
        self.by_key: dict[bytes, int] = {}              # prefix-cache key -> block
        self.key_of: dict[int, bytes] = {}              # block -> its key (cached blocks only)
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, least recent first
        self.hits = self.hit_tokens = self.evictions = 0

    @property
    def available(self) -> int:
        """Blocks a new allocation can take: free ones, then idle cached ones."""
        return len(self.free) + len(self.idle)

    @property
    def held(self) -> int:
        return self.n_blocks - self.available

    def allocate(self) -> int:
        """A block for new tokens, held once; evicts the least recently used idle cached block if needed."""
        if self.free:
            block = self.free.popleft()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
            self.evictions += 1
        else:
            raise NoFreeBlock
        self.refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """One more holder of a held, full block (a sibling choice of the same prompt)."""
        assert self.refs[block] > 0, f"block {block} is shared but nobody holds it"
        self.refs[block] += 1
        return block

    def allocate_many(self, count: int) -> list[int]:
        """`count` blocks (a block table for a benchmark or a test)."""
        return [self.allocate() for _ in range(count)]

    def release(self, block: int) -> None:
        """One holder lets go; with none left the block becomes idle (if cached) or free."""
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} released more often than held"
        if self.refs[block] == 0:
            if block in self.key_of:
                self.idle[block] = None
            else:
                self.free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """The cached block with this key, now held once more; None if there is none."""
        block = self.by_key.get(key)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.idle[block]
        self.refs[block] += 1
        return block

    def register(self, block: int, key: bytes) -> None:
        """Offer a full, held block to the prefix cache (the first block with a key keeps it)."""
        if key not in self.by_key and block not in self.key_of:
            self.by_key[key] = block
            self.key_of[block] = key

    def stats(self) -> dict:
        return {"kv_blocks_total": self.n_blocks, "kv_blocks_used": self.held, "kv_blocks_free": self.available,
                "prefix_cache_blocks": len(self.key_of), "prefix_cache_hits": self.hits,
                "prefix_cache_hit_tokens": self.hit_tokens, "prefix_cache_evictions": self.evictions}
