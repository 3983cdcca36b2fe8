"""The JSONL renderer and the writer's file life cycle, without an engine."""

import json

import numpy as np
import pytest
import torch

from vllm.model_executor.layers.fused_moe.route_log_writer import (
    RequestEnd,
    RequestStart,
    RouteLogWriter,
    StepRoutes,
    render_routes,
    render_routes_plain,
)


def random_step(seed: int, top_k: int, num_experts: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    rows = 40
    num_layers = 3
    ids = rng.integers(0, num_experts, (rows, num_layers, top_k)).astype(np.int32)
    weights = (rng.random((rows, num_layers, top_k)) * scale).astype(np.float32)
    weights[0, 0, 0] = 1.0
    weights[1, 0, 0] = 0.0
    spans = [(b'"req_id":"a",', 0, 0, 7), (b'"req_id":"longer-id\\"q",', 118, 7, 8),
             (b'"req_id":"p","sample":1,', 9995, 10, 40)]  # rows 8-9 belong to nobody
    return ids, weights, spans, [0, 5, 23]


def parse(blob: bytes) -> list[dict]:
    return [json.loads(line) for line in bytes(blob).decode().splitlines()]


@pytest.mark.parametrize("top_k, num_experts, scale", [(2, 8, 1.0), (4, 60, 1.0), (8, 256, 2.5), (1, 1000, 16.0)])
def test_fast_renderer_equals_the_plain_one(top_k, num_experts, scale):
    step = random_step(top_k, top_k, num_experts, scale)
    fast, slow = parse(render_routes(*step)), parse(render_routes_plain(*step))
    assert len(fast) == len(slow) == (7 + 1 + 30) * 3
    for f, s in zip(fast, slow):
        assert {k: v for k, v in f.items() if k != "topk_weights"} == {k: v for k, v in s.items() if k != "topk_weights"}
        assert np.allclose(f["topk_weights"], s["topk_weights"], atol=6e-10, rtol=0)


def test_records_carry_the_right_rows():
    ids, weights, spans, layers = random_step(0, 2, 8)
    records = parse(render_routes(ids, weights, spans, layers))
    last = records[-1]
    assert (last["req_id"], last["sample"], last["token_idx"], last["layer"]) == ("p", 1, 10024, 23)
    assert last["topk_ids"] == ids[39, 2].tolist()
    assert np.allclose(last["topk_weights"], weights[39, 2], atol=6e-10)
    assert records[21]["req_id"] == 'longer-id"q' and records[21]["token_idx"] == 118
    assert records[0]["topk_weights"][0] == 1.0


def test_values_the_fast_path_cannot_write_fall_back_to_json():
    ids, weights, spans, layers = random_step(0, 2, 8)
    ids[3, 1, 0] = -1
    weights[4, 2, 1] = np.nan
    records = parse(render_routes(ids, weights, spans, layers))
    assert records[3 * 3 + 1]["topk_ids"][0] == -1
    assert records[4 * 3 + 2]["topk_weights"][1] is None


def test_nothing_scheduled_renders_nothing():
    assert render_routes(np.zeros((0, 1, 2), np.int32), np.zeros((0, 1, 2), np.float32), [], [0]) == b""


class FakeRequest:
    req_id, engine_req_id, sample = "r1", "r1-0123abcd", None
    prompt_len, prompt_tokens_cached, routed, recomputed = 5, 0, 7, 0


def test_an_idle_writer_leaves_a_provisional_end(tmp_path):
    """A process killed while no request runs leaves a log that says so."""
    path = tmp_path / "log.jsonl"
    writer = RouteLogWriter(str(path), {"type": "meta"}, max_pending_steps=4,
                            end_fields=lambda: {"requests_not_logged": 3})
    assert parse(path.read_bytes())[-1]["final"] is False
    ids, weights, spans, layers = random_step(0, 2, 8)
    writer.put(RequestStart(FakeRequest()))
    writer.put(StepRoutes(torch.from_numpy(ids), torch.from_numpy(weights), None, spans, layers))
    writer._queue.join()
    assert parse(path.read_bytes())[-1]["type"] == "route"  # a request is open: no end
    writer.put(RequestEnd(FakeRequest(), finished=True))
    writer._queue.join()
    provisional = parse(path.read_bytes())
    assert [r["type"] for r in provisional].count("end") == 1
    assert provisional[-1] | {"ended_at": None} == {
        "type": "end", "final": False, "steps": 1, "route_records": 38 * 3, "requests": 1,
        "requests_ended": 1, "engine_waits": 0, "requests_not_logged": 3, "write_error": None,
        "ended_at": None}
    writer.put(RequestStart(FakeRequest()))
    writer.close()
    lines = parse(path.read_bytes())
    assert [r["type"] for r in lines] == ["meta", "request", *["route"] * 114, "request_end",
                                          "request", "end"]
    assert lines[-1]["final"] is True and lines[-1]["requests"] == 2


def test_writer_life_cycle(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("old contents\n")
    writer = RouteLogWriter(str(path), {"type": "meta", "x": 1}, max_pending_steps=1)
    with pytest.raises(ValueError, match="being written by another engine"):
        RouteLogWriter(str(path), {"type": "meta"}, max_pending_steps=1)
    ids, weights, spans, layers = random_step(0, 2, 8)
    for _ in range(5):  # a queue of one: the writer pushes back instead of dropping
        writer.put(StepRoutes(torch.from_numpy(ids), torch.from_numpy(weights), None, spans, layers))
    writer.put(RequestEnd(FakeRequest(), finished=True))
    writer.close()
    writer.close()
    lines = parse(path.read_bytes())
    assert lines[0] == {"type": "meta", "x": 1}
    assert sum(r["type"] == "route" for r in lines) == 5 * 38 * 3
    assert lines[-2] == {"type": "request_end", "req_id": "r1", "routed_positions": 7,
                         "recomputed_positions": 0, "finished": True}
    end = lines[-1]
    assert (end["type"], end["final"], end["steps"], end["route_records"], end["requests_ended"]) == (
        "end", True, 5, 570, 1)
    assert end["write_error"] is None
