"""The step-level A/B benchmark's two halves without an engine: the engine-side wrapper
(hook_timer/sitecustomize.py) pauses exactly the blocks it says, and the estimate
recovers a known cost from step times that vary by step and over time."""

import importlib
import importlib.util
import random
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
ab = importlib.import_module("bench_throughput_ab")


def load_hook_timer():
    """By path: the name sitecustomize may be taken by the interpreter's own."""
    spec = importlib.util.spec_from_file_location("hook_timer", BENCH / "hook_timer" / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wrapper_skips_end_forward_in_every_other_block(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTE_HOOK_TIMES", str(tmp_path))
    monkeypatch.setenv("ROUTE_PAUSE_STEPS", "2")
    hook = load_hook_timer()
    called = []
    logger = types.SimpleNamespace(
        _ACTIVE=None, begin_step=lambda out: called.append(("begin", out.total_num_scheduled_tokens)),
        end_forward=lambda *args: called.append(("end", args[0])))
    hook._wrap(logger)
    for step in range(8):
        logger.begin_step(types.SimpleNamespace(total_num_scheduled_tokens=100 + step))
        logger.end_forward(step)
    assert [c for c in called if c[0] == "end"] == [("end", s) for s in (0, 1, 4, 5)]
    assert len([c for c in called if c[0] == "begin"]) == 8  # requests still come and go
    trace = [list(s) for s in ab.STEP.iter_unpack(next(tmp_path.glob("*.steps")).read_bytes())]
    assert [(tokens, paused) for _, tokens, paused in trace] == [
        (100 + s, s // 2 % 2) for s in range(8)]
    assert all(a[0] <= b[0] for a, b in zip(trace, trace[1:]))


def synthetic(cost_ms: float, seed: int = 0) -> dict:
    """Six generations of 60 steps (4 prefill, then decode) whose times depend on the
    step and drift over the process's life; logged steps take ``cost_ms`` longer."""
    rng = random.Random(seed)
    windows, steps, t, n = [], [], 0.0, 0
    for gen in range(6):
        t0 = t
        for k in range(60):
            paused = n // 8 % 2
            ms = (150 + 20 * k if k < 4 else 50) * (1 + 0.3 * (gen % 3)) + rng.gauss(0, 2)
            steps.append([t, 4000 if k < 4 else 100, paused])
            t += (ms + (0 if paused else cost_ms)) / 1e3
            n += 1
        windows.append((t0, t - 1e-9))
        t += 1.0
    return {"windows": windows, "steps": steps, "requests": 100, "block": 8}


@pytest.mark.parametrize("cost_ms", [0.0, 1.0])
def test_the_estimate_recovers_the_cost_of_a_logged_step(cost_ms):
    costs = ab.step_costs(synthetic(cost_ms))
    assert set(costs) == {"decode", "prefill"}
    for kind in costs.values():
        assert abs(kind["diff_ms"] - cost_ms) < 3 * kind["se_ms"] + 0.05
    assert costs["decode"]["se_ms"] < 1.0  # the drift (30% between generations) is taken out
    cost, se = ab.overhead(synthetic(cost_ms))
    assert abs(cost - cost_ms / costs["decode"]["paused_ms"]) < 3 * se


def test_modes_set_the_route_log_variables(tmp_path):
    tp = importlib.import_module("bench_throughput")
    log = tmp_path / "routes"
    assert tp.mode_env("off", log) == {}
    assert tp.mode_env("layer0", log) == {"VLLM_LOG_MOE_LAYERS": "0", "VLLM_LOG_MOE": str(log),
                                          "VLLM_LOG_MOE_FORMAT": "jsonl"}
    assert tp.mode_env("all+parquet+metrics", log) == {
        "VLLM_LOG_MOE_LAYERS": "all", "VLLM_LOG_MOE_METRICS": "1", "VLLM_LOG_MOE": str(log),
        "VLLM_LOG_MOE_FORMAT": "parquet"}
    assert tp.mode_env("layers=0-3+metrics+nolog", log) == {"VLLM_LOG_MOE_LAYERS": "0-3", "VLLM_LOG_MOE_METRICS": "1"}
    for bad in ("all+nolog", "all+parquet+metrics+nolog", "all+csv"):
        with pytest.raises(SystemExit, match="suffixes"):
            tp.mode_env(bad, log)
