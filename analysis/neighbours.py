"""Routing across neighbouring records, counted as the reader streams the log: the
top-k sets of positions t and t+1 of the same request, sample and layer
(adjacent_overlap), and the top-1 experts of consecutively logged layers at the same
position (layer_affinity).

A batch's distinct records are paired among themselves, and with what each (stream,
layer) group held before the batch: its lowest and highest position (a prefix-cache
replay extends a request downwards) with their expert sets and the top-1 at the
highest. That is exact for the orders writers give; a record that lands inside a
group's range, or whose partner layer has already passed its position, could miss a
pair, and is counted in ``unordered``:
then analysis.sequence recomputes both metrics by joining the whole log in DuckDB.
Memory: ~60 bytes per (request, sample, layer), plus [layers, experts, experts] pair
counts.
"""

import math

import numpy as np

WORD = 64  # experts per mask word


class Neighbours:
    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.layers, self.experts, self.top_k = num_layers, num_experts, top_k
        self.words = max(1, -(-num_experts // WORD))
        self.low = np.zeros(0, np.int64)  # [groups] lowest position; -1: none yet
        self.high = np.zeros(0, np.int64)
        self.low_mask = np.zeros((0, self.words), np.uint64)  # its top-k set
        self.high_mask = np.zeros((0, self.words), np.uint64)
        self.high_top1 = np.zeros(0, np.int64)  # the top-1 expert at the highest position
        side = 2 * top_k + 1
        self.jaccard = np.zeros((num_layers, side, side), np.int64)  # [slot, |a & b|, |a | b|] pairs
        self.pairs = np.zeros((max(num_layers - 1, 0), num_experts, num_experts), np.int64)  # [from slot, x, y]
        self.unordered = 0
        self.pending: list[tuple] = []  # added, not yet paired
        self.carry: tuple | None = None  # the last request's rows, held by pair(hold_last=True)

    def add(self, stream: np.ndarray, slot: np.ndarray, position: np.ndarray, masks: np.ndarray,
            top1: np.ndarray) -> None:
        """Distinct records in log order, kept until ``pair``: dense (request, sample)
        ids, layer slots, token_idx [n]; expert_masks [n, words]; the top-1 expert [n]."""
        self.pending.append((stream, slot, position, masks, top1))

    def pair(self, hold_last: bool = False) -> None:
        """Pairs the records added since the last call with each other and with the
        groups' state. Call it where a position's layers can no longer be split: after
        each part of a parquet log (sorted by layer), or after each batch of a log in
        step order (engine JSONL) with ``hold_last``: the rows of the batch's last
        request then wait for the next call, where that request may go on (a step, or
        the prefix-cache replay after a request's first step, cut by the boundary)."""
        rows = ([self.carry] if self.carry is not None else []) + self.pending
        self.pending, self.carry = [], None
        if not rows:
            return
        rows = [r if r[3].shape[1] == self.words else  # masks made before grow_experts are narrower
                (*r[:3], np.pad(r[3], ((0, 0), (0, self.words - r[3].shape[1]))), r[4]) for r in rows]
        rows = rows[0] if len(rows) == 1 else tuple(np.concatenate(c) for c in zip(*rows))
        if hold_last and len(rows[0]):
            held = rows[0] == rows[0][-1]
            self.carry = tuple(column[held] for column in rows)
            rows = tuple(column[~held] for column in rows)
        self._add(*rows)

    def _add(self, stream, slot, position, masks, top1) -> None:
        if not len(slot):
            return
        stream, slot, position, top1 = (a.astype(np.int64, copy=False) for a in (stream, slot, position, top1))
        group = stream * self.layers + slot
        self._grow((int(stream.max()) + 1) * self.layers)  # every layer of each stream: partners too
        order, starts = _layer_major(stream, slot, position)
        self._affinity(stream, slot, position, top1, group, order, starts)  # against the state before this batch
        self._overlap(group, slot, position, masks, top1, order)

    def _overlap(self, group, slot, position, masks, top1, order) -> None:
        g, p = group[order], position[order]
        same = g[1:] == g[:-1]
        step = same & (p[1:] - p[:-1] == 1)
        self._count_jaccard(slot[order[:-1][step]], masks[order[:-1][step]], masks[order[1:][step]])
        first, last = order[np.r_[True, ~same]], order[np.r_[~same, True]]
        runs = group[first]
        lo, hi = self.low[runs], self.high[runs]
        known = hi >= 0
        up, down = known & (position[first] > hi), known & (position[last] < lo)
        self.unordered += int((known & ~up & ~down).sum())
        joins = up & (position[first] == hi + 1)
        self._count_jaccard(slot[first[joins]], self.high_mask[runs[joins]], masks[first[joins]])
        joins = down & (position[last] == lo - 1)
        self._count_jaccard(slot[last[joins]], masks[last[joins]], self.low_mask[runs[joins]])
        lower, higher = ~known | (position[first] < lo), ~known | (position[last] > hi)
        self.low[runs[lower]], self.low_mask[runs[lower]] = position[first[lower]], masks[first[lower]]
        rows = last[higher]
        self.high[runs[higher]], self.high_mask[runs[higher]], self.high_top1[runs[higher]] = (
            position[rows], masks[rows], top1[rows])

    def _affinity(self, stream, slot, position, top1, group, order, starts) -> None:
        key = ((stream << 31) | position)[order]
        layer = slot[order[starts[:-1]]]  # each block's slot
        for j in np.flatnonzero(layer[1:] == layer[:-1] + 1).tolist():  # the block of the next layer: partners
            here, there = order[starts[j] : starts[j + 1]], order[starts[j + 1] : starts[j + 2]]
            a, b = key[starts[j] : starts[j + 1]], key[starts[j + 1] : starts[j + 2]]
            if len(a) != len(b) or not (a == b).all():  # not the same positions: join them
                at = np.minimum(np.searchsorted(b, a), len(b) - 1)
                found = b[at] == a
                here, there = here[found], there[at[found]]
            self._count_pairs(np.full(len(here), layer[j]), top1[here], top1[there])
        for side in (-1, 1):  # the partner layer's highest position before this batch
            has = (slot + side >= 0) & (slot + side < self.layers)
            seen = self.high[group[has] + side]
            here = position[has]
            self.unordered += int((seen > here).sum())
            match = np.flatnonzero(has)[seen == here]
            other = self.high_top1[group[match] + side]
            if side < 0:
                self._count_pairs(slot[match] - 1, other, top1[match])
            else:
                self._count_pairs(slot[match], top1[match], other)

    def _count_jaccard(self, slot, a, b) -> None:
        if not len(slot):
            return
        common = np.bitwise_count(a & b).sum(1, dtype=np.int64)
        either = np.bitwise_count(a | b).sum(1, dtype=np.int64)
        side = self.jaccard.shape[1]
        cells = (slot.astype(np.int64) * side + common) * side + either
        self.jaccard += np.bincount(cells, minlength=self.jaccard.size).reshape(self.jaccard.shape)

    def _count_pairs(self, slot, x, y) -> None:
        if not len(slot):
            return
        e = self.experts
        cells = (slot.astype(np.int64) * e + x) * e + y
        self.pairs += np.bincount(cells, minlength=self.pairs.size).reshape(self.pairs.shape)

    def _grow(self, groups: int) -> None:
        if groups <= len(self.low):
            return
        extra = max(groups, 2 * len(self.low)) - len(self.low)
        self.low, self.high = (np.r_[a, np.full(extra, -1, np.int64)] for a in (self.low, self.high))
        self.high_top1 = np.r_[self.high_top1, np.zeros(extra, np.int64)]
        self.low_mask, self.high_mask = (np.r_[m, np.zeros((extra, self.words), np.uint64)]
                                         for m in (self.low_mask, self.high_mask))

    def grow_experts(self, experts: int) -> None:
        """A header without num_experts: more experts than seen so far."""
        words = max(1, -(-experts // WORD))
        pad = ((0, 0), (0, words - self.words))
        self.low_mask, self.high_mask = np.pad(self.low_mask, pad), np.pad(self.high_mask, pad)
        self.pairs = np.pad(self.pairs, ((0, 0), (0, experts - self.experts), (0, experts - self.experts)))
        self.experts, self.words = experts, words

    def adjacent_overlap(self) -> dict[int, float]:
        """Per layer slot with pairs: their mean Jaccard index."""
        common, either = np.nonzero(np.ones(self.jaccard.shape[1:], bool))
        return {slot: mean_jaccard(zip(common.tolist(), either.tolist(), self.jaccard[slot].ravel().tolist()))
                for slot in np.flatnonzero(self.jaccard.sum((1, 2))).tolist()}

    def transitions(self, slot: int) -> dict[tuple[int, int], int]:
        """(top-1 at slot, top-1 at slot + 1) -> positions."""
        x, y = np.nonzero(self.pairs[slot])
        return dict(zip(zip(x.tolist(), y.tolist()), self.pairs[slot, x, y].tolist()))


def _layer_major(stream: np.ndarray, slot: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows in (layer slot, stream, position) order (keys are distinct), and where
    each slot's rows start in it (then the end). Rows grouped by layer (a parquet part)
    repeat one sequence of positions per layer, cut short at the part's edges: the
    longest layer's rows are sorted once, and a layer whose positions are a run of that
    sequence takes the sort's order of the run; any other, a sort of its own."""
    n, key = len(slot), (stream << 31) | position
    if not (slot[1:] >= slot[:-1]).all():
        if stream.max() < 1 << 24 and slot.max() < 1 << 8:
            order = np.argsort((slot << 55) | key)
        else:
            order = np.lexsort((position, stream, slot))
        ordered = slot[order]
        return order, np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, n]
    starts = np.r_[0, np.flatnonzero(slot[1:] != slot[:-1]) + 1, n]
    longest = int(np.argmax(np.diff(starts)))
    reference = key[starts[longest] : starts[longest + 1]]
    by_key = np.argsort(reference)
    ordered = reference[by_key]
    order = np.empty(n, np.int64)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        block = key[a:b]
        at = min(int(np.searchsorted(ordered, block[0])), len(ordered) - 1)
        first = int(by_key[at])
        if ordered[at] == block[0] and first + len(block) <= len(reference) and \
                (reference[first : first + len(block)] == block).all():
            order[a:b] = by_key[(by_key >= first) & (by_key < first + len(block))] - first + a
        else:
            order[a:b] = np.argsort(block) + a
    return order, starts


def expert_masks(ids: np.ndarray, words: int) -> np.ndarray:
    """[n, words] uint64: bit e % 64 of word e // 64 set for each expert e of a row of
    ``ids`` [n, top_k]; a column at a time (numpy's reduction along a short axis is
    several times slower)."""
    masks = np.zeros((len(ids), words), np.uint64)
    bits = np.empty(len(ids), np.uint64)
    for column in ids.T:
        np.left_shift(np.uint64(1), (column % WORD).astype(np.uint64), out=bits)
        if words == 1:
            masks[:, 0] |= bits
        else:
            for w in range(words):
                masks[:, w] |= np.where(column // WORD == w, bits, np.uint64(0))
    return masks


def top_choice(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-1 expert (its largest weight; ties: the first) [n], and that weight
    [n]; a column at a time."""
    expert, weight = ids[:, 0].copy(), weights[:, 0].copy()
    for column in range(1, ids.shape[1]):
        np.copyto(expert, ids[:, column], where=weights[:, column] > weight)
        np.maximum(weight, weights[:, column], out=weight)
    return expert, weight


def mean_jaccard(counts) -> float:
    """The mean of common / either over (common, either, pairs) counts, summed exactly
    (so neither the reading order nor DuckDB's changes a bit), to 12 digits."""
    counts = [(c, e, n) for c, e, n in counts if n]
    return round(math.fsum(n * c / e for c, e, n in counts) / sum(n for _, _, n in counts), 12)
