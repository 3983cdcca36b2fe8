"""The route records a reader has counted, for de-duplication at scale.

SeenRoutes proves batches free of repeats without a sort and without keeping keys:
while every (request, sample, layer) group's positions only grow from batch to batch,
as in every log one writer makes (computed rows in step order, cached replays before a
request's first computed row, recomputed rows never logged), a row above its group's
highest position so far is new, and a count of each row's (group, position) cell in the
batch finds any repeat inside it: 8 bytes per group. The first batch that fails that
proof raises OutOfOrder, and the reader reads the log again with the exact set
(SeenKeys) of every key from the start: memory then grows with the log, for logs that
are not one writer's order (repeats, merged or shuffled files).

SeenKeys: a key is a row's group in the high 32 bits and its position in the low 32,
exact. Most keys of a log are new, so the set answers "new" cheaply first: a bitmap
indexed by BITS bits of the key, mixed (32 MiB), has no bit set for a key never added.
Only keys whose bit is set (an earlier key shared those bits, or the key itself came
before) are looked up exactly, in sorted runs of the keys added so far. A run is merged
with the one before it while that one is at most twice its size, so about
log2(keys / chunk) runs stay apart. Memory: the bitmap plus 8 bytes per key (16 while
the two largest runs merge).
"""

import numpy as np

BITS = 28
MIX = np.uint64(0x9E3779B97F4A7C15)  # spreads dense keys over the bitmap
SPAN = 8  # a chunk whose groups span more positions than SPAN x its rows is checked exactly


class Streams:
    """Dense ids of (req_id, sample), for SeenRoutes' groups."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, int], int] = {}

    def of(self, names: list[str], row_req: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Each row's id: a dict lookup per distinct pair of the chunk (row_req indexes names)."""
        width = int(sample.max()) + 1 if len(sample) else 1
        pair = row_req.astype(np.int64) * width + sample
        table = np.zeros(len(names) * width, np.int64)
        for p in np.flatnonzero(np.bincount(pair, minlength=len(table))).tolist():
            table[p] = self.ids.setdefault((names[p // width], p % width), len(self.ids))
        return table[pair]


class OutOfOrder(Exception):
    """A batch the watermark cannot prove new: read again with the exact set."""


class SeenRoutes:
    """Which rows of each batch are new: the watermark proof, or with ``exact`` the set
    of every key."""

    def __init__(self, exact: bool = False) -> None:
        self.top = np.zeros(0, np.int64)  # [groups] highest position seen; -1: none
        self.exact = SeenKeys() if exact else None

    def add_new(self, group: np.ndarray, position: np.ndarray) -> np.ndarray:
        """True for the rows not seen before (nor earlier in this batch): ``group`` [n] a
        dense id of (request, sample, layer), ``position`` [n] its token_idx."""
        if self.exact is None:
            if self._all_new(group, position.astype(np.int64, copy=False)):
                return np.ones(len(group), bool)
            raise OutOfOrder
        keys = (group.astype(np.uint64) << np.uint64(32)) | (position.astype(np.int64) & 0xFFFFFFFF).astype(np.uint64)
        return self.exact.add_new(keys)

    def _all_new(self, group: np.ndarray, position: np.ndarray) -> bool:
        if not len(group):
            return True
        if group.max() >= len(self.top):
            self.top = np.concatenate([self.top, np.full(int(group.max()) + 1 - len(self.top), -1, np.int64)])
        floor = self.top[group]
        if (position <= floor).any():
            return False
        top = self.top.copy()
        np.maximum.at(top, group, position)
        touched = np.flatnonzero(top != self.top)
        spans = top[touched] - self.top[touched]  # positions above the old top, per group
        if spans.sum() > SPAN * len(group):
            return False
        offset = np.zeros(len(top), np.int64)
        offset[touched] = np.cumsum(spans) - spans
        if np.bincount(offset[group] + position - floor - 1).max() > 1:
            return False  # a position twice in this chunk
        self.top = top
        return True


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
        slot = _slots(keys)
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
        slot = _slots(ordered)
        np.bitwise_or.at(self.bitmap, slot >> 3, np.left_shift(np.uint8(1), (slot & 7).astype(np.uint8)))
        self._push(ordered)

    def _push(self, run: np.ndarray) -> None:
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            merged = np.concatenate([self.runs.pop(), self.runs.pop()])
            merged.sort(kind="stable")
            self.runs.append(merged)


def _slots(keys: np.ndarray) -> np.ndarray:
    return ((keys * MIX) >> np.uint64(64 - BITS)).astype(np.int64)
