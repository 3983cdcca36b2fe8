"""Speculative decoding on a GPU under CUDA graphs (Model Runner V1, synchronous
scheduling): a draft model (the same tiny MoE, so its own routers would double every
record if they were hooked) and n-gram drafts, against a run without drafts."""

import pytest
import torch

from conftest import run_engine
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
