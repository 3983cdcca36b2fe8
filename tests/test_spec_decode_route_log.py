"""Speculative decoding (n-gram) on the CPU backend: only the target model's routing
of accepted tokens is logged, once per position. One engine with n-gram drafts and one
without, on the same greedy requests; the first is also held to the HF oracle."""

import pytest

from conftest import engine_kwargs, run_engine
from route_checks import (
    assert_same_greedy_routing, check_against_oracle, check_token_ids, greedy, prompts, read_log,
)

pytestmark = pytest.mark.engine
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
WEIGHT_TOL = 1e-5  # fp32 on the CPU: a draft's row and the same position computed alone


def spec_workload(model, speculative: bool) -> dict:
    """Greedy requests whose outputs repeat (the tiny model loops), so n-gram drafts
    are accepted and rejected; 32-token steps force chunked prefill; a 200-token prompt
    sent again once the first has finished comes from the prefix cache."""
    p = prompts(5, [20, 30, 12, 40, 200])
    first = [{"id": f"g-{i}", "prompt_token_ids": p[i], "sampling": greedy(t)} for i, t in enumerate([30, 24, 40, 18])]
    first.append({"id": "long-a", "prompt_token_ids": p[4], "sampling": greedy(12)})
    second = [{"id": "long-b", "prompt_token_ids": p[4], "sampling": greedy(20)}]
    extra = {"speculative_config": NGRAM} if speculative else {}
    return {"model": str(model), "wave_gap_steps": 10**6,
            "engine": engine_kwargs(max_model_len=512, enable_prefix_caching=True, **extra),
            "waves": [first, second]}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec")
    out = {}
    for name, speculative in (("ngram", True), ("plain", False)):
        env = {"VLLM_LOG_MOE": str(tmp / f"{name}.jsonl"), "VLLM_LOG_MOE_LAYERS": "all"}
        run = run_engine(tmp / name, spec_workload(models["top2"], speculative), env)
        assert run.returncode == 0, run.output[-3000:]
        out[name] = run
    return out


def test_drafts_were_accepted_and_rejected(runs):
    _, _, requests, end = read_log(runs["ngram"].log)
    accepted = sum(r["accepted_draft_positions"] for r in requests["request_end"])
    rejected = sum(r["rejected_draft_positions"] for r in requests["request_end"])
    assert accepted > 50 and rejected > 10, (accepted, rejected)
    runs["ngram"].assert_log_closed(end)


def test_every_accepted_position_once_and_equal_to_the_oracle(runs, models):
    counts = check_against_oracle(runs["ngram"], models["top2"], layers=[0, 1, 2, 3])
    assert counts["cached"] == 128 * 4  # long-b's first KV block, 4 layers
    check_token_ids(runs["ngram"])


def test_the_same_routing_as_without_speculative_decoding(runs):
    assert_same_greedy_routing(runs["ngram"], runs["plain"], "ngram_vs_plain", 0, WEIGHT_TOL)
