"""Sole owner of the mapping request -> KV blocks (block tables)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from eeserve.core.block_pool import BlockPool


@dataclass(frozen=True)
class PendingKV:
    """A position whose K/V is missing from ``from_layer`` upward (deferred recompute).

    Attributes:
        position: token position in its sequence.
        from_layer: first (0-based) layer without real K/V; layers below it are filled.
        hidden: [H] residual hidden state entering layer ``from_layer``.
    """

    position: int
    from_layer: int
    hidden: torch.Tensor


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates and frees the blocks of each request.

    Args:
        num_blocks: blocks in the cache.
        block_size: token slots per block.
        on_free: called with the block ids a request gives back (the debug NaN fill uses it).
    """

    def __init__(self, num_blocks: int, block_size: int, on_free: Optional[Callable[[list[int]], None]] = None) -> None:
        self.block_size = block_size
        self._on_free = on_free
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._pending: dict[str, dict[int, PendingKV]] = {}
        self._scratch: list[list[int]] = []  # block lists lent outside any request

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks the request needs so that positions 0..num_tokens-1 have slots."""
        have = len(self._tables.get(request_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_blocks_needed(request_id, num_tokens))

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to cover ``num_tokens`` positions.

        Returns:
            False (and allocates nothing) when not enough blocks are free.
        """
        need = self.num_blocks_needed(request_id, num_tokens)
        if not self.pool.can_allocate(need):
            return False
        table = self._tables.setdefault(request_id, [])
        if need:
            table.extend(self.pool.allocate(need))
        return True

    def block_ids(self, request_id: str) -> tuple[int, ...]:
        """A copy of the request's block table (physical block ids in position order)."""
        return tuple(self._tables.get(request_id, ()))

    def allocate_scratch(self, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` positions of a pass outside any request (teacher forcing),
        to give back with ``free_scratch``; None (nothing allocated) when not enough are free."""
        need = cdiv(num_tokens, self.block_size)
        if not self.pool.can_allocate(need):
            return None
        blocks = self.pool.allocate(need)
        self._scratch.append(blocks)
        return list(blocks)

    def free_scratch(self, block_ids: list[int]) -> None:
        """Return blocks from ``allocate_scratch``.

        Raises:
            ValueError: ``block_ids`` is not a list that ``allocate_scratch`` lent.
        """
        for i, blocks in enumerate(self._scratch):
            if blocks == list(block_ids):
                del self._scratch[i]
                self.pool.free(blocks)
                if self._on_free is not None:
                    self._on_free(blocks)
                return
        raise ValueError(f"blocks {list(block_ids)} were not lent by allocate_scratch")

    def set_pending(self, request_id: str, pending: PendingKV) -> None:
        """Record (or update) a position whose KV is incomplete."""
        self._pending.setdefault(request_id, {})[pending.position] = pending

    def clear_pending(self, request_id: str, position: int) -> None:
        """The position's KV is now complete at every layer."""
        entries = self._pending.get(request_id)
        if entries is not None:
            entries.pop(position, None)
            if not entries:
                del self._pending[request_id]

    def pending(self, request_id: str) -> list[PendingKV]:
        """The request's pending positions, in position order."""
        return sorted(self._pending.get(request_id, {}).values(), key=lambda p: p.position)

    def snapshot_pending(self) -> dict[str, dict[int, PendingKV]]:
        """A copy of the pending-KV state, to undo a step that failed (``restore_pending``)."""
        return {rid: dict(entries) for rid, entries in self._pending.items()}

    def restore_pending(self, snapshot: dict[str, dict[int, PendingKV]]) -> None:
        """Put back the pending-KV state of ``snapshot_pending`` (the K/V slots a failed step wrote
        are written again when its positions are recomputed)."""
        self._pending = {rid: dict(entries) for rid, entries in snapshot.items()}

    @property
    def num_pending(self) -> int:
        return sum(len(v) for v in self._pending.values())

    def free(self, request_id: str) -> None:
        """Return all of the request's blocks to the pool and drop its pending KV (no-op if it
        holds none)."""
        self._pending.pop(request_id, None)
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(table)
            if self._on_free is not None:
                self._on_free(table)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        owned = [b for t in [*self._tables.values(), *self._scratch] for b in t]
        assert len(owned) == len(set(owned)), "a block is owned by two requests"
        assert len(owned) == self.pool.num_blocks - self.pool.num_free_blocks, "owned != used"
