"""The set of route keys a reader has counted, for de-duplication at scale.

Keys are 64-bit hashes of (req_id, sample, token_idx, layer). Most keys of a log are new,
so the set answers "new" cheaply first: a bitmap indexed by a key's top BITS bits (32 MiB)
has no bit set for a key never added. Only keys whose bit is set (an earlier key shared
those bits, or the key itself came before) are looked up exactly, in sorted runs of the
keys added so far. A run is merged with the one before it while that one is at most twice
its size, so about log2(keys / chunk) runs stay apart. Memory: the bitmap plus 8 bytes per
key (16 while the two largest runs merge).
"""

import numpy as np

BITS = 28


class SeenKeys:
    def __init__(self) -> None:
        self.bitmap = np.zeros(1 << (BITS - 3), np.uint8)  # pages are touched as bits are set
        self.runs: list[np.ndarray] = []  # sorted uint64 keys, disjoint

    def __len__(self) -> int:
        return sum(map(len, self.runs))

    def add_new(self, keys: np.ndarray) -> np.ndarray:
        """True where ``keys`` (uint64) holds a key neither added before nor earlier in
        ``keys``; adds those keys. Keys repeated within ``keys`` are rare: they take a
        stable argsort, the common case one plain sort."""
        ordered = np.sort(keys)
        if len(keys) > 1 and (ordered[1:] == ordered[:-1]).any():
            return self._add_with_repeats(keys)
        fresh = ~self._known(keys)
        self._add(ordered if fresh.all() else np.sort(keys[fresh]))
        return fresh

    def _add_with_repeats(self, keys: np.ndarray) -> np.ndarray:
        order = np.argsort(keys, kind="stable")  # the first of equal keys stays first
        ordered = keys[order]
        new = np.ones(len(keys), bool)
        new[1:] = ordered[1:] != ordered[:-1]
        new[new] = ~self._known(ordered[new])
        self._add(ordered[new])
        fresh = np.empty(len(keys), bool)
        fresh[order] = new
        return fresh

    def _known(self, keys: np.ndarray) -> np.ndarray:
        """True for keys added before: the bitmap clears most, the runs the rest."""
        slot = (keys >> np.uint64(64 - BITS)).astype(np.int64)
        maybe = np.flatnonzero((self.bitmap[slot >> 3] >> (slot & 7).astype(np.uint8)) & 1)
        known = np.zeros(len(keys), bool)
        for run in self.runs:
            if not len(maybe):
                break
            at = np.minimum(np.searchsorted(run, keys[maybe]), len(run) - 1)
            found = run[at] == keys[maybe]
            known[maybe[found]] = True
            maybe = maybe[~found]
        return known

    def _add(self, ordered: np.ndarray) -> None:
        """Sorted keys not added before."""
        if not len(ordered):
            return
        slot = (ordered >> np.uint64(64 - BITS)).astype(np.int64)
        byte, bits = slot >> 3, np.left_shift(np.uint8(1), (slot & 7).astype(np.uint8))
        starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])  # sorted: one OR per byte
        self.bitmap[byte[starts]] |= np.bitwise_or.reduceat(bits, starts)
        self._push(ordered)

    def _push(self, run: np.ndarray) -> None:
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            merged = np.concatenate([self.runs.pop(), self.runs.pop()])
            merged.sort(kind="stable")
            self.runs.append(merged)
