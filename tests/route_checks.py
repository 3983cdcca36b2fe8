"""Shared by the CPU and GPU engine tests: workloads, the log reader, and the check
of a log against the HF oracle."""

import json
import os
from collections import Counter

import numpy as np

from conftest import EngineRun, engine_kwargs
from oracle import TIE_GAP, RoutingOracle

WEIGHT_TOL = 1e-5


def prompts(seed: int, lengths: list[int], vocab: int = 1024) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    firsts = rng.permutation(vocab)[: len(lengths)]  # no two prompts share a cache block
    return [[int(f)] + rng.integers(0, vocab, n - 1).tolist() for f, n in zip(firsts, lengths)]


def greedy(max_tokens: int) -> dict:
    return {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True, "detokenize": False}


def top2_spec(model) -> dict:
    """Mixed waves: the second joins a running batch; lengths force chunked prefill
    (32-token budget); one parallel-sampling request (n=2)."""
    p = prompts(0, [5, 23, 40, 71, 12, 50])
    first = [{"id": f"req-{i}", "prompt_token_ids": p[i], "sampling": greedy(t)} for i, t in enumerate([6, 9, 12, 4])]
    # No per-request seed: vLLM 0.31 CPU fails seeded sampling under chunked prefill
    # ("CPU Generator does not use offset"); the engine seed keeps runs alike.
    sampled = {"temperature": 1.0, "n": 2, "max_tokens": 7, "ignore_eos": True, "detokenize": False}
    second = [
        {"id": "late_4", "prompt_token_ids": p[4], "sampling": greedy(8)},
        {"id": "pair_5", "prompt_token_ids": p[5], "sampling": sampled},
    ]
    return {"model": str(model), "engine": engine_kwargs(), "waves": [first, second]}


def with_repeated_prompt(spec: dict) -> dict:
    """The same 200-token prompt early and again in a last wave: the repeat's full KV
    blocks that the first has computed come from the prefix cache, skipping the forward
    (one 128-token block on the CPU, up to twelve 16-token blocks on a GPU). With it, a
    parallel-sampling request (n=2) that shares its first 130 tokens and goes on
    differently."""
    (long_prompt,) = prompts(3, [200])
    (other,) = prompts(4, [40])
    sampled = {"temperature": 1.0, "n": 2, "max_tokens": 6, "ignore_eos": True, "detokenize": False}
    spec["waves"][0].append({"id": "rep-a", "prompt_token_ids": long_prompt, "sampling": greedy(5)})
    spec["waves"].append([{"id": "rep-b", "prompt_token_ids": long_prompt, "sampling": greedy(5)},
                          {"id": "share", "prompt_token_ids": long_prompt[:130] + other, "sampling": sampled}])
    return spec


def check_token_ids(run) -> None:
    """The prompt in each 'request' record, the generated tokens fed back (all but the
    last) in its 'request_end', for every sample: what the caller got."""
    _, _, requests, _ = read_log(run.log)
    starts = {(r["req_id"], r.get("sample")): r for r in requests["request"]}
    ends = {(r["req_id"], r.get("sample")): r for r in requests["request_end"]}
    for out in run.result["outputs"]:
        for s, generated in enumerate(out["samples"]):
            key = (out["id"], s if len(out["samples"]) > 1 else None)
            assert starts[key]["prompt_token_ids"] == out["prompt_token_ids"], key
            assert ends[key]["generated_token_ids"] == generated[:-1], key


def greedy_outputs(run) -> list[dict]:
    return [
        {"id": o["id"], "samples": o["samples"]} for o in run.result["outputs"] if len(o["samples"]) == 1
    ]


def routes_by_key(run) -> dict:
    """{(req_id, sample, token_idx, layer): route record}; each key logged once."""
    _, routes, _, _ = read_log(run.log)
    keyed = {(r["req_id"], r.get("sample", 0), r["token_idx"], r["layer"]): r for r in routes}
    assert len(keyed) == len(routes), "a (request, position, layer) was logged twice"
    return keyed


def assert_same_greedy_routing(run_a, run_b, label: str, max_differ: float, weight_tol: float) -> None:
    """The greedy requests of two runs: same tokens, the same records, ids equal but
    for a fraction ``max_differ`` (near-ties), weights within ``weight_tol`` where
    they are; the measured values go to the report as ``label``."""
    assert greedy_outputs(run_a) == greedy_outputs(run_b)
    a, b = routes_by_key(run_a), routes_by_key(run_b)
    greedy_ids = {o["id"] for o in greedy_outputs(run_a)}
    shared = [k for k in a if k[0] in greedy_ids]
    assert shared and set(shared) == {k for k in b if k[0] in greedy_ids}
    differ = [k for k in shared if sorted(a[k]["topk_ids"]) != sorted(b[k]["topk_ids"])]
    errors = [
        abs(dict(zip(a[k]["topk_ids"], a[k]["topk_weights"]))[e] - w)
        for k in shared if k not in differ
        for e, w in zip(b[k]["topk_ids"], b[k]["topk_weights"])
    ]
    report(run_a, Counter(**{f"{label}_records": len(shared)}, id_differences=len(differ),
                          max_weight_difference=max(errors)))
    assert len(differ) <= max_differ * len(shared), differ[:5]
    assert max(errors) < weight_tol


def read_log(path) -> tuple[dict, list[dict], dict[str, list[dict]], dict]:
    """meta, routes, {"request": [...], "request_end": [...]}, end"""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "meta" and lines[-1]["type"] == "end"
    assert {r["type"] for r in lines[1:-1]} <= {"route", "request", "request_end"}, "a 'gap' or unknown record"
    requests = {t: [r for r in lines if r["type"] == t] for t in ("request", "request_end")}
    return lines[0], [r for r in lines if r["type"] == "route"], requests, lines[-1]


def check_against_oracle(
    run, model_dir, layers: list[int], weight_tol=WEIGHT_TOL, tie_gap=TIE_GAP, max_ties=0.02
) -> Counter:
    """Every routed position of every request is logged once per layer and equals the
    oracle: same experts (unless the oracle's k-th and (k+1)-th probabilities are
    closer than ``tie_gap``) and weights within ``weight_tol``. Returns the counts and
    the largest weight error seen (also written to $ROUTE_CHECK_REPORT if set)."""
    oracle = RoutingOracle(model_dir, tie_gap)
    _, routes, requests, _ = read_log(run.log)
    # Prompt positions served from the prefix cache are replayed, marked "cached".
    cached = {(r["req_id"], r.get("sample", 0)): r["prompt_tokens_cached"] for r in requests["request"]}
    keys = [(r["req_id"], r.get("sample", 0), r["token_idx"], r["layer"]) for r in routes]
    assert len(keys) == len(set(keys)), "a (request, position, layer) was logged twice"
    logged = dict(zip(keys, routes))
    counts = Counter(max_weight_error=0.0)
    expected = set()
    for out in run.result["outputs"]:
        for sample, generated in enumerate(out["samples"]):
            tokens = out["prompt_token_ids"] + generated[:-1]  # the last token is never fed back
            sample_key = sample if len(out["samples"]) > 1 else 0
            for layer, route in oracle.routes(tokens).items():
                if layer not in layers:
                    continue
                first = cached[(out["id"], sample_key)]
                assert first < len(out["prompt_token_ids"])
                for pos in range(len(tokens)):
                    key = (out["id"], sample_key, pos, layer)
                    expected.add(key)
                    assert key in logged, f"missing {key}"
                    assert logged[key].get("cached", False) == (pos < first), key
                    counts["cached"] += pos < first
                    counts["compared"] += 1
                    if route.tie[pos]:
                        counts["ties"] += 1
                        continue
                    got = dict(zip(logged[key]["topk_ids"], logged[key]["topk_weights"]))
                    want = dict(zip(route.ids[pos].tolist(), route.weights[pos].tolist()))
                    if set(got) != set(want):
                        counts["id_mismatches"] += 1
                        continue
                    error = max(abs(got[e] - w) for e, w in want.items())
                    counts["max_weight_error"] = max(counts["max_weight_error"], error)
    report(run, counts)
    assert set(logged) == expected, f"unexpected records: {sorted(set(logged) - expected)[:5]}"
    assert counts["id_mismatches"] == 0, counts
    assert counts["max_weight_error"] < weight_tol, counts
    assert counts["ties"] <= max_ties * counts["compared"], counts
    return counts


def restricted(log, outputs: list[dict], path) -> EngineRun:
    """A run of just ``outputs``: their records of ``log`` (and the header lines)
    copied to ``path``, for check_against_oracle when the log holds other requests."""
    keep = {o["id"] for o in outputs}
    with open(log) as src, open(path, "w") as dst:
        for line in src:
            record = json.loads(line)
            if "req_id" not in record or record["req_id"] in keep:
                dst.write(line)
    return EngineRun(0, {"outputs": outputs}, "", path, path.parent)


def report(run, counts) -> None:
    path = os.environ.get("ROUTE_CHECK_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"log": str(run.log), **counts}) + "\n")


def stop_spec(model, **engine) -> dict:
    """Eight greedy requests with the stop string "e" (a tokenizer is needed)."""
    sampling = {"max_tokens": 12, "temperature": 0.0, "stop": ["e"], "ignore_eos": True}
    return {"model": str(model), "engine": engine,
            "waves": [[{"id": f"s{i}", "prompt_token_ids": p, "sampling": sampling}
                       for i, p in enumerate(prompts(17, [12 + i for i in range(8)]))]]}


def assert_cut_as_returned(end: dict, prompt: list[int], tokens: list[int], stop_reason) -> None:
    """A response the front end cut at a stop string: request_end says how many tokens
    the caller got; the engine may have computed (and logged) positions past them."""
    logged = end["routed_positions"] + end["cached_positions"]
    fed = end.get("generated_token_ids", [])
    assert fed[: len(tokens)] == tokens[: len(fed)]
    if stop_reason == "e":
        assert end["returned_tokens"] == len(tokens)
        assert logged >= len(prompt) + len(tokens) - 1
    else:  # max_tokens: the engine ended it, at the last token returned
        assert "returned_tokens" not in end and logged == len(prompt) + len(tokens) - 1
