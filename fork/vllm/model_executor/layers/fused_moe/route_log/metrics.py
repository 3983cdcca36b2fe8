# SPDX-License-Identifier: Apache-2.0
"""Live expert load on vLLM's /metrics (VLLM_LOG_MOE_METRICS), with or without a log file.

Each writer process (one per pipeline stage and data-parallel rank) counts the route
records it writes, per logged layer and expert, into a small shared-memory file; the
front end (the API server, or the process that made the LLM) registers a Prometheus
collector that reads every writer's file when /metrics is scraped. Nothing is added to
the engine's process: counting is the writer's, reading the scrape's.

    vllm:moe_expert_tokens_total{model_name, layer, expert}  tokens routed to the expert
        (per-expert series: layers x experts of them; "layer" keeps the two below only)
    vllm:moe_routed_tokens_total{model_name, layer}           tokens routed at the layer
    vllm:moe_load_imbalance{model_name, layer}                max / mean expert load over
        the last WINDOW_S seconds (1.0: even; NaN: no tokens then)

Counted as the log counts them: positions computed by a forward (not those served from
the prefix cache, which load no expert), each once. The file: a header, the layers, the
cumulative counts, and a ring of snapshots taken at most once a second, from which a
scrape takes the window. Writers write, the collector only reads (int64 stores are atomic).
"""

import mmap
import os
import time

import numpy as np

WINDOW_S = 60.0
RING = 64  # snapshots, one per busy second at most: the ring always reaches WINDOW_S back
HEADER = 4  # int64: layers, experts, top_k, snapshots taken
GRANULARITIES = ("expert", "layer")


def _size(num_layers: int, num_experts: int) -> int:
    cells = num_layers * num_experts
    return 8 * (HEADER + num_layers + cells + RING + RING * cells)


def _views(buf, num_layers: int, num_experts: int) -> dict:
    """The file's arrays: header, layers [L], counts [L, E], times [RING], ring [RING, L, E]."""
    words = np.frombuffer(buf, np.int64)
    cells, at = num_layers * num_experts, HEADER + num_layers
    return {"header": words[:HEADER], "layers": words[HEADER:at],
            "counts": words[at : at + cells].reshape(num_layers, num_experts),
            "times": words[at + cells : at + cells + RING].view(np.float64),
            "ring": words[at + cells + RING :].reshape(RING, num_layers, num_experts)}


class LoadCounters:
    """Writer side: owns its shard's file (created here, removed by the front end)."""

    def __init__(self, path: str, layers: list[int], num_experts: int, top_k: int):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        # Reserved now: a full /dev/shm fails here, not as SIGBUS on a later store.
        os.posix_fallocate(fd, 0, _size(len(layers), num_experts))
        self.map = mmap.mmap(fd, _size(len(layers), num_experts))
        os.close(fd)
        self.v = _views(self.map, len(layers), num_experts)
        self.v["layers"][:] = layers
        self.cells = np.arange(len(layers))[None, :, None] * num_experts  # [1, L, 1]
        self.second = -1
        self.v["header"][:] = (len(layers), num_experts, top_k, 0)

    def add(self, ids: np.ndarray) -> None:
        """ids [n, L, k] of the rows the log just got (computed, not cached)."""
        now = time.monotonic()
        if int(now) != self.second:  # the window's baseline: the counts before this step
            taken = int(self.v["header"][3])
            self.v["ring"][taken % RING] = self.v["counts"]
            self.v["times"][taken % RING] = now
            self.v["header"][3] = taken + 1
            self.second = int(now)
        counts = self.v["counts"]
        valid = (ids >= 0) & (ids < counts.shape[1])  # an id the log writes but no expert has
        cells = (ids + self.cells)[valid] if not valid.all() else (ids + self.cells).ravel()
        counts += np.bincount(cells, minlength=counts.size).reshape(counts.shape)


def read_shard(path: str, now: float) -> tuple[list[int], np.ndarray, np.ndarray, int] | None:
    """A writer's layers, cumulative counts [L, E], counts over the window [L, E] and
    top_k; None before the writer has made its file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    header = np.frombuffer(data, np.int64, HEADER)
    if len(data) < 8 * HEADER or len(data) < _size(int(header[0]), int(header[1])):
        return None
    v = _views(bytearray(data), int(header[0]), int(header[1]))
    taken = int(header[3])
    kept = np.arange(max(0, taken - RING), taken) % RING  # oldest first
    inside = kept[v["times"][kept] >= now - WINDOW_S]
    # A snapshot holds the counts before the first step of its second: the oldest one in
    # the window is the counts before it. None there: no step in the window.
    baseline = v["ring"][inside[0]] if len(inside) else v["counts"]
    return v["layers"].tolist(), v["counts"].copy(), v["counts"] - baseline, int(header[2])


class ExpertLoadCollector:
    """Front end: one per process, re-pointed when another engine is configured."""

    def __init__(self):
        self.paths: list[str] = []
        self.model_name = ""
        self.granularity = "expert"

    def describe(self):
        return []  # no fixed series: the layers are known once a writer runs

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        experts = CounterMetricFamily("vllm:moe_expert_tokens", "Tokens routed to each expert of a "
                                      "logged MoE layer (computed positions)", labels=["model_name", "layer", "expert"])
        tokens = CounterMetricFamily("vllm:moe_routed_tokens", "Tokens routed at each logged MoE layer "
                                     "(computed positions)", labels=["model_name", "layer"])
        imbalance = GaugeMetricFamily("vllm:moe_load_imbalance", f"Max over mean expert load at each logged "
                                      f"MoE layer over the last {WINDOW_S:.0f} s", labels=["model_name", "layer"])
        for layer, (total, window, top_k) in sorted(self._layers().items()):
            name = [self.model_name, str(layer)]
            if self.granularity == "expert":
                for expert, count in enumerate(total.tolist()):
                    experts.add_metric(name + [str(expert)], count)
            tokens.add_metric(name, int(total.sum()) // max(top_k, 1))
            mean = window.mean()
            imbalance.add_metric(name, float(window.max() / mean) if mean > 0 else float("nan"))
        yield from ([experts] if self.granularity == "expert" else []) + [tokens, imbalance]

    def _layers(self) -> dict:
        """layer -> (counts [E], window counts [E], top_k), summed over data-parallel shards."""
        now, layers = time.monotonic(), {}
        for path in self.paths:
            shard = read_shard(path, now)
            if shard is None:
                continue
            for i, layer in enumerate(shard[0]):
                total, window, _ = layers.get(layer, (0, 0, 0))
                layers[layer] = (total + shard[1][i], window + shard[2][i], shard[3])
        return layers


_COLLECTOR: ExpertLoadCollector | None = None


def serve_metrics(paths: list[str], model_name: str, granularity: str) -> None:
    """Registers the collector with prometheus_client's default registry (vLLM's
    /metrics with one API server process), once per process."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        _COLLECTOR = ExpertLoadCollector()
        REGISTRY.register(_COLLECTOR)
    _COLLECTOR.paths, _COLLECTOR.model_name, _COLLECTOR.granularity = paths, model_name, granularity
