"""Live expert load (VLLM_LOG_MOE_METRICS): the writer's counters equal the log's counts,
the window gauge sees only the last minute, and an engine serves them with or without
a log file."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from analysis.logfile import read_log
from conftest import run_engine
from route_checks import top2_spec
from test_route_log_writer import LAYERS, TOP_K, cached_reqs, lines_of, new_request, step
from vllm.model_executor.layers.fused_moe import route_logger
from vllm.model_executor.layers.fused_moe.route_log import metrics as route_log_metrics
from vllm.model_executor.layers.fused_moe.route_log.config import RouteLogConfig, RouteLogError
from vllm.model_executor.layers.fused_moe.route_log.metrics import ExpertLoadCollector, LoadCounters, read_shard


def parsed(text: str) -> dict:
    """{(metric name, labels minus model_name): value} of the route log's series in
    Prometheus text."""
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("vllm:moe_")}


def collected(paths: list[str], granularity: str = "expert") -> dict:
    collector = ExpertLoadCollector()
    collector.paths, collector.model_name, collector.granularity = paths, "m", granularity
    registry = CollectorRegistry()
    registry.register(collector)
    return parsed(generate_latest(registry).decode())


def expert_counts(metrics: dict) -> dict:
    """(layer, expert) -> tokens, for the experts chosen at all (every expert has a series)."""
    return {(int(dict(labels)["layer"]), int(dict(labels)["expert"])): value
            for (name, labels), value in metrics.items() if name == "vllm:moe_expert_tokens_total" and value}


def log_counts(path) -> dict:
    """(layer, expert) -> computed (not cached) records choosing it, from the log."""
    loads = read_log(path).loads
    computed = loads[loads.phase != "cached"].groupby(["layer", "expert"])["count"].sum()
    return {key: float(n) for key, n in computed.items() if n}


def test_counters_equal_the_logs_counts_cached_positions_left_out(tmp_path):
    path, counters = tmp_path / "log.jsonl", tmp_path / "load"
    config = RouteLogConfig.from_env({"VLLM_LOG_MOE": str(path), "VLLM_LOG_MOE_METRICS": "1"})
    meta = {"type": "meta", "schema": 1, "layers_logged": LAYERS, "top_k": TOP_K, "num_experts": 1000}
    logger = route_logger.RouteLogger(config, meta, LAYERS, TOP_K, 64, torch.device("cpu"), str(path), {},
                                      {"block_size": 4}, metrics_path=str(counters))

    def request(name, prompt_len, cached, blocks):
        return SimpleNamespace(**vars(new_request(name, prompt_len, cached)), block_ids=(blocks,))

    step(logger, new=[request("a", 10, 0, [3, 7])], batch=[("a", 0, 8)], value=1)
    step(logger, batch=[("a", 8, 2)], value=2, cached=cached_reqs(a=([8],)))
    step(logger, new=[request("b", 10, 8, [3, 7, 4])], batch=[("b", 8, 2)], value=3)
    logger.close()
    metrics = collected([str(counters)])
    assert expert_counts(metrics) == log_counts(path)
    routed = {int(dict(labels)["layer"]): v for (name, labels), v in metrics.items()
              if name == "vllm:moe_routed_tokens_total"}
    assert routed == {layer: 12.0 for layer in LAYERS}  # a's 10 positions and b's 2 computed
    by_layer = collected([str(counters)], "layer")
    assert not expert_counts(by_layer) and len(by_layer) == 2 * len(LAYERS)
    assert lines_of(path)[-1]["metrics_error"] is None


def test_counters_that_cannot_be_made_are_stated_in_the_log(tmp_path):
    """The log goes on; its 'end' says why /metrics shows no expert load."""
    path, counters = tmp_path / "log.jsonl", tmp_path / "gone" / "load"
    config = RouteLogConfig.from_env({"VLLM_LOG_MOE": str(path), "VLLM_LOG_MOE_METRICS": "1"})
    meta = {"type": "meta", "schema": 1, "layers_logged": LAYERS, "top_k": TOP_K, "num_experts": 1000}
    logger = route_logger.RouteLogger(config, meta, LAYERS, TOP_K, 64, torch.device("cpu"), str(path), {},
                                      metrics_path=str(counters))
    step(logger, new=[new_request("a")], batch=[("a", 0, 5)], value=1)
    logger.close()
    lines = lines_of(path)
    assert sum(r["type"] == "route" for r in lines) == 5 * len(LAYERS)
    end = lines[-1]
    assert end["final"] is True and end["write_error"] is None
    assert str(counters) in end["metrics_error"] and "No such file" in end["metrics_error"]


def test_the_gauge_weighs_the_last_minute_only(tmp_path, monkeypatch):
    clock = iter([1000.0, 1000.5, 1100.0])
    monkeypatch.setattr(route_log_metrics.time, "monotonic", lambda: next(clock))
    counters = LoadCounters(str(tmp_path / "load"), [0, 5], num_experts=4, top_k=1)
    counters.add(np.zeros((30, 2, 1), np.int32))  # expert 0 only, at t = 1000
    counters.add(np.zeros((10, 2, 1), np.int32))  # same second: no new snapshot
    counters.add(np.arange(8).reshape(4, 2, 1) % 4)  # every expert, at t = 1100
    layers, total, window, top_k = read_shard(str(tmp_path / "load"), now=1130.0)
    assert layers == [0, 5] and top_k == 1
    assert total[0].tolist() == [42, 0, 2, 0] and window[0].tolist() == [2, 0, 2, 0]
    assert total[1].tolist() == [40, 2, 0, 2] and window[1].tolist() == [0, 2, 0, 2]
    assert (read_shard(str(tmp_path / "load"), now=1200.0)[2] == 0).all()  # nothing in the last minute
    assert read_shard(str(tmp_path / "missing"), now=0.0) is None


@pytest.mark.parametrize("env, message", [
    ({"VLLM_LOG_MOE_METRICS": "yes"}, "VLLM_LOG_MOE_METRICS='yes': expected 0 (off), 1 or expert"),
    ({"VLLM_LOG_MOE_METRICS": "1", "VLLM_LOG_MOE_FORMAT": "parquet"}, "VLLM_LOG_MOE_FORMAT set but VLLM_LOG_MOE is not"),
])
def test_bad_metrics_settings(env, message):
    with pytest.raises(RouteLogError, match=re.escape(message)):
        RouteLogConfig.from_env(env)


def test_metrics_alone_need_no_file():
    config = RouteLogConfig.from_env({"VLLM_LOG_MOE_METRICS": "layer", "VLLM_LOG_MOE_LAYERS": "all"})
    assert (config.path, config.format, config.metrics, config.layers) == (None, "none", "layer", None)


@pytest.fixture(scope="module")
def engines(models, tmp_path_factory):
    """Greedy requests, twice: a log and the metrics, then the metrics alone."""
    tmp = tmp_path_factory.mktemp("metrics")
    spec = top2_spec(models["top2"])
    spec["waves"] = [[r for r in wave if r["sampling"]["temperature"] == 0.0] for wave in spec["waves"]]
    both = run_engine(tmp / "both", spec, {"VLLM_LOG_MOE": str(tmp / "routes.jsonl"), "VLLM_LOG_MOE_LAYERS": "all",
                                           "VLLM_LOG_MOE_METRICS": "1"})
    alone = run_engine(tmp / "alone", spec, {"VLLM_LOG_MOE_METRICS": "1", "VLLM_LOG_MOE_LAYERS": "all"})
    for run in (both, alone):
        assert run.returncode == 0, run.output[-3000:]
    return both, alone


def totals(metrics: dict, name: str) -> dict:
    return {dict(labels)["layer"]: value for (n, labels), value in metrics.items() if n == name}


@pytest.mark.engine
def test_an_engine_serves_the_logs_counts_with_or_without_the_log(engines):
    """With the log: the same run's counts, exactly. Alone: every position routed once
    per layer (two runs may batch differently, and near-ties then flip an expert)."""
    both, alone = engines
    with_log = parsed(both.result["metrics"])
    assert expert_counts(with_log) == log_counts(both.log)
    fed = sum(len(o["prompt_token_ids"]) + len(o["samples"][0]) - 1 for o in alone.result["outputs"])
    without = parsed(alone.result["metrics"])
    assert totals(without, "vllm:moe_routed_tokens_total") == {str(layer): fed for layer in range(4)}
    assert totals(with_log, "vllm:moe_routed_tokens_total") == totals(without, "vllm:moe_routed_tokens_total")
    assert sum(expert_counts(without).values()) == 2 * 4 * fed  # top-2, 4 layers
    # 1 (even) to 8 (one expert of eight); NaN if the engine's shutdown outlasted the 60 s window.
    gauges = totals(with_log, "vllm:moe_load_imbalance").values()
    assert len(gauges) == 4 and all(g != g or 1.0 <= g < 8 for g in gauges)
    assert sorted(p.name for p in alone.workdir.iterdir()) == ["out.json", "output.txt", "spec.json"]
    both.assert_log_closed(json.loads(both.log.read_text().splitlines()[-1]))
