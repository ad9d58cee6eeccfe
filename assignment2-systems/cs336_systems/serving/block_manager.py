"""The paged KV cache's bookkeeping: fixed-size blocks handed out from a free list, one block table per
sequence, reference counts so that samples of one prompt share its blocks until one of them writes
(copy-on-write). No tensors live here; the model runner owns the pool these indices point into."""

from dataclasses import dataclass, field

import numpy as np

SCRATCH_BLOCK = 0  # never handed out: padded rows of a batch write here and read it, harmlessly


class OutOfBlocks(RuntimeError):
    """No free block: the scheduler must preempt someone first."""


class BlockAllocator:
    """Blocks 1..num_blocks-1 with reference counts; a block returns to the free list when its count hits 0."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free_blocks = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    def allocate(self) -> int:
        if not self.free_blocks:
            raise OutOfBlocks("no free KV block")
        block = self.free_blocks.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise RuntimeError(f"block {block} released more often than it was taken")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free_blocks.append(block)


@dataclass
class CopyOnWrite:
    """Copy block `src` into `dst` before the step writes into `dst` (the model runner does the copy)."""

    src: int
    dst: int


@dataclass
class BlockManager:
    num_blocks: int
    block_size: int
    tables: dict[int, list[int]] = field(default_factory=dict)
    high_water: int = 0

    def __post_init__(self):
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        self.allocator = BlockAllocator(self.num_blocks)

    # -- sizes ---------------------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    @property
    def num_used(self) -> int:
        return self.allocator.capacity - self.allocator.num_free

    def _note_usage(self) -> None:
        self.high_water = max(self.high_water, self.num_used)

    # -- per sequence --------------------------------------------------------------------------------------
    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_for(num_tokens) <= self.num_free - reserve

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for a prompt of `num_tokens` (all or nothing)."""
        if seq_id in self.tables:
            raise RuntimeError(f"sequence {seq_id} already holds blocks")
        needed = self.blocks_for(num_tokens)
        if needed > self.num_free:
            raise OutOfBlocks(f"{needed} blocks needed, {self.num_free} free")
        self.tables[seq_id] = [self.allocator.allocate() for _ in range(needed)]
        self._note_usage()
        return self.tables[seq_id]

    def needs_new_block(self, seq_id: int, num_tokens: int) -> bool:
        """Whether holding `num_tokens` tokens takes a block this sequence does not own alone yet."""
        table = self.tables[seq_id]
        if self.blocks_for(num_tokens) > len(table):
            return True
        return self.allocator.refcount[table[(num_tokens - 1) // self.block_size]] > 1

    def append_slot(self, seq_id: int, num_tokens: int) -> tuple[int, CopyOnWrite | None]:
        """Makes room for token number `num_tokens` (1-based) of the sequence and returns its slot; a shared
        last block is copied first, so other samples keep their view of it."""
        table = self.tables[seq_id]
        index = (num_tokens - 1) // self.block_size
        copy = None
        if index == len(table):
            table.append(self.allocator.allocate())
        elif index > len(table):
            raise RuntimeError(f"sequence {seq_id} skipped a block ({index} > {len(table)})")
        elif self.allocator.refcount[table[index]] > 1:
            fresh = self.allocator.allocate()
            copy = CopyOnWrite(src=table[index], dst=fresh)
            self.allocator.release(table[index])
            table[index] = fresh
        self._note_usage()
        return table[index] * self.block_size + (num_tokens - 1) % self.block_size, copy

    def slots_in_place(self, seq_id: int, num_tokens: int, count: int) -> list[int] | None:
        """The slots of tokens num_tokens .. num_tokens + count - 1 (1-based) when the blocks the sequence
        already owns alone hold them all (what `append_slot` would return for each, with nothing to allocate
        or copy); None when a block must be added or copied first."""
        table, size = self.tables[seq_id], self.block_size
        first, last = (num_tokens - 1) // size, (num_tokens + count - 2) // size
        if last >= len(table):
            return None
        refcount = self.allocator.refcount
        if any(refcount[table[index]] > 1 for index in range(first, last + 1)):
            return None
        if first == last:
            base = table[first] * size - first * size
            return list(range(base + num_tokens - 1, base + num_tokens - 1 + count))
        return [table[p // size] * size + p % size for p in range(num_tokens - 1, num_tokens - 1 + count)]

    def blocks_needed(self, seq_id: int, num_tokens: int, count: int) -> int:
        """How many blocks `append_slot` would take from the free list for tokens num_tokens .. num_tokens +
        count - 1 (1-based): one per block past the table's end and one per shared block to copy."""
        table, size = self.tables[seq_id], self.block_size
        first, last = (num_tokens - 1) // size, (num_tokens + count - 2) // size
        refcount = self.allocator.refcount
        shared = sum(1 for index in range(first, min(last + 1, len(table))) if refcount[table[index]] > 1)
        return max(0, last + 1 - len(table)) + shared

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (a sample of the same prompt)."""
        table = list(self.tables[parent_id])
        for block in table:
            if block != SCRATCH_BLOCK:
                self.allocator.share(block)
        self.tables[child_id] = table

    def free(self, seq_id: int) -> None:
        for block in self.tables.pop(seq_id, []):
            if block != SCRATCH_BLOCK:
                self.allocator.release(block)

    def release_before(self, seq_id: int, position: int) -> int:
        """Gives back the blocks that hold only positions before `position` (a sliding window has moved past
        them); their table entries point at the scratch block from then on. Returns how many were freed."""
        table = self.tables[seq_id]
        freed = 0
        for index in range(min(position // self.block_size, len(table))):
            if table[index] != SCRATCH_BLOCK:
                self.allocator.release(table[index])
                table[index] = SCRATCH_BLOCK
                freed += 1
        return freed

    def slots(self, seq_id: int, num_tokens: int) -> list[int]:
        """Slots of positions 0..num_tokens-1, vectorised (prefill asks for thousands at a time)."""
        positions = np.arange(num_tokens)
        table = np.asarray(self.tables[seq_id])
        return (table[positions // self.block_size] * self.block_size + positions % self.block_size).tolist()

    def slot(self, seq_id: int, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
