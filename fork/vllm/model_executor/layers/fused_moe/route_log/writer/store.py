# SPDX-License-Identifier: Apache-2.0
"""Routing by KV-cache block, kept by the writer process so that positions served
from the prefix cache still get their route records.

Keyed by physical block id, as the KV cache itself: a block that the prefix cache
hands to a new request holds the keys and values its first owner computed, and this
store holds the routing that owner's forward computed for the same positions. A
block is rewritten only by a forward that computes it anew (a later owner), which is
when its KV is rewritten too. Every computed row is stored, recomputed ones included
(a block freed by a preemption may be recomputed into another block).

Memory: (2 + 4) * top_k bytes per position and logged layer (int16 ids, float32
weights), for every block id the engine has used: at most the KV cache's blocks.
Numpy only: the writer loads this without vLLM or torch.
"""

import numpy as np

UNKNOWN = -1  # an id never written: the position's routing is not known here


class BlockRoutes:
    def __init__(self, block_size: int, num_layers: int, top_k: int):
        self.block_size = block_size
        self.shape = (num_layers, top_k)
        self.ids = np.full((block_size * 64, *self.shape), UNKNOWN, np.int16)  # [block id * size + offset, L, k]
        self.weights = np.zeros((block_size * 64, *self.shape), np.float32)
        self.tables = np.full((64, 64), -1, np.int64)  # [slot, block index] -> block id

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.weights.nbytes + self.tables.nbytes

    def set_blocks(self, slot: int, first: int, block_ids: np.ndarray) -> None:
        """The slot's blocks from block index ``first`` on (0: a new table)."""
        end = first + len(block_ids)
        rows, cols = self.tables.shape
        if slot >= rows or end > cols:
            grown = np.full((max(rows, 2 * slot + 1), max(cols, 2 * end)), -1, np.int64)
            grown[:rows, :cols] = self.tables
            self.tables = grown
        if first == 0:
            self.tables[slot] = -1
        self.tables[slot, first:end] = block_ids

    def put(self, slots: np.ndarray, positions: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        """Rows computed by a forward: slots, positions [n]; ids, weights [n, L, k]."""
        index = self._index(slots, positions)
        known = index >= 0
        if not known.all():
            index, ids, weights = index[known], ids[known], weights[known]
        if index.size and index.max() >= len(self.ids):
            self._grow(int(index.max()) + 1)
        self.ids[index] = ids
        self.weights[index] = weights

    def get(self, slot: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids int32, weights float32 [stop - start, L, k] of one request's positions,
        and which of them are known (computed by a forward this writer saw)."""
        positions = np.arange(start, stop, dtype=np.int64)
        index = self._index(np.full(len(positions), slot), positions)
        inside = (index >= 0) & (index < len(self.ids))
        safe = np.where(inside, index, 0)
        ids = self.ids[safe]
        known = inside & (ids[:, 0, 0] != UNKNOWN)
        return ids.astype(np.int32), self.weights[safe], known

    def _index(self, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        block = positions // self.block_size
        rows, cols = self.tables.shape
        ok = (slots < rows) & (block < cols)
        ids = np.where(ok, self.tables[np.minimum(slots, rows - 1), np.minimum(block, cols - 1)], -1)
        return np.where(ids >= 0, ids * self.block_size + positions % self.block_size, -1)

    def _grow(self, need: int) -> None:
        # By a quarter: at most 25% unused, where doubling left up to half the store idle.
        size = max(need, len(self.ids) * 5 // 4)
        ids = np.full((size, *self.shape), UNKNOWN, np.int16)
        ids[: len(self.ids)] = self.ids
        weights = np.zeros((size, *self.shape), np.float32)
        weights[: len(self.weights)] = self.weights
        self.ids, self.weights = ids, weights
