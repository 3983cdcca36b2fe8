"""The route log at the serving loop's edges and under faults, on vLLM's CPU backend:
preemption with recomputation, aborts, SIGKILL mid-run, and a write failure mid-run."""

import json
import os
import resource
import signal

import pytest

from analysis.logfile import read_log as analysis_read_log
from conftest import process_tree, run_engine, wait_until
from oracle import RoutingOracle
from route_checks import check_against_oracle, greedy, prompts, read_log, restricted

pytestmark = pytest.mark.engine
ALL = {"VLLM_LOG_MOE_LAYERS": "all"}


@pytest.fixture(scope="module")
def preempted(models, tmp_path_factory):
    """Five requests that need 2 KV blocks each (CPU blocks hold 128 tokens) share 4
    blocks: the scheduler preempts and later recomputes them from position 0 (prefix
    caching off, so nothing is taken back from the cache). One more is aborted by the
    caller after 3 tokens, while the others run."""
    tmp = tmp_path_factory.mktemp("preempt")
    lengths = [120, 110, 100, 90, 30]
    p = prompts(5, lengths)
    requests = [{"id": f"long-{i}", "prompt_token_ids": p[i], "sampling": greedy(40)} for i in range(4)]
    requests.append({"id": "aborted", "prompt_token_ids": p[4], "sampling": greedy(60)})
    spec = {"model": str(models["top2"]), "requests": requests, "abort_after": {"aborted": 3},
            "engine": {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 256,
                       "max_num_batched_tokens": 64, "max_num_seqs": 8, "seed": 1234,
                       "skip_tokenizer_init": True, "num_gpu_blocks_override": 4,
                       "enable_prefix_caching": False}}
    run = run_engine(tmp / "run", spec, {"VLLM_LOG_MOE": str(tmp / "routes.jsonl"), **ALL},
                     job="async_engine_job.py")
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_recomputed_positions_are_logged_once(preempted, models, tmp_path):
    _, _, requests, end = read_log(preempted.log)
    ends = {r["req_id"]: r for r in requests["request_end"]}
    recomputed = {rid: r["recomputed_positions"] for rid, r in ends.items() if rid != "aborted"}
    assert sum(recomputed.values()) > 0, f"no preemption happened: {recomputed}"
    preempted.assert_log_closed(end)
    # The oracle check asserts every (request, position, layer) exactly once.
    finished = [o for o in preempted.result["outputs"] if o["id"] != "aborted"]
    check_against_oracle(restricted(preempted.log, finished, tmp_path / "finished.jsonl"),
                         models["top2"], layers=[0, 1, 2, 3])


def test_an_aborted_request_keeps_its_records_and_ends(preempted, models):
    _, routes, requests, _ = read_log(preempted.log)
    out = next(o for o in preempted.result["outputs"] if o["id"] == "aborted")
    assert out["aborted"] and 3 <= len(out["samples"][0]) < 60
    end = next(r for r in requests["request_end"] if r["req_id"] == "aborted")
    assert end["finished"] is True  # the engine released it
    positions = sorted({r["token_idx"] for r in routes if r["req_id"] == "aborted"})
    assert positions == list(range(end["routed_positions"]))
    # It ran at least as far as the tokens the caller saw, and those match the oracle.
    tokens = out["prompt_token_ids"] + out["samples"][0][:-1]
    assert len(positions) >= len(tokens)
    oracle = RoutingOracle(models["top2"]).routes(tokens)
    logged = {(r["token_idx"], r["layer"]): r for r in routes if r["req_id"] == "aborted"}
    for layer, route in oracle.items():
        for pos in range(len(tokens)):
            if not route.tie[pos]:
                assert sorted(logged[(pos, layer)]["topk_ids"]) == sorted(route.ids[pos].tolist())


def long_spec(models) -> dict:
    p = prompts(7, [40, 60, 80, 100])
    requests = [{"id": f"r{i}", "prompt_token_ids": p[i], "sampling": greedy(150)} for i in range(4)]
    return {"model": str(models["top2"]), "waves": [requests],
            "engine": {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 256,
                       "max_num_batched_tokens": 32, "max_num_seqs": 4, "seed": 1234,
                       "skip_tokenizer_init": True}}


def log_size(path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_sigkill_mid_run_leaves_valid_lines_and_a_readable_log(models, tmp_path):
    log = tmp_path / "routes.jsonl"

    def kill_mid_run(proc):
        wait_until(lambda: log_size(log) > 50_000, 300, "the log to pass 50 kB")
        os.killpg(proc.pid, signal.SIGKILL)

    run = run_engine(tmp_path / "run", long_spec(models), {"VLLM_LOG_MOE": str(log), **ALL},
                     during=kill_mid_run)
    assert run.returncode == -signal.SIGKILL
    data = log.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: b"" unless the kill cut a line
    assert all(json.loads(line)["type"] for line in complete)
    assert json.loads(complete[-1])["type"] != "end"  # requests were running: no end
    parsed = analysis_read_log(log)
    assert parsed.end is None and parsed.records > 0
    assert any("no 'end' record" in note for note in parsed.notes)
    assert parsed.truncated_tail == tail
    if tail:
        assert any("unfinished" in note for note in parsed.notes)


def test_a_write_failure_mid_run_stops_the_log_not_the_engine(models, tmp_path):
    """RLIMIT_FSIZE, lowered on the running engine, makes the log's next writes fail
    with EFBIG as a full disk would with ENOSPC (CPython ignores SIGXFSZ)."""
    log = tmp_path / "routes.jsonl"
    limits = {}

    def fill_the_disk(proc):
        wait_until(lambda: log_size(log) > 30_000, 300, "the log to pass 30 kB")
        limits["at"] = log_size(log) + 8192
        for pid in process_tree(proc.pid):
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (limits["at"], limits["at"]))
        # A flush of the writer's buffer may land between the size read and the limit
        # (CI saw it once): the size once the writer has said it stopped is the bound.
        output = tmp_path / "run" / "output.txt"
        wait_until(lambda: "the route log stops here" in output.read_text(), 300, "the writer's error")
        limits["at"] = max(limits["at"], log_size(log))

    run = run_engine(tmp_path / "run", long_spec(models), {"VLLM_LOG_MOE": str(log), **ALL},
                     during=fill_the_disk)
    assert run.returncode == 0, run.output[-3000:]
    assert all(len(o["samples"][0]) == 150 for o in run.result["outputs"])  # generation went on
    errors = [line for line in run.output.splitlines() if "the route log stops here" in line]
    assert len(errors) == 1 and "File too large" in errors[0], errors
    data = log.read_bytes()
    assert len(data) <= limits["at"]
    complete = data[: data.rfind(b"\n") + 1].splitlines()
    assert all(json.loads(line)["type"] for line in complete)  # nothing earlier corrupted
    parsed = analysis_read_log(log)
    assert parsed.end is None and parsed.records > 0
