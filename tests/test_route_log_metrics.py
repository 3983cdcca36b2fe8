"""Live expert load (VLLM_LOG_MOE_METRICS): the writer's counters equal the log's counts,
the window gauge sees only the last minute, and an engine serves them with or without
a log file."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from analysis.logfile import read_log
from conftest import run_engine
from route_checks import top2_spec
from test_route_log_writer import LAYERS, TOP_K, cached_reqs, lines_of, new_request, step
from vllm.model_executor.layers.fused_moe import route_logger
from vllm.model_executor.layers.fused_moe.route_log.config import RouteLogConfig, RouteLogError


def parsed(text: str) -> dict:
    """{(metric name, labels minus model_name): value} of the route log's series in
    Prometheus text."""
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("vllm:moe_")}


def collected(directory) -> dict:
    """What /metrics shows of the values the writers published in ``directory``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return parsed(generate_latest(registry).decode())


def metrics_logger(path, directory, granularity="expert", block_store=None):
    config = RouteLogConfig.from_env({"VLLM_LOG_MOE": str(path), "VLLM_LOG_MOE_METRICS": granularity})
    meta = {"type": "meta", "schema": 1, "layers_logged": LAYERS, "top_k": TOP_K, "num_experts": 1000,
            "served_model_name": "m"}
    return route_logger.RouteLogger(dataclasses.replace(config, metrics_dir=str(directory)), meta, LAYERS, TOP_K,
                                    64, torch.device("cpu"), str(path), {}, block_store)


def expert_counts(metrics: dict) -> dict:
    """(layer, expert) -> tokens, for the experts chosen at all (every expert has a series)."""
    return {(int(dict(labels)["layer"]), int(dict(labels)["expert"])): value
            for (name, labels), value in metrics.items() if name == "vllm:moe_expert_tokens_total" and value}


def log_counts(path) -> dict:
    """(layer, expert) -> computed (not cached) records choosing it, from the log."""
    loads = read_log(path).loads
    computed = loads[loads.phase != "cached"].groupby(["layer", "expert"])["count"].sum()
    return {key: float(n) for key, n in computed.items() if n}


def scripted(path, directory, granularity="expert"):
    def request(name, prompt_len, cached, blocks):
        return SimpleNamespace(**vars(new_request(name, prompt_len, cached)), block_ids=(blocks,))

    directory.mkdir()
    logger = metrics_logger(path, directory, granularity, {"block_size": 4})
    # Experts (value, position): values above the positions, so that no record names one twice.
    step(logger, new=[request("a", 10, 0, [3, 7])], batch=[("a", 0, 8)], value=501)
    step(logger, batch=[("a", 8, 2)], value=502, cached=cached_reqs(a=([8],)))
    step(logger, new=[request("b", 10, 8, [3, 7, 4])], batch=[("b", 8, 2)], value=503)
    logger.close()


def test_counters_equal_the_logs_counts_cached_positions_left_out(tmp_path):
    """The writer's multiprocess values, read as /metrics reads them."""
    scripted(tmp_path / "log.jsonl", tmp_path / "prom")
    metrics = collected(tmp_path / "prom")
    assert expert_counts(metrics) == log_counts(tmp_path / "log.jsonl")
    routed = {int(dict(labels)["layer"]): v for (name, labels), v in metrics.items()
              if name == "vllm:moe_routed_tokens_total"}
    assert routed == {layer: 12.0 for layer in LAYERS}  # a's 10 positions and b's 2 computed
    assert lines_of(tmp_path / "log.jsonl")[-1]["metrics_error"] is None
    scripted(tmp_path / "layer.jsonl", tmp_path / "by-layer", "layer")
    by_layer = collected(tmp_path / "by-layer")
    assert not expert_counts(by_layer) and len(by_layer) == 2 * len(LAYERS)


def test_counters_that_cannot_be_made_are_stated_in_the_log(tmp_path):
    """The log goes on; its 'end' says why /metrics shows no expert load."""
    path, missing = tmp_path / "log.jsonl", tmp_path / "gone"
    logger = metrics_logger(path, missing)
    step(logger, new=[new_request("a")], batch=[("a", 0, 5)], value=1)
    logger.close()
    lines = lines_of(path)
    assert sum(r["type"] == "route" for r in lines) == 5 * len(LAYERS)
    end = lines[-1]
    assert end["final"] is True and end["write_error"] is None
    assert f"{missing} is not a writable directory" in end["metrics_error"]


GAUGE_SCRIPT = """
import sys, types
import numpy as np
from vllm.model_executor.layers.fused_moe.route_log.writer import load
clock = iter([1000.0, 1000.5, 1100.0])
load.time = types.SimpleNamespace(monotonic=lambda: next(clock))
metrics = load.LoadMetrics(sys.argv[1], "m", [0, 5], num_experts=4, top_k=1, granularity="expert")
metrics.add(np.zeros((30, 2, 1), np.int32))  # expert 0 only, at t = 1000
metrics.add(np.zeros((10, 2, 1), np.int32))  # same second: no new snapshot, not published
metrics.add(np.arange(8).reshape(4, 2, 1) % 4)  # every expert, at t = 1100
metrics.publish(float(sys.argv[2]))
"""


def gauge_run(directory, now: float) -> dict:
    """A writer's values published at ``now`` (seconds on its clock), in a process of
    their own: prometheus_client's value class is chosen per process."""
    directory.mkdir()
    subprocess.run([sys.executable, "-c", GAUGE_SCRIPT, str(directory), str(now)], check=True)
    return collected(directory)


def test_the_gauge_weighs_the_last_minute_only(tmp_path):
    metrics = gauge_run(tmp_path / "at-1130", 1130.0)
    assert {k: v for k, v in expert_counts(metrics).items() if k[0] == 0} == {(0, 0): 42, (0, 2): 2}
    assert {k: v for k, v in expert_counts(metrics).items() if k[0] == 5} == {(5, 0): 40, (5, 1): 2, (5, 3): 2}
    assert totals(metrics, "vllm:moe_load_imbalance") == {"0": 2.0, "5": 2.0}  # the last minute's 4 tokens
    later = totals(gauge_run(tmp_path / "at-1200", 1200.0), "vllm:moe_load_imbalance")
    assert list(later) == ["0", "5"] and all(v != v for v in later.values())  # NaN: nothing in the last minute


@pytest.mark.parametrize("env, message", [
    ({"VLLM_LOG_MOE_METRICS": "yes"}, "VLLM_LOG_MOE_METRICS='yes': expected 0 (off), 1 or expert"),
    ({"VLLM_LOG_MOE_METRICS": "1", "VLLM_LOG_MOE_FORMAT": "parquet"}, "VLLM_LOG_MOE_FORMAT set but VLLM_LOG_MOE is not"),
])
def test_bad_metrics_settings(env, message):
    with pytest.raises(RouteLogError, match=re.escape(message)):
        RouteLogConfig.from_env(env)


def test_a_killed_front_ends_directory_is_removed_at_the_next_start(tmp_path, monkeypatch):
    """SIGKILL skips the exit handler that removes a front end's metrics directory."""
    from vllm.model_executor.layers.fused_moe.route_log import metrics

    monkeypatch.setattr(metrics.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{metrics.DIR_PREFIX}{int(dead.stdout)}-abc"
    alive = tmp_path / f"{metrics.DIR_PREFIX}{os.getppid()}-def"
    for directory in (orphan, alive):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")
    made = metrics.metrics_directory()
    assert not orphan.exists() and alive.exists()
    assert os.path.dirname(made) == str(tmp_path) and os.path.basename(made).startswith(f"{metrics.DIR_PREFIX}{os.getpid()}-")


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
