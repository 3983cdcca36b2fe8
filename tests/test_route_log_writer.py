"""The JSONL renderer and the writer process's life cycle, without an engine: the
engine side is driven the way the model runner drives it (begin_step, end_forward)."""

import json
import os
from dataclasses import replace
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import wait_until
from vllm.model_executor.layers.fused_moe import route_logger
from vllm.model_executor.layers.fused_moe.route_log.config import RouteLogConfig, RouteLogError
from vllm.model_executor.layers.fused_moe.route_log.front_end import ReturnedReader, ReturnedTokens
from vllm.model_executor.layers.fused_moe.route_log.writer.render import (
    fields_text,
    render_rows,
    render_rows_plain,
    request_end_line,
    request_line,
    request_prefix,
)
from vllm.model_executor.layers.fused_moe.route_log.engine.requests import HeldStep, Request, Slots, sample_index
from vllm.model_executor.layers.fused_moe.route_log.writer.store import BlockRoutes


def random_rows(seed: int, top_k: int, num_experts: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    rows, layers = 40, [0, 5, 23]
    ids = rng.integers(0, num_experts, (rows, len(layers), top_k)).astype(np.int32)
    weights = (rng.random((rows, len(layers), top_k)) * scale).astype(np.float32)
    weights[0, 0, 0] = 1.0
    weights[1, 0, 0] = 0.0
    names = [b'"req_id":"a",', b'"req_id":"longer-id\\"q",', b'"req_id":"p","sample":1,']
    owner = np.repeat([0, 1, 2], [7, 1, 32])
    prefixes = np.full((rows, max(map(len, names))), ord(" "), np.uint8)
    for row, o in enumerate(owner):
        prefixes[row, : len(names[o])] = np.frombuffer(names[o], np.uint8)
    positions = np.concatenate([np.arange(7), [118], np.arange(9995, 10027)])
    return ids, weights, prefixes, positions, layers


def parse(blob) -> list[dict]:
    return [json.loads(line) for line in bytes(blob).decode().splitlines()]


@pytest.mark.parametrize("top_k, num_experts, scale", [(2, 8, 1.0), (4, 60, 1.0), (8, 256, 2.5), (1, 1000, 16.0)])
def test_fast_renderer_equals_the_plain_one(top_k, num_experts, scale):
    rows = random_rows(top_k, top_k, num_experts, scale)
    fast, slow = parse(render_rows(*rows)), parse(render_rows_plain(*rows))
    assert len(fast) == len(slow) == 40 * 3
    for f, s in zip(fast, slow):
        assert {k: v for k, v in f.items() if k != "topk_weights"} == {k: v for k, v in s.items() if k != "topk_weights"}
        assert np.allclose(f["topk_weights"], s["topk_weights"], atol=6e-10, rtol=0)


def test_records_carry_the_right_rows():
    ids, weights, prefixes, positions, layers = random_rows(0, 2, 8)
    records = parse(render_rows(ids, weights, prefixes, positions, layers))
    last = records[-1]
    assert (last["req_id"], last["sample"], last["token_idx"], last["layer"]) == ("p", 1, 10026, 23)
    assert last["topk_ids"] == ids[39, 2].tolist()
    assert np.allclose(last["topk_weights"], weights[39, 2], atol=6e-10)
    assert records[21]["req_id"] == 'longer-id"q' and records[21]["token_idx"] == 118
    assert records[0]["topk_weights"][0] == 1.0


def test_values_the_fast_path_cannot_write_fall_back_to_json():
    ids, weights, prefixes, positions, layers = random_rows(0, 2, 8)
    ids[3, 1, 0] = -1
    weights[4, 2, 1] = np.nan
    records = parse(render_rows(ids, weights, prefixes, positions, layers))
    assert records[3 * 3 + 1]["topk_ids"][0] == -1
    assert records[4 * 3 + 2]["topk_weights"][1] is None


def test_nothing_scheduled_renders_nothing():
    empty = np.zeros((0, 1, 2), np.int32)
    assert render_rows(empty, empty.view(np.float32), np.zeros((0, 4), np.uint8), np.zeros(0), [0]) == b""


@pytest.mark.parametrize("req_id, sample, fields", [
    ("a", None, {}), ('q"\\ü-7', 3, {"dp_rank": 1}), ("chatcmpl-9f", 0, {"dp_rank": 0})])
def test_request_records_are_the_json_of_their_fields(req_id, sample, fields):
    """The writer renders request records from the fields the engine sends; they are
    byte for byte what json.dumps makes of the same record."""
    prefix = request_prefix(req_id, sample)
    head = {"req_id": req_id} | ({} if sample is None else {"sample": sample})
    want = {"type": "request", **head, "engine_req_id": f"{sample}_{req_id}-0123abcd", "prompt_len": 5,
            "prompt_tokens_cached": 2, **fields}
    assert request_line(prefix, want["engine_req_id"], 5, 2, fields_text(fields)) == dumps(want)
    counts = {"routed_positions": 9, "recomputed_positions": 1, "cached_positions": 4}
    want = {"type": "request_end", **head, "finished": False, **counts, **fields}
    assert request_end_line(prefix, False, 9, 1, 4, -1, -1, fields_text(fields)) == dumps(want)
    drafts = {"accepted_draft_positions": 0, "rejected_draft_positions": 6}
    want = {"type": "request_end", **head, "finished": True, **counts, **drafts, **fields}
    assert request_end_line(prefix, True, 9, 1, 4, 0, 6, fields_text(fields)) == dumps(want)


def test_any_request_id_reaches_the_log_as_given(tmp_path):
    """Ids travel to the writer as text: quotes, non-ASCII, even a lone surrogate (valid in a
    Python str, not in UTF-8) come back in the log as the caller gave them."""
    path = tmp_path / "log.jsonl"
    logger = make_logger(path)
    names = ['q"\\ü', "x\ud800"]
    step(logger, new=[new_request(n) for n in names], batch=[(n, 0, 2) for n in names])
    logger.close()
    lines = lines_of(path)
    assert [r["req_id"] for r in lines if r["type"] == "request"] == names
    assert [r["engine_req_id"] for r in lines if r["type"] == "request"] == [f"{n}-0123abcd" for n in names]
    assert {r["req_id"] for r in lines if r["type"] == "route"} == set(names)
    assert [r["req_id"] for r in lines if r["type"] == "request_end"] == names


def dumps(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


# The engine side, driven as the model runner drives it.

LAYERS, TOP_K = [0, 5, 23], 2


def make_logger(path: Path, buffer_mb: int | None = None, max_rows: int = 64,
                block_store: dict | None = None, speculative: bool = False,
                returned_path: Path | None = None) -> route_logger.RouteLogger:
    env = {"VLLM_LOG_MOE": str(path)} | ({} if buffer_mb is None else {"VLLM_LOG_MOE_BUFFER_MB": str(buffer_mb)})
    meta = {"type": "meta", "schema": 1, "layers_logged": LAYERS, "top_k": TOP_K}
    config = replace(RouteLogConfig.from_env(env), returned_path=returned_path and str(returned_path))
    return route_logger.RouteLogger(config, meta, LAYERS, TOP_K, max_rows,
                                    torch.device("cpu"), str(path), {}, block_store, speculative)


def new_request(name: str, prompt_len: int = 5, cached: int = 0):
    return SimpleNamespace(req_id=f"{name}-0123abcd", external_req_id=name, prompt_token_ids=[1] * prompt_len,
                           prompt_embeds=None, num_computed_tokens=cached)


def step(logger, new=(), finished=(), batch=(), value: int = 0, cached=None, input_ids=None) -> None:
    """One engine step: ``batch`` is [(request name, first position, rows)]; every row
    routes to experts (value, position) with weights (0.75, 0.25)."""
    logger.begin_step(SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached or cached_reqs(),
                                      finished_req_ids={f"{n}-0123abcd" for n in finished}))
    counts = [rows for _, _, rows in batch]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    for (_, first, rows), start in zip(batch, starts):
        logger.ids[start : start + rows, :, 0] = value
        logger.ids[start : start + rows, :, 1] = torch.arange(first, first + rows)[:, None] % 1000
        logger.weights[start : start + rows] = torch.tensor([0.75, 0.25])
    logger.end_forward([f"{n}-0123abcd" for n, _, _ in batch], starts,
                       np.array([first for _, first, _ in batch], dtype=np.int32), input_ids)


def lines_of(path: Path) -> list[dict]:
    data = path.read_bytes()
    return parse(data[: data.rfind(b"\n") + 1])


def tail_is(path: Path, kind: str, count: int | None = None) -> bool:
    """While the writer runs: a read can catch a line half written, or the provisional
    'end' half replaced by the next write; such a read is taken as 'not yet'."""
    try:
        lines = lines_of(path)
    except ValueError:
        return False
    return bool(lines) and lines[-1]["type"] == kind and count in (None, len(lines))


@pytest.mark.parametrize("engine_id, external, sample", [
    ("7-0123abcd", "7", None), ("1_7-0123abcd", "7", 1), ("12_ab_c-deadbeef", "ab_c", 12),
    ("0_x-0123abcd", "0_x", None), ("3_0_x", "0_x", 3), ("3_0_xy", "0_x", None), ("2_7-0123abcdX", "7", None),
])
def test_sample_index_of_parallel_sampling_children(engine_id, external, sample):
    assert sample_index(engine_id, external) == sample


def test_writer_life_cycle(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("old contents\n")
    logger = make_logger(path)
    with pytest.raises(RouteLogError, match="being written by another engine"):
        make_logger(path)
    step(logger, new=[new_request("a"), new_request("b", 3)], batch=[("a", 0, 5), ("b", 0, 3)])
    step(logger, batch=[("a", 5, 1), ("b", 3, 1)], value=7)
    step(logger, finished=["b"], batch=[("a", 6, 1)])
    logger.close()
    logger.close()
    lines = lines_of(path)
    assert lines[0] == {"type": "meta", "schema": 1, "layers_logged": LAYERS, "top_k": TOP_K,
                        "buffer_bytes": 16 << 20, "format": "jsonl"}
    routes = [r for r in lines if r["type"] == "route"]
    assert [(r["req_id"], r["token_idx"], r["layer"]) for r in routes[:3]] == [("a", 0, 0), ("a", 0, 5), ("a", 0, 23)]
    assert len(routes) == (5 + 3 + 2 + 1) * 3
    assert {(r["req_id"], r["token_idx"]) for r in routes} == {("a", p) for p in range(7)} | {("b", p) for p in range(4)}
    b4 = next(r for r in routes if r["req_id"] == "b" and r["token_idx"] == 3)
    assert b4["topk_ids"] == [7, 3] and b4["topk_weights"] == [0.75, 0.25]
    ends = {r["req_id"]: r for r in lines if r["type"] == "request_end"}
    assert ends["b"] == {"type": "request_end", "req_id": "b", "finished": True, "routed_positions": 4,
                         "recomputed_positions": 0, "cached_positions": 0}
    assert ends["a"]["finished"] is False and ends["a"]["routed_positions"] == 7
    end = lines[-1]
    assert (end["type"], end["final"], end["steps"], end["route_records"], end["requests"],
            end["requests_ended"], end["engine_waits"]) == ("end", True, 3, 33, 2, 2, 0)
    assert end["write_error"] is None


def test_request_end_says_what_the_front_end_returned(tmp_path):
    """The front end appends a line before it aborts a response it cut (a stop string);
    the writer puts it in that request's end. A request the engine ended has none."""
    returned = tmp_path / "returned.jsonl"
    returned.touch()
    logger = make_logger(tmp_path / "log.jsonl", returned_path=returned)
    front_end = ReturnedTokens(str(returned))
    step(logger, new=[new_request("a"), new_request("b")], batch=[("a", 0, 5), ("b", 0, 5)])
    front_end.returned("a-0123abcd", SimpleNamespace(num_output_tokens=lambda: 2))
    step(logger, finished=["a"], batch=[("b", 5, 1)])
    step(logger, finished=["b"])
    logger.close()
    ends = {r["req_id"]: r for r in lines_of(tmp_path / "log.jsonl") if r["type"] == "request_end"}
    assert ends["a"]["returned_tokens"] == 2 and "returned_tokens" not in ends["b"]
    assert "returned_tokens_error" not in lines_of(tmp_path / "log.jsonl")[-1]


def test_a_front_end_that_cannot_note_a_count_says_so_once_and_serves_on(capsys):
    front_end = ReturnedTokens("/dev/full")  # every write: ENOSPC
    for i in range(2):
        front_end.returned(f"r{i}", SimpleNamespace(num_output_tokens=lambda: 3))
    err = capsys.readouterr().err
    assert err.count("VLLM_LOG_MOE: cannot note the tokens returned") == 1 and "no request_end has returned_tokens" in err


def test_returned_counts_are_read_whole_and_only_a_writers_own_kept(tmp_path):
    path = tmp_path / "returned.jsonl"
    path.write_bytes(b'["a-1",3]\n["other",1]\n["b-2",')  # the last line still being appended
    reader = ReturnedReader(str(path))
    assert reader.pop("a-1") == 3 and reader.pop("b-2") is None
    with open(path, "ab") as f:
        f.write(b'5]\n["c\\n\\"",7]\n')
    reader.keep_only({0: "b-2", 1: 'c\n"'})  # "other" was opened by no slot here: another writer's
    assert reader.counts == {}  # b-2's line was not whole when read
    assert reader.pop("b-2") == 5 and reader.pop('c\n"') == 7 and "other" not in reader.counts
    assert ReturnedReader(str(tmp_path / "missing")).error.startswith("the front end's file of returned tokens")


def test_a_batch_seen_before_is_mapped_anew_after_requests_open_or_close(tmp_path):
    """end_forward reuses its last batch's slots while the batch repeats: here the same
    batch comes back after "a" ended and a new "a" took another slot, with "d" in the old one."""
    path = tmp_path / "log.jsonl"
    logger = make_logger(path)
    step(logger, new=[new_request("a"), new_request("b")], batch=[("a", 0, 5), ("b", 0, 5)])
    step(logger, batch=[("a", 5, 1), ("b", 5, 1)])
    step(logger, finished=["a"])  # a step without a forward
    step(logger, new=[new_request("d"), new_request("a")], batch=[("a", 0, 2), ("b", 6, 1)], value=9)
    logger.close()
    routes = [r for r in lines_of(path) if r["type"] == "route" and r["layer"] == 0]
    assert [(r["req_id"], r["token_idx"]) for r in routes[-3:]] == [("a", 0), ("a", 1), ("b", 6)]
    assert [r["topk_ids"][0] for r in routes[-3:]] == [9, 9, 9]
    assert not any(r["req_id"] == "d" for r in routes)


def test_an_idle_writer_leaves_a_provisional_end(tmp_path):
    """A process killed while no request runs leaves a log that says so."""
    path = tmp_path / "log.jsonl"
    logger = make_logger(path)
    logger.channel.count_not_logged("_warmup_0_")
    wait_until(lambda: tail_is(path, "end") and lines_of(path)[-1]["requests_not_logged"] == 1,
               30, "the first provisional end")
    step(logger, new=[new_request("a")], batch=[("a", 0, 5)])
    wait_until(lambda: tail_is(path, "route", 2 + 15), 30, "the step's records")  # a request is open: no end
    step(logger, finished=["a"])
    wait_until(lambda: tail_is(path, "end"), 30, "the provisional end")
    provisional = lines_of(path)
    assert [r["type"] for r in provisional].count("end") == 1
    assert provisional[-1]["writer_max_rss_mb"] > 0
    assert provisional[-1] | {"ended_at": None, "writer_max_rss_mb": None} == {
        "type": "end", "final": False, "steps": 1, "route_records": 15, "requests": 1,
        "requests_ended": 1, "engine_waits": 0, "engine_wait_s": 0.0, "requests_not_logged": 1,
        "requests_not_logged_ids": ["_warmup_0_"], "writer_max_rss_mb": None, "write_error": None,
        "ended_at": None, "cached_route_records": 0, "cached_positions_unknown": 0, "block_store_bytes": 0}
    step(logger, new=[new_request("c")])
    logger.close()
    lines = lines_of(path)
    assert [r["type"] for r in lines] == ["meta", "request", *["route"] * 15, "request_end",
                                          "request", "request_end", "end"]
    assert lines[-1]["final"] is True and lines[-1]["requests"] == 2


def test_a_burst_larger_than_the_buffer_is_written_whole_and_in_order(tmp_path):
    """A 1 MiB ring holds one step of 8,000 rows (0.6 MB), not two: for 30 steps in a
    row the engine waits for room (counted), and no record is lost or reordered."""
    path = tmp_path / "log.jsonl"
    logger = make_logger(path, buffer_mb=1, max_rows=8000)
    step(logger, new=[new_request(f"r{i}", 200) for i in range(40)])
    for s in range(30):
        step(logger, batch=[(f"r{i}", s * 200, 200) for i in range(40)], value=s)
    step(logger, finished=[f"r{i}" for i in range(40)])
    logger.close()
    routes = [r for r in lines_of(path) if r["type"] == "route"]
    assert len(routes) == 30 * 8000 * 3
    order = [(r["token_idx"] // 200, int(r["req_id"][1:]), r["token_idx"], r["layer"]) for r in routes]
    assert order == sorted(order)  # step, then request, then position, then layer
    assert all(r["topk_ids"] == [r["token_idx"] // 200, r["token_idx"] % 1000] for r in routes)
    end = lines_of(path)[-1]
    assert end["final"] is True and end["route_records"] == len(routes) and end["engine_waits"] > 0


def test_a_buffer_smaller_than_one_step_is_refused(tmp_path):
    """40,000 rows x 3 layers x top-2 (ids and weights) plus the row spans: 3.05 MiB."""
    path = tmp_path / "log.jsonl"
    with pytest.raises(RouteLogError, match=r"VLLM_LOG_MOE_BUFFER_MB=1: one step of this engine "
                                            r"needs up to 4 MiB; expected a whole number >= 4"):
        make_logger(path, buffer_mb=1, max_rows=40_000)
    assert not path.exists()


def test_a_dead_writer_stops_the_log_not_the_engine(tmp_path):
    path = tmp_path / "log.jsonl"
    logger = make_logger(path)
    step(logger, new=[new_request("a")], batch=[("a", 0, 5)])
    logger.channel.proc.kill()
    logger.channel.proc.wait()
    for s in range(5):  # the engine goes on; the first call to find the writer gone says so
        step(logger, batch=[("a", 5 + s, 1)])
    assert logger.stopped
    logger.close()
    assert lines_of(path)[-1]["type"] != "end"  # the reader reports the missing end


ENGINE = """
import os, sys, numpy as np
sys.path.insert(0, {tests!r})
from test_route_log_writer import make_logger, new_request, step
from pathlib import Path
logger = make_logger(Path({path!r}))
step(logger, new=[new_request("a")], batch=[("a", 0, 5)])
print(logger.channel.proc.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def test_the_writer_outlives_a_killed_engine_only_to_finish(tmp_path):
    """SIGKILL of the engine's process alone: the writer writes what it was given,
    then exits on its own (no orphan)."""
    path = tmp_path / "log.jsonl"
    code = ENGINE.format(tests=str(Path(__file__).parent), path=str(path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    writer_pid = int(proc.stdout.split()[-1])
    wait_until(lambda: not _alive(writer_pid), 30, "the orphaned writer to exit")
    lines = lines_of(path)
    assert [r["type"] for r in lines] == ["meta", "request", *["route"] * 15]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")


def test_block_store_keeps_routing_by_block_and_offset():
    store = BlockRoutes(block_size=4, num_layers=2, top_k=2)
    store.set_blocks(0, 0, np.array([5, 2], np.int32))
    ids = np.arange(8 * 4, dtype=np.int32).reshape(8, 2, 2)
    weights = ids.astype(np.float32) / 100
    store.put(np.zeros(8, np.int64), np.arange(8), ids, weights)
    store.set_blocks(3, 0, np.array([2, 9], np.int32))  # block 2 (positions 4-7 of slot 0), then one never computed
    got_ids, got_weights, known = store.get(3, 0, 8)
    assert known.tolist() == [True] * 4 + [False] * 4
    assert (got_ids[:4] == ids[4:]).all() and (got_weights[:4] == weights[4:]).all()
    store.set_blocks(3, 1, np.array([5], np.int32))  # appended from block index 1
    assert store.get(3, 4, 8)[2].all() and (store.get(3, 4, 8)[0] == ids[:4]).all()
    assert store.nbytes >= 6 * 2 * 2 * 4 * 10  # 10 blocks of 4 positions, 2 layers, top-2


def cached_reqs(**new_blocks):
    return SimpleNamespace(req_ids=[f"{n}-0123abcd" for n in new_blocks], resumed_req_ids=set(),
                           new_block_ids=list(new_blocks.values()))


def test_prefix_cache_hits_are_replayed_from_the_block_store(tmp_path):
    """Block size 4. 'a' computes blocks 3 and 7; 'b' arrives with 8 positions cached in
    them; 'c' hits block 5, which 'd' computes in the same step; 'e' hits block 6, which
    no forward of this engine computed: a 'gap' record."""
    path = tmp_path / "log.jsonl"
    logger = make_logger(path, block_store={"block_size": 4})

    def request(name, prompt_len, cached, blocks):
        return SimpleNamespace(**vars(new_request(name, prompt_len, cached)), block_ids=(blocks,))

    step(logger, new=[request("a", 10, 0, [3, 7])], batch=[("a", 0, 8)], value=1)
    step(logger, batch=[("a", 8, 2)], value=1, cached=cached_reqs(a=([8],)))
    step(logger, new=[request("b", 10, 8, [3, 7, 4]), request("d", 6, 0, [5, 1]), request("c", 6, 4, [5, 2])],
         batch=[("b", 8, 2), ("d", 0, 6), ("c", 4, 2)], value=2)
    step(logger, new=[request("e", 6, 4, [6, 10])], batch=[("e", 4, 2)], value=3)
    logger.close()
    lines = lines_of(path)
    routes = {(r["req_id"], r["token_idx"], r["layer"]): r for r in lines if r["type"] == "route"}
    for name, computed_by, positions in (("b", "a", range(8)), ("c", "d", range(4))):
        for pos in positions:
            replayed, original = routes[(name, pos, 5)], routes[(computed_by, pos, 5)]
            assert replayed["cached"] is True and "cached" not in original
            assert (replayed["topk_ids"], replayed["topk_weights"]) == (original["topk_ids"], original["topk_weights"])
    assert {(r["req_id"], r["token_idx"]) for r in routes.values() if r["req_id"] in "bc"} == \
        {("b", p) for p in range(10)} | {("c", p) for p in range(6)}
    (gap,) = [r for r in lines if r["type"] == "gap"]
    assert (gap["req_id"], gap["first_token_idx"], gap["last_token_idx"], gap["layers"]) == ("e", 0, 3, LAYERS)
    assert not any(key[0] == "e" and key[1] < 4 for key in routes)
    ends = {r["req_id"]: r for r in lines if r["type"] == "request_end"}
    assert [ends[n]["cached_positions"] for n in "abcde"] == [0, 8, 4, 0, 4]
    end = lines[-1]
    assert end["cached_route_records"] == (8 + 4) * 3 and end["cached_positions_unknown"] == 4
    assert end["route_records"] == len(routes) and end["block_store_bytes"] >= 6 * 2 * 3 * 4 * 11


def test_token_ids_come_once_per_request(tmp_path):
    """Prompt ids in the 'request' record; the ids fed after the prompt (the model
    runner's input ids of those rows) in 'request_end'."""
    path = tmp_path / "log.jsonl"
    logger = make_logger(path)
    a = SimpleNamespace(**vars(new_request("a", 3)) | {"prompt_token_ids": [11, 12, 13]})
    b = SimpleNamespace(**vars(new_request("b", 2)) | {"prompt_token_ids": [21, 22]})
    embeds = SimpleNamespace(**vars(new_request("e", 2)) | {"prompt_token_ids": None,
                                                            "prompt_embeds": SimpleNamespace(shape=(2,))})
    step(logger, new=[a, b, embeds], batch=[("a", 0, 3), ("b", 0, 2), ("e", 0, 2)],
         input_ids=torch.tensor([11, 12, 13, 21, 22, 0, 0, -1]))
    step(logger, batch=[("a", 3, 1), ("b", 2, 1), ("e", 2, 1)], input_ids=torch.tensor([14, 23, 31, -1]))
    step(logger, finished=["b"], batch=[("a", 4, 1)], input_ids=torch.tensor([15]))
    step(logger, finished=["a", "e"])
    logger.close()
    lines = lines_of(path)
    starts = {r["req_id"]: r for r in lines if r["type"] == "request"}
    ends = {r["req_id"]: r for r in lines if r["type"] == "request_end"}
    assert starts["a"]["prompt_token_ids"] == [11, 12, 13] and starts["b"]["prompt_token_ids"] == [21, 22]
    assert ends["a"]["generated_token_ids"] == [14, 15] and ends["b"]["generated_token_ids"] == [23]
    # A prompt of embeddings: no ids, so where generation starts is not known to the writer.
    assert starts["e"]["prompt_token_ids"] == [] and "generated_token_ids" not in ends["e"]


def test_a_speculative_step_keeps_the_drafts_each_request_keeps():
    """Five decode spans of 1 + 3 rows: all drafts accepted; the second rejected;
    max_tokens reached after one draft; a stop token among the accepted ones; a stop
    token before min_tokens. A sixth request no caller sent is dropped. Requests that
    ended keep no row of a later step (async scheduling runs one more)."""
    slots = Slots()
    for request in [Request("a", "a", None, 10, 0), Request("b", "b", None, 10, 0),
                    Request("c", "c", None, 10, 0, max_len=12), Request("d", "d", None, 10, 0, stops=(7,)),
                    Request("e", "e", None, 10, 0, stops=(7, 8), stop_from=12)]:
        slots.open(request)
    first = np.arange(6) * 4
    step = HeldStep(slots=np.array([0, 1, 2, 3, 4, -1]), first=first, ends=first + 4, pos=np.full(6, 10),
                    num_rows=24, input_ids=None, drafts=np.full(6, 3))
    tokens = np.array([[5, 5, 5, 5], [5, 5, -1, -1], [5, 5, 5, 5], [5, 7, 5, 5], [7, 5, 8, 5], [5, 5, 5, 5]])
    kept = step.verified(tokens, slots)
    assert kept.slots.tolist() == [0, 1, 2, 3, 4]
    # a: every row; b: the row before its drafts and one draft; c: 11 tokens before the
    # step and 12 at most, so only position 10 is fed; d: the drafts up to the stop token;
    # e: its first stop (position 11) comes before min_tokens, its second (13) ends it
    assert (kept.ends - kept.first).tolist() == [4, 2, 1, 2, 3]
    assert kept.accepted.tolist() == [3, 1, 0, 1, 2] and kept.rejected.tolist() == [0, 2, 3, 2, 1]
    assert slots.ended[:5].tolist() == [False, False, True, True, True]
    again = replace(step, pos=np.full(6, 14)).verified(tokens, slots)
    assert (again.ends - again.first).tolist() == [4, 2, 0, 0, 0]
    assert again.rejected.tolist() == [0, 2, 3, 3, 3]


def test_async_scheduling_positions_ahead_of_rejected_drafts_are_reattached(tmp_path):
    """Model Runner V2 under async scheduling: the host position of a step scheduled
    before the last step's rejections were known runs ahead by them."""
    path = tmp_path / "log.jsonl"
    logger = make_logger(path, speculative=True)
    params = SimpleNamespace(max_tokens=50, eos_token_id=None, stop_token_ids=None)
    a = SimpleNamespace(**vars(new_request("a", 4)) | {"sampling_params": params, "block_ids": ([],)})
    cached = SimpleNamespace(req_ids=["a-0123abcd"], resumed_req_ids=set(), new_block_ids=[None])
    true_pos = [0, 4, 5, 7]  # the runner's committed positions: step 2 rejects its one draft
    host_pos = [0, 4, 6, 7]  # step 3 was scheduled before step 2's rejection was seen
    rows = [4, 2, 2, 2]
    drafts = [0, 1, 1, 1]
    num_sampled = [1, 1, 2, 2]
    for i in range(4):
        logger.begin_step(SimpleNamespace(scheduled_new_reqs=[a] if i == 0 else [],
                                          scheduled_cached_reqs=cached, finished_req_ids=set(),
                                          scheduled_spec_decode_tokens={"a-0123abcd": [0] * drafts[i]}))
        positions = torch.arange(true_pos[i], true_pos[i] + rows[i], dtype=torch.int32)
        logger.ids[: rows[i], :, 0] = positions[:, None]
        logger.ids[: rows[i], :, 1] = 0
        logger.end_forward(["a-0123abcd"], np.array([0, rows[i]]), np.array([host_pos[i]]), positions + 100)
        logger.end_sample(torch.full((1, 2), 9), torch.tensor([num_sampled[i]]))
    logger.close()
    lines = lines_of(path)
    logged = sorted(r["token_idx"] for r in lines if r["type"] == "route" and r["layer"] == 0)
    assert logged == list(range(9))
    assert all(r["topk_ids"][0] == r["token_idx"] for r in lines if r["type"] == "route")
    end = next(r for r in lines if r["type"] == "request_end")
    assert (end["accepted_draft_positions"], end["rejected_draft_positions"]) == (2, 1)
