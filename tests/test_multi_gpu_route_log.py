"""Tensor, pipeline and data (+ expert) parallel runs on two GPUs log every token once.

Run through the device tool on nvidia-h100-x2 (scripts/device_setup.sh); skipped with
fewer than two CUDA GPUs. The tiny top-2 model (4 MoE layers, 8 experts) in fp32.
"""

import json
from collections import Counter

import pytest
import torch

from analysis.merge import merge
from conftest import run_engine
from route_checks import check_against_oracle, read_log, report
from test_gpu_route_log import ALL, GPU_TIE_GAP, GPU_WEIGHT_TOL, assert_same_greedy_routing, gpu_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]
LAYERS = [0, 1, 2, 3]


CONFIGS = {  # name -> (job, engine arguments beyond gpu_spec's)
    "tp1": ("engine_job.py", {}),
    "tp2": ("engine_job.py", {"tensor_parallel_size": 2}),
    "pp2": ("engine_job.py", {"pipeline_parallel_size": 2}),
    # Every request at once through AsyncLLM, as a server gets them.
    "dp2": ("async_engine_job.py", {"data_parallel_size": 2, "enable_expert_parallel": True}),
}


class Runs(dict):
    """Engines started on first use, so that `-k` selects which ones a device call pays for."""

    def __init__(self, model, tmp):
        super().__init__()
        self.model, self.tmp = model, tmp

    def __missing__(self, name):
        job, engine = CONFIGS[name]
        spec = gpu_spec(self.model, **engine)
        if job == "async_engine_job.py":
            spec["requests"] = [r for wave in spec.pop("waves") for r in wave]
        env = {"VLLM_LOG_MOE": str(self.tmp / f"{name}.jsonl"), **ALL}
        run = run_engine(self.tmp / name, spec, env, job=job)
        assert run.returncode == 0, run.output[-4000:]
        self[name] = run
        return run


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    return Runs(models["top2"], tmp_path_factory.mktemp("multi_gpu"))


def merged(run):
    summary = merge(run.log)
    assert summary["complete"], summary
    return summary


def test_tp2_one_rank_writes_the_tp1_log(runs):
    tp1, tp2 = runs["tp1"], runs["tp2"]
    assert [w["active"] for w in tp2.result["workers"]] == [True, False]
    assert [w["hooked"] for w in tp2.result["workers"]] == [4, 0]
    assert not list(tp2.log.parent.glob("tp2.*.jsonl")), "TP must not shard the log"
    meta, *_ = read_log(tp2.log)
    assert meta["parallel"]["tensor_parallel_size"] == 2 and meta["parallel"]["shards"] == ["tp2.jsonl"]
    # TP splits the attention and expert GEMMs (the gate is replicated): the summation
    # order changes, so ids may differ at near-ties and weights by rounding.
    assert_same_greedy_routing(tp2, tp1, "tp2_vs_tp1")
    assert_same_greedy_routing(tp1, tp2, "tp1_vs_tp2")  # both ways: the same records


@pytest.mark.parametrize("name", ["tp1", "tp2"])
def test_tp_logs_match_the_oracle(runs, models, name):
    check_against_oracle(runs[name], models["top2"], LAYERS, GPU_WEIGHT_TOL, GPU_TIE_GAP, max_ties=0.05)


def test_pp2_each_stage_writes_its_layers(runs, models):
    run = runs["pp2"]
    stages = [json.loads(open(run.log.parent / f"pp2.pp{p}.jsonl").readline()) for p in (0, 1)]
    assert [s["layers_logged"] for s in stages] == [[0, 1], [2, 3]]
    assert [s["parallel"]["writer"]["pp_rank"] for s in stages] == [0, 1]
    merged(run)
    meta, _, requests, end = read_log(run.log)
    assert meta["layers_logged"] == LAYERS and meta["parallel"]["pipeline_parallel_size"] == 2
    assert len(requests["request"]) == end["requests"] == 7  # once, though both stages saw them
    check_against_oracle(run, models["top2"], LAYERS, GPU_WEIGHT_TOL, GPU_TIE_GAP, max_ties=0.05)


def test_dp2_ep_each_request_once_with_the_users_ids(runs, models):
    run = runs["dp2"]
    shards = [run.log.parent / f"dp2.dp{d}.jsonl" for d in (0, 1)]
    served = {}
    for d, shard in enumerate(shards):
        meta, routes, requests, _ = read_log(shard)
        assert meta["parallel"]["expert_parallel"] and meta["parallel"]["writer"]["dp_rank"] == d
        assert all(r["dp_rank"] == d for r in requests["request"] + requests["request_end"])
        # The samples of an n=2 request are engine requests of their own: the DP
        # balancer may send them to different ranks.
        for r in requests["request"]:
            key = (r["req_id"], r.get("sample", 0))
            assert key not in served, f"{key} on two DP ranks"
            served[key] = d
        assert {(r["req_id"], r.get("sample", 0)) for r in routes} <= set(served)
    assert sorted(served) == sorted((o["id"], s) for o in run.result["outputs"] for s in range(len(o["samples"])))
    summary = merged(run)
    # vLLM kills a DP engine core that has not exited 5 s after shutdown began; the
    # shard then ends with its provisional 'end' (written while no request was open).
    report(run, Counter(**{f"dp{d}_requests": list(served.values()).count(d) for d in (0, 1)},
                        shards_not_shut_down=len(summary["shards_not_shut_down"])))
    check_against_oracle(run, models["top2"], LAYERS, GPU_WEIGHT_TOL, GPU_TIE_GAP, max_ties=0.05)
