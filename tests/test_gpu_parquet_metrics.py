"""The parquet log and the /metrics counters on a GPU, in vLLM's default mode (V2 runner,
torch.compile, CUDA graphs): one engine writes both; every record matches the oracle and
the counters equal the log's counts. Run through the device tool; skipped without CUDA."""

import pytest
import torch

from analysis.convert import convert
from conftest import run_engine
from route_checks import check_against_oracle, with_repeated_prompt
from test_gpu_route_log import GPU_TIE_GAP, GPU_WEIGHT_TOL, gpu_spec
from test_route_log_metrics import expert_counts, log_counts, parsed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_parquet_log_and_metrics_under_cuda_graphs(models, tmp_path):
    log = tmp_path / "routes.parquet"
    env = {"VLLM_LOG_MOE": str(log), "VLLM_LOG_MOE_LAYERS": "all", "VLLM_LOG_MOE_METRICS": "1"}
    run = run_engine(tmp_path / "run", with_repeated_prompt(gpu_spec(models["top2"])), env)
    assert run.returncode == 0, run.output[-4000:]
    convert(log, tmp_path / "routes.jsonl")
    as_jsonl = type(run)(run.returncode, run.result, run.output, tmp_path / "routes.jsonl", run.workdir)
    counts = check_against_oracle(as_jsonl, models["top2"], [0, 1, 2, 3], GPU_WEIGHT_TOL, GPU_TIE_GAP,
                                  max_ties=0.05)  # as test_gpu_route_log: near-ties of the fp32 GPU numerics
    assert counts["cached"] > 0
    assert expert_counts(parsed(run.result["metrics"])) == log_counts(log)
