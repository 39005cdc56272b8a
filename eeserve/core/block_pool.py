"""Free list of KV cache blocks."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out physical block ids 0..num_blocks-1 and takes them back.

    Raises:
        ValueError: on freeing a block that is not allocated (a double free).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks. Raises RuntimeError when fewer are free (check first)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for b in ids:
            if b not in self._used:
                raise ValueError(f"KV block {b} freed but not allocated")
            self._used.remove(b)
            self._free.append(b)

    def check_integrity(self) -> None:
        """Raises AssertionError unless free + used == total with no overlap."""
        assert len(self._free) + len(self._used) == self.num_blocks, "free + used != total"
        assert not (set(self._free) & self._used), "a block is both free and used"
