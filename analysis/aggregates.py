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
        self.pairs = np.zeros((len(layers), num_experts, num_experts), np.int64)  # [slot, a, b], a < b
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

    def add(self, slot: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
        """Distinct route records in log order: layer slot [n]; ids, weights [n, top_k].
        One bincount per aggregate over all layers at once (cell = slot, then value)."""
        e, layers, k = self.num_experts, len(self.layers), ids.shape[1]
        first, second = np.triu_indices(k, 1)
        narrow = ids.astype(np.int32, copy=False)  # a third faster than int64 here; cells < 2**31
        x, y = narrow[:, first], narrow[:, second]
        cells = np.minimum(x, y)  # (slot, low, high), in place: these arrays are n x pairs
        x += y
        x -= cells
        cells += (slot.astype(np.int32) * e)[:, None]
        cells *= e
        cells += x
        self.pairs += np.bincount(cells.ravel(), minlength=layers * e * e).reshape(layers, e, e)
        self.top1 += _histogram(slot, _across(np.maximum, weights), layers)
        self.mass += _histogram(slot, _across(np.add, weights), layers)
        order = np.argsort(slot, kind="stable")  # each layer's rows, still in log order
        bounds = np.searchsorted(slot[order], np.arange(layers + 1))
        for s in np.flatnonzero(np.diff(bounds)):
            self._add_windows(int(s), ids[order[bounds[s] : bounds[s + 1]]])

    def _add_windows(self, s: int, ids: np.ndarray) -> None:
        e, w = self.num_experts, self.window
        at = self.filled[s] + np.arange(len(ids))
        index = at // w  # 0: the open window
        counts = np.bincount((index[:, None] * e + ids).ravel(), minlength=(index[-1] + 1) * e)
        counts = counts.reshape(-1, e)
        counts[0] += self.partial[s]
        closed = len(counts) - 1 if at[-1] % w != w - 1 else len(counts)
        for i in range(closed):
            self._close_window(s, counts[i], w)
        self.partial[s] = counts[closed] if closed < len(counts) else 0
        self.filled[s] = (at[-1] + 1) % w

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
        s, a, b = np.nonzero(self.pairs)
        pairs = pd.DataFrame({"layer": layer[s], "a": a, "b": b, "count": self.pairs[s, a, b]})
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


def _histogram(slot: np.ndarray, values: np.ndarray, layers: int) -> np.ndarray:
    """[layers, BINS] counts of ``values`` per layer slot."""
    bins = np.clip((values * BINS).astype(np.int64), 0, BINS - 1)
    return np.bincount(slot * BINS + bins, minlength=layers * BINS).reshape(layers, BINS)
