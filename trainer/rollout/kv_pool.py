"""The embedded engine's paged KV pool: per-layer key/value blocks and their host-side reference counts.

Storage is one tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]`` in the engine
dtype; :meth:`KVPool.key_cache` and :meth:`KVPool.value_cache` are a layer's
``[num_blocks, block_size, kv_heads, head_dim]`` views, the layout of ``anytime_kernels``' paged
attention. A token's slot is ``block * block_size + offset``.

Every holder of a block (a decoding row, a stored sequence of the prefix cache, a request whose
samples are not all admitted yet) holds one reference, counted on the host by
:class:`BlockAllocator`; a block whose count drops to zero is free again. Sharing never touches
the device: a fork retains the full blocks of its prefix and copies only the partial last one
(copy-on-write), so a block that more than one holder reads is never written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (and cannot grow)."""


class BlockAllocator:
    """Reference counts of ``num_blocks`` blocks and the list of free ones (host only).

    Args:
        num_blocks: blocks in the pool.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self._counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: low ids first

    @property
    def num_blocks(self) -> int:
        return len(self._counts)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._counts[block]

    def allocate(self, count: int) -> list[int]:
        """``count`` free blocks, each with one reference."""
        if count > len(self._free):
            raise OutOfBlocks(f"asked for {count} blocks, {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._counts[block] = 1
        return blocks

    def retain(self, blocks: Sequence[int]) -> None:
        """One more reference to each of ``blocks`` (all in use)."""
        for block in blocks:
            if self._counts[block] < 1:
                raise ValueError(f"block {block} is free; only a block in use can be shared")
            self._counts[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of ``blocks``; those left with none are free."""
        for block in blocks:
            if self._counts[block] < 1:
                raise ValueError(f"block {block} is released more often than it was referenced")
            self._counts[block] -= 1
            if self._counts[block] == 0:
                self._free.append(block)

    def add_blocks(self, count: int) -> None:
        """Make room for ``count`` more blocks (the pool grew), all free."""
        first = len(self._counts)
        self._counts.extend([0] * count)
        self._free[:0] = range(first + count - 1, first - 1, -1)  # behind the older free blocks

    def reset(self) -> None:
        """Every block free (the pool's holders were all dropped)."""
        self._counts = [0] * len(self._counts)
        self._free = list(range(len(self._counts) - 1, -1, -1))


class KVPool:
    """Key/value blocks of every layer and their allocator.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention shape.
        block_size: tokens per block.
        num_blocks: blocks to start with.
        dtype, device: of the cache (the engine model's).
        growable: double the storage when the blocks run out (the CPU pool) instead of raising
            :class:`OutOfBlocks`; a CUDA pool keeps its addresses, which captured graphs hold.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str,
        growable: bool = False,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.growable = growable
        self.allocator = BlockAllocator(num_blocks)
        self.peak_used = 0  # most blocks in use at once since the last reset_peak()
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        # Zeros, not empty: a slot read before it is written must not be NaN (0 * NaN in attention).
        self.storage = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.storage[:, :, 0].numel() * self.storage.element_size()

    @property
    def used_blocks(self) -> int:
        return self.allocator.num_blocks - self.allocator.num_free

    def key_cache(self, layer: int) -> torch.Tensor:
        """``[num_blocks, block_size, kv_heads, head_dim]`` keys of ``layer``."""
        return self.storage[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        """``[num_blocks, block_size, kv_heads, head_dim]`` values of ``layer``."""
        return self.storage[layer, 1]

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """``count`` new blocks with one reference each; a growable pool grows when short."""
        if count > self.allocator.num_free and self.growable:
            self.grow(self.used_blocks + count)
        blocks = self.allocator.allocate(count)
        self.peak_used = max(self.peak_used, self.used_blocks)
        return blocks

    def reset_peak(self) -> None:
        self.peak_used = self.used_blocks

    def grow(self, min_blocks: int) -> None:
        """Storage for at least ``min_blocks`` blocks (doubling), the blocks in use kept in place."""
        old = self.num_blocks
        new = max(min_blocks, 2 * old)
        if new <= old:
            return
        shape = list(self.storage.shape)
        shape[2] = new
        storage = self.storage.new_zeros(shape)
        storage[:, :, :old] = self.storage
        self.storage = storage
        self.allocator.add_blocks(new - old)

    def fork(self, blocks: Sequence[int], length: int) -> tuple[list[int], tuple[int, int] | None]:
        """A new holder of the first ``length`` tokens of ``blocks``.

        Returns its block list (the full blocks shared, retained once more) and the copy to make
        ``(source, destination)`` when ``length`` ends inside a block: the holder writes after
        ``length``, so it gets its own block (run the copies with :meth:`copy_blocks`, before the
        source's holders release it).
        """
        full, partial = divmod(length, self.block_size)
        if self.blocks_for(length) > len(blocks):
            raise ValueError(f"{len(blocks)} blocks hold fewer than {length} tokens (block_size {self.block_size})")
        copy = self.allocate(1) if partial else []  # before any retain: a failure leaves nothing held
        shared = list(blocks[:full])
        self.allocator.retain(shared)
        return shared + copy, (blocks[full], copy[0]) if partial else None

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy every layer's keys and values of each ``(source, destination)`` block, in one op."""
        if not copies:
            return
        device = self.storage.device
        source = torch.tensor([s for s, _ in copies], dtype=torch.long).to(device, non_blocking=True)
        destination = torch.tensor([d for _, d in copies], dtype=torch.long).to(device, non_blocking=True)
        self.storage[:, :, destination] = self.storage[:, :, source]

    def reset(self) -> None:
        """Every block free (their contents stay until overwritten)."""
        self.allocator.reset()
