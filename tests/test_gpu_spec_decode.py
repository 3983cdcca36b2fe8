"""Speculative decoding on a GPU under CUDA graphs, each against a run without drafts:
Model Runner V1 with synchronous scheduling, a draft model (the same tiny MoE, so its
own routers would double every record if they were hooked) and n-gram drafts; Model
Runner V2 with async scheduling, EAGLE drafts (tests/eagle_head.py).

ROUTE_TRACE_OUT=file.jsonl keeps what the V2 runner handed the logger in the EAGLE run
(tests/trace_hooks): tests/data/ holds one, replayed on the CPU by
test_spec_decode_trace.py."""

import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, run_engine
from eagle_head import build_eagle_head, build_target
from route_checks import assert_same_greedy_routing, check_token_ids, read_log
from test_spec_decode_route_log import NGRAM, spec_workload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
RUNS_WEIGHT_TOL = 2e-3  # two GPU runs of different batch shapes (see test_gpu_route_log)


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-spec")
    draft = {"method": "draft_model", "model": str(models["top2"]), "num_speculative_tokens": 3}
    out = {}
    for name, spec in (("draft", draft), ("ngram", NGRAM), ("plain", None)):
        workload = spec_workload(models["top2"], False)
        workload["engine"].update(gpu_memory_utilization=0.25, async_scheduling=False)
        if spec is not None:
            workload["engine"]["speculative_config"] = spec
        env = {"VLLM_LOG_MOE": str(tmp / f"{name}.jsonl"), "VLLM_LOG_MOE_LAYERS": "all",
               "VLLM_USE_V2_MODEL_RUNNER": "0"}
        run = run_engine(tmp / name, workload, env)
        assert run.returncode == 0, run.output[-4000:]
        out[name] = run
    return out


@pytest.mark.parametrize("name", ["draft", "ngram"])
def test_accepted_drafts_logged_once_with_the_routing_of_a_run_without(runs, name):
    _, _, requests, end = read_log(runs[name].log)
    assert sum(r["accepted_draft_positions"] for r in requests["request_end"]) > 50
    assert_same_greedy_routing(runs[name], runs["plain"], f"{name}_vs_plain", 0.002, RUNS_WEIGHT_TOL)
    check_token_ids(runs[name])
    runs[name].assert_log_closed(end)


@pytest.fixture(scope="module")
def v2_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-spec-v2")
    target = build_target(tmp / "target")
    eagle = {"method": "eagle", "model": str(build_eagle_head(target, tmp / "eagle")), "num_speculative_tokens": 3}
    out = {}
    for name, spec in (("eagle", eagle), ("plain", None)):
        workload = spec_workload(target, False)
        workload["engine"].update(gpu_memory_utilization=0.25, async_scheduling=True)
        if spec is not None:
            workload["engine"]["speculative_config"] = spec
        env = {"VLLM_LOG_MOE": str(tmp / f"{name}.jsonl"), "VLLM_LOG_MOE_LAYERS": "all",
               "VLLM_USE_V2_MODEL_RUNNER": "1"}
        if name == "eagle":
            env.update(ROUTE_TRACE=str(tmp / "trace.jsonl"),
                       PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "trace_hooks"), os.environ.get("PYTHONPATH", "")]))
        run = run_engine(tmp / name, workload, env)
        assert run.returncode == 0, run.output[-4000:]
        out[name] = run
    if os.environ.get("ROUTE_TRACE_OUT"):
        shutil.copy(tmp / "trace.jsonl", os.environ["ROUTE_TRACE_OUT"])
        shutil.copy(out["eagle"].workdir / "out.json", os.environ["ROUTE_TRACE_OUT"] + ".out.json")
    return out


def test_v2_async_eagle_logged_as_without_drafts(v2_runs):
    """Model Runner V2, async scheduling, CUDA graphs: the accepted drafts' routing is
    the routing of the same positions computed without drafts."""
    run = v2_runs["eagle"]
    calls = [json.loads(line) for line in (run.workdir.parent / "trace.jsonl").read_text().splitlines()]
    assert any(c["call"] == "end_sample" and c["num_sampled"] is not None for c in calls)  # V2's call
    _, _, requests, end = read_log(run.log)
    accepted = sum(r["accepted_draft_positions"] for r in requests["request_end"])
    rejected = sum(r["rejected_draft_positions"] for r in requests["request_end"])
    assert accepted > 20 and rejected > 20, (accepted, rejected)
    assert_same_greedy_routing(run, v2_runs["plain"], "v2_eagle_vs_plain", 0.002, RUNS_WEIGHT_TOL)
    check_token_ids(run)
    run.assert_log_closed(end)
