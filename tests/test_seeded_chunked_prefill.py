"""Seeded sampling with chunked prefill on the CPU: vLLM's V1 runner rewinds a request's
generator after a chunk whose token it discards with set_offset, which CPU generators
do not have ("CPU Generator does not use offset": every such request failed, and the
server died). The fork puts the generator's state back instead (fork/patches, V1 runner):
the seeded tokens with 32-token chunks are those of unchunked prefills, and the log of
the chunked run holds every position once."""

import pytest

from conftest import engine_kwargs, run_engine
from route_checks import check_against_oracle, check_token_ids, prompts

pytestmark = pytest.mark.engine


def workload(model, budget: int) -> dict:
    p = prompts(3, [50, 40, 10, 70])
    requests = [{"id": f"s-{i}", "prompt_token_ids": p[i],
                 "sampling": {"temperature": 1.0, "seed": 7 + i, "max_tokens": 8, "ignore_eos": True,
                              "detokenize": False}} for i in range(4)]
    return {"model": str(model), "engine": engine_kwargs(max_num_batched_tokens=budget), "waves": [requests]}


def test_seeded_requests_survive_chunked_prefill_and_sample_as_unchunked(models, tmp_path):
    runs = {}
    for budget in (32, 256):
        env = {"VLLM_LOG_MOE": str(tmp_path / f"{budget}.jsonl"), "VLLM_LOG_MOE_LAYERS": "all"} if budget == 32 else {}
        runs[budget] = run_engine(tmp_path / str(budget), workload(models["top2"], budget), env)
        assert runs[budget].returncode == 0, runs[budget].output[-3000:]
    assert runs[32].result["outputs"] == runs[256].result["outputs"]
    check_token_ids(runs[32])
    check_against_oracle(runs[32], models["top2"], layers=[0, 1, 2, 3])
