"""What the reader accumulates beyond expert load, chunk by chunk, in bounded memory:
co-activation (pairs of experts chosen for the same token), gate confidence
(1,000-bin histograms of the top-1 weight and of the top-k weight mass), and load over time
(max/mean expert load per window of tokens, in the log's order). Every distinct route
record counts, cached ones included. Sizes: [layers, experts, experts] pair counts,
[layers, BINS] histograms, one row per finished window."""

import numpy as np
import pandas as pd

BINS = 1000  # histogram bins over [0, 1] (quantiles to 0.001); larger values land in the last
WINDOW = 1024  # tokens per load-over-time window


class Aggregates:
    def __init__(self, layers: list[int], num_experts: int, window: int = WINDOW):
        self.layers = layers
        self.num_experts = num_experts
        self.window = window
        self.pairs = np.zeros((len(layers), num_experts, num_experts), np.int64)  # [slot, a, b], either order
        self.top1 = np.zeros((len(layers), BINS), np.int64)
        self.mass = np.zeros((len(layers), BINS), np.int64)
        self.partial = np.zeros((len(layers), num_experts), np.int64)  # the open window's counts
        self.filled = np.zeros(len(layers), np.int64)  # tokens in the open window
        self.closed = np.zeros(len(layers), np.int64)  # windows finished
        self.windows: list[tuple[int, int, int, float]] = []  # slot, window, tokens, max/mean

    def grow(self, num_experts: int) -> None:
        """More experts than assumed (a header without num_experts)."""
        extra = num_experts - self.num_experts
        self.pairs = np.pad(self.pairs, ((0, 0), (0, extra), (0, extra)))
        self.partial = np.pad(self.partial, ((0, 0), (0, extra)))
        self.num_experts = num_experts

    def add_sums(self, slot: np.ndarray, ids: np.ndarray, weights: np.ndarray, top1_weight: np.ndarray) -> None:
        """Pairs and histograms of distinct route records, in any order: layer slot [n];
        ids, weights [n, top_k]; the largest weight of each row [n]. One bincount per aggregate over all layers at once (cell
        = slot, then value). Touches none of what add_windows does (another thread's)."""
        e, layers, k = self.num_experts, len(self.layers), ids.shape[1]
        slot = slot.astype(np.int64, copy=False)
        columns = ids.T.astype(np.int64)  # [k, n], contiguous
        # Pair (i, j), i < j in the row, counted at [slot, id_i, id_j]: either triangle;
        # frames() folds them. Filled in place: these arrays are pairs x n.
        cells = np.empty((k * (k - 1) // 2, len(slot)), np.int64)
        row, base = 0, slot * e
        for i in range(k - 1):
            first = (base + columns[i]) * e
            for j in range(i + 1, k):
                np.add(first, columns[j], out=cells[row])
                row += 1
        self.pairs += np.bincount(cells.ravel(), minlength=layers * e * e).reshape(layers, e, e)
        base = slot * BINS
        self.top1 += _histogram(base, top1_weight.astype(np.float64), layers)
        self.mass += _histogram(base, _across(np.add, weights), layers)

    def add_windows(self, slot: np.ndarray, ids: np.ndarray) -> None:
        """Distinct route records in log order: each layer's rows fill its windows, with one
        bincount for all of them (window rows allocated per layer, layers in order), then
        the closed ones' max/mean."""
        e, w = self.num_experts, self.window
        if len(slot) > 1 and not (slot[1:] >= slot[:-1]).all():  # a JSONL chunk: layers interleaved
            order = np.argsort(slot.astype(np.int16), kind="stable")  # radix: each layer's rows in log order
            slot, ids = slot[order], ids[order]
        rows = np.bincount(slot, minlength=len(self.layers))  # [layers]
        first = np.cumsum(rows) - rows
        at = self.filled[slot] + np.arange(len(slot)) - first[slot]  # place in the layer's open windows
        spans = np.where(rows > 0, (self.filled + rows - 1) // w + 1, 0)  # windows touched, per layer
        start = np.cumsum(spans) - spans
        window = start[slot] + at // w
        counts = np.bincount((window[:, None] * e + ids).ravel(), minlength=spans.sum() * e).reshape(-1, e)
        present = np.flatnonzero(rows)
        counts[start[present]] += self.partial[present]
        ends = self.filled[present] + rows[present]  # rows in the layer's windows so far
        closes = spans[present] - (ends % w != 0)  # the last stays open unless it is full
        closed = np.repeat(start[present], closes) + _ranks(closes)
        ratios = (counts[closed].max(1) / (counts[closed].sum(1) / e)).tolist()
        numbers = np.repeat(self.closed[present], closes) + _ranks(closes)
        self.windows += zip(np.repeat(present, closes).tolist(), numbers.tolist(), [w] * len(closed), ratios)
        self.closed[present] += closes
        still = closes < spans[present]
        self.partial[present] = np.where(still[:, None], counts[start[present] + spans[present] - 1], 0)
        self.filled[present] = ends % w

    def _close_window(self, s: int, counts: np.ndarray, tokens: int) -> None:
        self.windows.append((s, int(self.closed[s]), tokens, float(counts.max() / counts.mean())))
        self.closed[s] += 1

    def finish(self) -> None:
        """Closes each layer's last, partly filled window."""
        for s in range(len(self.layers)):
            if self.filled[s]:
                self._close_window(s, self.partial[s], int(self.filled[s]))
                self.filled[s] = 0

    def frames(self) -> dict[str, pd.DataFrame]:
        layer = np.asarray(self.layers)
        pairs = np.triu(self.pairs) + np.triu(self.pairs.transpose(0, 2, 1), 1)  # [slot, a, b], a <= b
        s, a, b = np.nonzero(pairs)
        pairs = pd.DataFrame({"layer": layer[s], "a": a, "b": b, "count": pairs[s, a, b]})
        edges = np.linspace(0, 1, BINS + 1)[:-1]
        confidence = pd.concat([
            pd.DataFrame({"layer": np.repeat(layer, BINS), "measure": measure,
                          "bin_low": np.tile(edges, len(layer)), "count": hist.ravel()})
            for measure, hist in (("top1_weight", self.top1), ("topk_mass", self.mass))
        ], ignore_index=True)
        windows = pd.DataFrame(self.windows, columns=["slot", "window", "tokens", "max_over_mean"])
        windows.insert(0, "layer", layer[windows.pop("slot").to_numpy(dtype=np.int64)])
        return {"pairs": pairs, "confidence": confidence, "windows": windows}


def _across(ufunc, values: np.ndarray) -> np.ndarray:
    """ufunc over each row of [n, k] values, a column at a time: numpy's reduction along
    a short last axis is several times slower."""
    out = values[:, 0].astype(np.float64)
    for column in range(1, values.shape[1]):
        ufunc(out, values[:, column], out=out)
    return out


def _histogram(base: np.ndarray, values: np.ndarray, layers: int) -> np.ndarray:
    """[layers, BINS] counts of ``values`` (overwritten) per layer; ``base``: slot x BINS."""
    values *= BINS
    bins = values.astype(np.int64)
    np.clip(bins, 0, BINS - 1, out=bins)
    bins += base
    return np.bincount(bins, minlength=layers * BINS).reshape(layers, BINS)


def _ranks(sizes: np.ndarray) -> np.ndarray:
    """0..size-1 for each size, concatenated."""
    return np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
