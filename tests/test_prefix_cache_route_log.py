"""Prefix caching on (vLLM's default), with requests that arrive after their prefix was
cached, a parallel-sampling request among them, and preemption: one engine on the CPU
backend (128-token KV blocks), its log held to the HF oracle position by position."""

import pytest

from conftest import engine_kwargs, run_engine
from route_checks import check_against_oracle, greedy, prompts, read_log

pytestmark = pytest.mark.engine
SHARED = 256  # two full KV blocks


@pytest.fixture(scope="module")
def shared_prefix(models, tmp_path_factory):
    """'base' computes a 266-token prompt. Once it has finished, four sequences whose
    prompts start with its first 256 tokens arrive: 's1', 's3' and the two samples of
    's2' (n=2). Six KV blocks: two shared, one more each, so they are all admitted;
    the fourth block each needs at position 384 is not there, and the scheduler
    preempts."""
    tmp = tmp_path_factory.mktemp("prefix")
    base, *tails = prompts(11, [266, 100, 100, 100])
    sharers = [base[:SHARED] + t for t in tails]
    sampled = {"temperature": 1.0, "n": 2, "max_tokens": 40, "ignore_eos": True, "detokenize": False}
    spec = {
        "model": str(models["top2"]), "wave_gap_steps": 10**6,
        "engine": engine_kwargs(max_model_len=512, max_num_batched_tokens=64, max_num_seqs=8,
                                num_gpu_blocks_override=6, enable_prefix_caching=True),
        "waves": [[{"id": "base", "prompt_token_ids": base, "sampling": greedy(3)}],
                  [{"id": "s1", "prompt_token_ids": sharers[0], "sampling": greedy(40)},
                   {"id": "s2", "prompt_token_ids": sharers[1], "sampling": sampled},
                   {"id": "s3", "prompt_token_ids": sharers[2], "sampling": greedy(40)}]],
    }
    run = run_engine(tmp / "run", spec, {"VLLM_LOG_MOE": str(tmp / "routes.jsonl"), "VLLM_LOG_MOE_LAYERS": "all"})
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_every_position_is_logged_and_matches_the_oracle(shared_prefix, models):
    counts = check_against_oracle(shared_prefix, models["top2"], layers=[0, 1, 2, 3])
    assert counts["cached"] == 4 * SHARED * 4  # four sequences, 256 positions, 4 layers


def test_the_cached_prefix_is_replayed_from_the_request_that_computed_it(shared_prefix):
    _, routes, requests, end = read_log(shared_prefix.log)
    computed = {(r["token_idx"], r["layer"]): r for r in routes if r["req_id"] == "base"}
    replayed = [r for r in routes if r.get("cached")]
    assert {(r["req_id"], r.get("sample")) for r in replayed} == {("s1", None), ("s2", 0), ("s2", 1), ("s3", None)}
    for r in replayed:
        original = computed[(r["token_idx"], r["layer"])]
        assert (r["topk_ids"], r["topk_weights"]) == (original["topk_ids"], original["topk_weights"])
    assert end["cached_route_records"] == len(replayed) and end["cached_positions_unknown"] == 0
    assert all(r["cached_positions"] == SHARED for r in requests["request_end"] if r["req_id"] != "base")
    shared_prefix.assert_log_closed(end)


def test_preempted_sequences_log_recomputed_positions_once(shared_prefix):
    _, _, requests, _ = read_log(shared_prefix.log)
    recomputed = {(r["req_id"], r.get("sample")): r["recomputed_positions"] for r in requests["request_end"]}
    assert sum(recomputed.values()) > 0, f"no preemption happened: {recomputed}"
