"""The fork on vLLM's CPU backend, checked record by record against the HF oracle.

Engines are expensive here (about a minute each), so each fixture starts one engine
and several tests read its log."""

import pytest

from conftest import engine_kwargs, run_engine, vllm_release
from route_checks import (
    check_against_oracle, check_token_ids, greedy, prompts, read_log, top2_spec, with_repeated_prompt,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def top2(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("top2")
    spec = with_repeated_prompt(top2_spec(models["top2"]))
    on = run_engine(tmp / "on", spec, {"VLLM_LOG_MOE": str(tmp / "routes.jsonl"), "VLLM_LOG_MOE_LAYERS": "all"})
    assert on.returncode == 0, on.output[-3000:]
    off = run_engine(tmp / "off", spec)
    assert off.returncode == 0, off.output[-3000:]
    return on, off


def test_every_record_matches_the_oracle(top2, models):
    on, _ = top2
    counts = check_against_oracle(on, models["top2"], layers=[0, 1, 2, 3])
    assert counts["compared"] > 1000


def test_req_ids_are_the_callers_and_samples_are_told_apart(top2):
    on, _ = top2
    _, routes, requests, _ = read_log(on.log)
    assert {r["req_id"] for r in routes} == {o["id"] for o in on.result["outputs"]}
    assert {r.get("sample") for r in routes if r["req_id"] == "pair_5"} == {0, 1}
    assert all("sample" not in r for r in routes if r["req_id"] not in ("pair_5", "share"))
    starts = {(r["req_id"], r.get("sample")): r for r in requests["request"]}
    ends = {(r["req_id"], r.get("sample")): r for r in requests["request_end"]}
    assert len(starts) == len(requests["request"]) == len(ends) == len(requests["request_end"]) == 11
    for out in on.result["outputs"]:
        if out["id"] in ("rep-b", "share"):
            continue  # the cached prefix: test_prefix_cache_hits_are_replayed
        for s, generated in enumerate(out["samples"]):
            key = (out["id"], s if len(out["samples"]) > 1 else None)
            start, end = starts[key], ends[key]
            assert start["engine_req_id"].startswith(f"{s}_{out['id']}-" if "sample" in start else f"{out['id']}-")
            assert start["prompt_len"] == len(out["prompt_token_ids"])
            assert start["prompt_tokens_cached"] == 0
            assert end["routed_positions"] == len(out["prompt_token_ids"]) + len(generated) - 1
            assert (end["recomputed_positions"], end["finished"]) == (0, True)


def test_meta_header_and_end_record(top2, models):
    on, _ = top2
    meta, routes, requests, end = read_log(on.log)
    assert meta["model_id"] == str(models["top2"])
    assert (meta["top_k"], meta["num_experts"], meta["num_layers"]) == (2, 8, 4)
    assert meta["layers_logged"] == meta["moe_layers"] == [0, 1, 2, 3]
    assert (meta["vllm_version"], meta["seed"], meta["schema"]) == (vllm_release(), 1234, 1)
    assert meta["torch_version"].startswith("2.") and meta["device"].startswith("cpu")
    assert meta["prefix_caching"] is True and "prefix cache" in meta["coverage"]
    assert meta["block_store"] == {"on": True, "block_size": 128, "bytes_per_position_and_layer": 12,
                                   "bound": meta["block_store"]["bound"]}
    assert end["route_records"] == len(routes)
    assert end["requests"] == len(requests["request"]) == end["requests_ended"] == 11
    assert end["requests_not_logged"] == 0  # the V1 runner sends no warm-up requests
    assert end["write_error"] is None
    on.assert_log_closed(end)
    assert meta["parallel"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                                "data_parallel_size": 1, "expert_parallel": False,
                                "writer": {"dp_rank": 0, "pp_rank": 0, "tp_rank": 0},
                                "shards": ["routes.jsonl"]}


def test_logging_off_changes_nothing(top2):
    """Greedy outputs must be identical. The sampled request is left out: its draws
    depend on which step the second wave lands in, which the engine-core process
    decides by timing (its routes are still held to the oracle above)."""
    on, off = top2
    greedy_only = [o for o in on.result["outputs"] if len(o["samples"]) == 1]
    assert len(greedy_only) == 7
    assert [o for o in off.result["outputs"] if len(o["samples"]) == 1] == greedy_only
    assert off.log is None and not list(off.workdir.rglob("*.jsonl"))
    assert off.result["workers"] == [{"active": False, "routers": 4, "hooked": 0}]
    assert on.result["workers"] == [{"active": True, "routers": 4, "hooked": 4}]


def test_prefix_cache_hits_are_replayed(top2):
    """Positions served from the prefix cache get the records of the forward that
    computed their block (rep-a's), marked cached; the oracle check above holds them
    to the oracle as well."""
    on, _ = top2
    _, routes, requests, end = read_log(on.log)
    cached = {(r["req_id"], r.get("sample")): r["prompt_tokens_cached"] for r in requests["request"]}
    assert (cached[("rep-a", None)], cached[("rep-b", None)], cached[("share", 0)], cached[("share", 1)]) == (0, 128, 128, 128)
    computed = {(r["token_idx"], r["layer"]): r for r in routes if r["req_id"] == "rep-a"}
    for name in ("rep-b", "share"):
        replayed = [r for r in routes if r["req_id"] == name and r.get("cached")]
        assert sorted((r.get("sample"), r["token_idx"]) for r in replayed if r["layer"] == 0) == sorted(
            (s, p) for s in ((None,) if name == "rep-b" else (0, 1)) for p in range(128))
        for r in replayed:
            original = computed[(r["token_idx"], r["layer"])]
            assert (r["topk_ids"], r["topk_weights"]) == (original["topk_ids"], original["topk_weights"])
    ends = {(r["req_id"], r.get("sample")): r for r in requests["request_end"]}
    assert ends[("rep-b", None)]["routed_positions"] == 200 + 5 - 1 - 128
    assert ends[("rep-b", None)]["cached_positions"] == ends[("share", 1)]["cached_positions"] == 128
    assert end["cached_route_records"] == 3 * 128 * 4 and end["cached_positions_unknown"] == 0


@pytest.fixture(scope="module")
def top4(models, tmp_path_factory):
    """Top-4 of 16 with renormalised weights; decoder layer 1 is dense."""
    tmp = tmp_path_factory.mktemp("top4")
    p = prompts(1, [9, 33, 64])
    spec = {
        "model": str(models["top4"]),
        "engine": engine_kwargs(max_num_batched_tokens=48),
        "waves": [[{"id": f"q{i}", "prompt_token_ids": t, "sampling": greedy(5)} for i, t in enumerate(p)]],
    }
    run = run_engine(tmp / "ok", spec, {"VLLM_LOG_MOE": str(tmp / "ok.jsonl"), "VLLM_LOG_MOE_LAYERS": "0,2-3"})
    assert run.returncode == 0, run.output[-3000:]
    bad = run_engine(tmp / "bad", spec, {"VLLM_LOG_MOE": str(tmp / "bad.jsonl"), "VLLM_LOG_MOE_LAYERS": "1"})
    return run, bad


def test_top4_renormalised_matches_the_oracle(top4, models):
    run, _ = top4
    meta, *_ = read_log(run.log)
    assert meta["layers_logged"] == meta["moe_layers"] == [0, 2, 3] and meta["top_k"] == 4
    assert meta["renormalize"] is True
    check_against_oracle(run, models["top4"], layers=[0, 2, 3])
    _, routes, _, _ = read_log(run.log)
    sums = [sum(r["topk_weights"]) for r in routes]
    assert max(abs(s - 1) for s in sums) < 1e-6


def test_dense_layer_is_a_startup_error_and_nothing_is_written(top4):
    _, bad = top4
    assert bad.returncode != 0
    assert "VLLM_LOG_MOE_LAYERS: layer(s) [1] are not MoE layers; valid MoE layers: 0,2-3" in bad.output
    assert not bad.log.exists()


def test_token_ids_are_logged_once_per_request(top2):
    on, _ = top2
    check_token_ids(on)
