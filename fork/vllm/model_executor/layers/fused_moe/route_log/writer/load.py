# SPDX-License-Identifier: Apache-2.0
"""This writer's expert load for /metrics (route_log/metrics.py): counted from the rows
the log gets, published as prometheus_client multiprocess values (files in the metrics
directory, summed over writers by whoever serves /metrics) at most once a second, when
the writer is idle, and at close."""

import os
import time
from collections import deque

import numpy as np

from ..metrics import EXPERT_TOKENS, LOAD_IMBALANCE, MULTIPROC_ENV, ROUTED_TOKENS, WINDOW_S


class LoadMetrics:
    def __init__(self, directory: str, model_name: str, layers: list[int], num_experts: int, top_k: int,
                 granularity: str):
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise OSError(f"{directory} is not a writable directory")
        # prometheus_client picks its value class at import: this process's values go to
        # files, whatever was imported before.
        os.environ[MULTIPROC_ENV] = directory
        from prometheus_client import Counter, Gauge, values

        values.ValueClass = values.MultiProcessValue()
        labels = ["model_name", "layer"]
        names = [[model_name, str(layer)] for layer in layers]
        self.experts = None
        if granularity == "expert":
            family = Counter(EXPERT_TOKENS, "Tokens routed to each expert of a logged MoE layer "
                             "(computed positions)", labels + ["expert"], registry=None)
            self.experts = [[family.labels(*name, str(e)) for e in range(num_experts)] for name in names]
        tokens = Counter(ROUTED_TOKENS, "Tokens routed at each logged MoE layer (computed positions)",
                         labels, registry=None)
        imbalance = Gauge(LOAD_IMBALANCE, f"Max over mean expert load at each logged MoE layer over the "
                          f"last {WINDOW_S:.0f} s", labels, registry=None, multiprocess_mode="max")
        self.tokens = [tokens.labels(*name) for name in names]
        self.imbalance = [imbalance.labels(*name) for name in names]
        self.top_k = max(top_k, 1)
        self.counts = np.zeros((len(layers), num_experts), np.int64)  # [layers, experts], cumulative
        self.sent = self.counts.copy()  # what the files hold
        self.cells = np.arange(len(layers))[None, :, None] * num_experts  # [1, L, 1]
        self.snapshots: deque = deque()  # (second, counts before its first rows), oldest first
        self.published = float("-inf")

    def add(self, ids: np.ndarray) -> None:
        """ids [n, L, k] of the rows the log just got (computed, not cached)."""
        now = time.monotonic()
        if not self.snapshots or int(now) != self.snapshots[-1][0]:
            self.snapshots.append((int(now), self.counts.copy()))
        valid = (ids >= 0) & (ids < self.counts.shape[1])  # an id the log writes but no expert has
        cells = (ids + self.cells)[valid] if not valid.all() else (ids + self.cells).ravel()
        self.counts += np.bincount(cells, minlength=self.counts.size).reshape(self.counts.shape)
        if now - self.published >= 1.0:
            self.publish(now)

    def publish(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self.snapshots and self.snapshots[0][0] < now - WINDOW_S:
            self.snapshots.popleft()
        window = self.counts - self.snapshots[0][1] if self.snapshots else np.zeros_like(self.counts)
        mean = window.mean(axis=1)
        ratio = np.divide(window.max(axis=1), mean, out=np.full(len(mean), np.nan), where=mean > 0)
        routed, sent = self.counts.sum(axis=1) // self.top_k, self.sent.sum(axis=1) // self.top_k
        for i, gauge in enumerate(self.imbalance):
            gauge.set(float(ratio[i]))
            if routed[i] > sent[i]:
                self.tokens[i].inc(int(routed[i] - sent[i]))
        if self.experts is not None:
            for layer, expert in zip(*np.nonzero(self.counts != self.sent)):
                self.experts[layer][expert].inc(int(self.counts[layer, expert] - self.sent[layer, expert]))
        self.sent[:] = self.counts
        self.published = now
