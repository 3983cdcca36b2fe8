"""`vllm serve` with VLLM_LOG_MOE set: concurrent OpenAI clients, 4,000 requests, SIGTERM.

One server process (CPU backend, the tiny top-4 demo model with Qwen's tokenizer). Completion prompts are token ids and responses carry token ids
(vLLM's `return_token_ids`), so those requests can be held to the oracle; chat
requests are joined by their response id.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from analysis.logfile import read_log as analysis_read_log
from conftest import ROUTE_ENV, SHARED, process_tree, run_engine, wait_until
from experiments.tiny_moe import DEMO, build_moe
from route_checks import assert_cut_as_returned, check_against_oracle, prompts, report, restricted, stop_spec

pytestmark = pytest.mark.engine
CONCURRENT, CHATS, MANY, RSS_EVERY = 32, 4, 4000, 500
PAIRS, STOPS, REFUSED = 6, 6, 2  # n=2 requests, stop strings, an invalid body and an over-long prompt
LOGGED = CONCURRENT + CHATS + MANY + 2 * PAIRS + STOPS  # engine requests: a sample each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(proc, port) -> bool:
    assert proc.poll() is None, "the server exited during start-up"
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
    except OSError:
        return False


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of each process of the server (API server, engine core, worker)."""
    rss = {}
    for p in process_tree(pid):
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
        except OSError:
            continue
        rss[f"{status['Name'].strip()} {p}"] = int(status.get("VmRSS", "0 kB").split()[0]) / 1024
    return rss


def gone(pids: list[int]) -> bool:
    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    return not any(alive(p) for p in pids)


async def complete(client, model, prompt, max_tokens, request_id=None, seed=None) -> dict:
    resp = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0 if seed is None else 1.0, seed=seed,
        extra_body={"return_token_ids": True, "ignore_eos": True},
        extra_headers={"X-Request-Id": request_id} if request_id else None,
    )
    choice = resp.choices[0]
    return {"response_id": resp.id, "prompt_token_ids": choice.prompt_token_ids, "token_ids": choice.token_ids}


async def pair(client, model, prompt, seed) -> dict:
    """n=2, seeded: two samples, two engine requests."""
    resp = await client.completions.create(model=model, prompt=prompt, max_tokens=8, n=2, temperature=1.0, seed=seed,
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
    choices = sorted(resp.choices, key=lambda c: c.index)
    return {"response_id": resp.id, "prompt_token_ids": choices[0].prompt_token_ids,
            "samples": [c.token_ids for c in choices]}


async def stopped(client, model, prompt) -> dict:
    """A stop string, matched by the front end in text the engine already computed."""
    resp = await client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0.0, stop=["e"],
                                           extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = resp.choices[0]
    return {"response_id": resp.id, "prompt_token_ids": choice.prompt_token_ids, "token_ids": choice.token_ids,
            "stop_reason": choice.stop_reason}


async def refused(port: int, model: str, body: dict) -> int:
    """The HTTP status of a request the server must refuse."""
    def post() -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                         json.dumps({"model": model, **body}).encode(),
                                         {"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=300).status
        except urllib.error.HTTPError as e:
            return e.code
    return await asyncio.to_thread(post)


async def chat(client, model, i) -> dict:
    resp = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
        max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True},
    )
    return {"response_id": resp.id, "prompt_tokens": resp.usage.prompt_tokens,
            "completion_tokens": resp.usage.completion_tokens}


async def traffic(port: int, model: str, pid: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                timeout=300)
    # 50 clients at once: 32 completions, half of them with the caller's own id
    # (X-Request-Id), a quarter sampled with a seed of their own (their prefills are
    # chunked, 256-token steps, which crashed vLLM's CPU runner before the fork's fix);
    # 4 chats; 6 seeded n=2 requests; 6 with a stop string; an invalid body and a prompt
    # longer than the model's context, which the server refuses.
    first = prompts(11, [10 + 3 * i for i in range(CONCURRENT)])
    mixed = prompts(13, [20] * (PAIRS + STOPS))
    *first, chats, pairs, stops, codes = await asyncio.gather(*(
        complete(client, model, p, 12, f"client-{i}" if i % 2 else None, 100 + i if i % 4 == 3 else None)
        for i, p in enumerate(first)
    ), asyncio.gather(*(chat(client, model, i) for i in range(CHATS))),
        asyncio.gather(*(pair(client, model, p, 300 + i) for i, p in enumerate(mixed[:PAIRS]))),
        asyncio.gather(*(stopped(client, model, p) for p in mixed[PAIRS:])),
        asyncio.gather(refused(port, model, {"prompt": [1, 2, 3], "max_tokens": -5}),
                       refused(port, model, {"prompt": list(range(1, 301)), "max_tokens": 4})))
    gate, rss, many = asyncio.Semaphore(64), [], []

    async def small(i, p):
        async with gate:
            many.append(await complete(client, model, p, 4))
            if len(many) % RSS_EVERY == 0:
                rss.append((len(many), rss_mib(pid)))

    short = np.random.default_rng(12).integers(0, 1024, (MANY, 8)).tolist()  # no cache blocks to share
    await asyncio.gather(*(small(i, p) for i, p in enumerate(short)))
    await client.close()
    return {"concurrent": first, "chats": chats, "pairs": pairs, "stops": stops, "refused": codes, "many": many,
            "rss": rss}


def server(model: Path, log: Path, port: int, api_servers: int = 1) -> tuple[dict, list[str]]:
    """The environment and command line of a logged `vllm serve`."""
    env = {k: v for k, v in os.environ.items() if k not in ROUTE_ENV}
    env.update(VLLM_LOG_MOE=str(log), VLLM_LOG_MOE_LAYERS="all", VLLM_LOG_MOE_METRICS="1")
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(model), "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "32",
           "--max-num-batched-tokens", "256", "--gpu-memory-utilization", "0.3", "--seed", "1234",
           # A KV cache of 64 MiB, all of it touched within the first requests: a
           # 5 GiB one grows the worker's RSS page by page as the block pool cycles.
           "--num-gpu-blocks-override", "128", "--api-server-count", str(api_servers)]
    return env, cmd


def serve(tmp: Path, model: Path, log: Path, send=None, requests: int = LOGGED,
          api_servers: int = 1) -> dict:
    """Starts `vllm serve`, sends the traffic, scrapes /metrics (as often as there are
    API servers, times three: each connection may reach any of them), stops it with SIGTERM."""
    port = free_port()
    env, cmd = server(model, log, port, api_servers)
    tmp.mkdir()
    with open(tmp / "server.txt", "w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_until(lambda: healthy(proc, port), 600, "the server's /health")
            result = asyncio.run((send or traffic)(port, str(model), proc.pid))
            # The writer at rest (its provisional 'end' counts every request): /metrics is final.
            wait_until(lambda: at_rest(log, requests), 300, "the writer to finish the traffic")
            result["scrapes"] = [urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
                                 for _ in range(3 * api_servers)]
            result["metrics"] = result["scrapes"][0]
            tree = process_tree(proc.pid)
            proc.send_signal(signal.SIGTERM)  # as a user, systemd or Kubernetes stops it
            result["returncode"] = proc.wait(timeout=120)
            # vLLM's API server can exit before its engine's worker, which writes the log.
            wait_until(lambda: gone(tree), 120, "the server's processes to exit")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    result.update(log=log, model=model, output=(tmp / "server.txt").read_text())
    return result


def at_rest(log: Path, requests: int) -> bool:
    with open(log, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 4096))
        last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        end = json.loads(last)
    except ValueError:  # a line half written
        return False
    return end.get("type") == "end" and end["requests_ended"] == end["requests"] == requests


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve_model")
    # Qwen's vocabulary, so that chat prompts (tokenised by the server) fit the model.
    return build_moe(DEMO, tmp / "demo", tokenizer_dir=SHARED / "models" / "qwen1.5-moe-a2.7b-chat")


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    return serve(tmp / "on", model, tmp / "routes.jsonl")


def test_every_response_joins_its_records(served):
    """A completion's req_id is the response id plus "-<prompt index>" (a request may
    carry several prompts), a chat's the response id; X-Request-Id sets the id."""
    assert served["returncode"] == 0, served["output"][-3000:]
    assert served["refused"] == [400] * REFUSED  # and never reached the engine: counted below
    requests = [json.loads(line) for line in open(served["log"]) if '"type":"request' in line]
    keyed = {(r["type"], r["req_id"], r.get("sample")): r for r in requests}
    starts = {req_id: r for (kind, req_id, sample), r in keyed.items() if kind == "request" and sample is None}
    ends = {req_id: r for (kind, req_id, sample), r in keyed.items() if kind == "request_end" and sample is None}
    responses = served["concurrent"] + served["many"]
    assert len(keyed) == len(requests) == 2 * LOGGED
    assert len(starts) == len(ends) == len(responses) + CHATS + STOPS
    for i, resp in enumerate(served["concurrent"]):
        assert resp["response_id"] == (f"cmpl-client-{i}" if i % 2 else resp["response_id"])
    for resp in responses:
        start, end = starts[f"{resp['response_id']}-0"], ends[f"{resp['response_id']}-0"]
        assert start["prompt_len"] == len(resp["prompt_token_ids"])
        assert end["finished"] and end["routed_positions"] == (
            len(resp["prompt_token_ids"]) + len(resp["token_ids"]) - 1 - start["prompt_tokens_cached"])
        assert end["cached_positions"] == start["prompt_tokens_cached"]
    for resp in served["chats"]:
        start, end = starts[resp["response_id"]], ends[resp["response_id"]]
        assert resp["response_id"].startswith("chatcmpl-") and start["prompt_len"] == resp["prompt_tokens"]
        assert end["finished"] and end["routed_positions"] == (
            resp["prompt_tokens"] + resp["completion_tokens"] - 1 - start["prompt_tokens_cached"])
    for resp in served["pairs"]:  # one engine request per sample, "sample": i
        for i, tokens in enumerate(resp["samples"]):
            start, end = (keyed[(kind, f"{resp['response_id']}-0", i)] for kind in ("request", "request_end"))
            assert start["prompt_len"] == len(resp["prompt_token_ids"])
            assert end["routed_positions"] + end["cached_positions"] == len(resp["prompt_token_ids"]) + len(tokens) - 1
            assert end["generated_token_ids"] == tokens[:-1]
    for resp in served["stops"]:  # the engine may have computed past the stop string
        start, end = starts[f"{resp['response_id']}-0"], ends[f"{resp['response_id']}-0"]
        assert_cut_as_returned(end, resp["prompt_token_ids"], resp["token_ids"], resp["stop_reason"])


def test_stop_strings_say_what_the_caller_got(served):
    """The log counts the positions past the tokens returned, from request_end's own
    generated token ids (positions logged: the prompt's and each token fed back)."""
    ends = {r["req_id"]: r for r in map(json.loads, open(served["log"])) if r["type"] == "request_end"}
    cut = [ends[f"{resp['response_id']}-0"] for resp in served["stops"] if resp["stop_reason"] == "e"]
    assert cut, "no response was cut by its stop string"
    past = sum(max(0, len(end.get("generated_token_ids", [])) - end["returned_tokens"]) for end in cut)
    assert analysis_read_log(served["log"]).not_returned == {"requests": len(cut), "positions": past}


def test_offline_stop_strings_say_what_the_caller_got(model, tmp_path):
    """The same through LLMEngine (what LLM.generate runs), whose front end is the
    caller's process; its file of returned counts is gone when it exits."""
    spec = stop_spec(model, dtype="float32", gpu_memory_utilization=0.3, max_model_len=256, max_num_seqs=8,
                     seed=1234, num_gpu_blocks_override=64)
    run = run_engine(tmp_path / "run", spec, {"VLLM_LOG_MOE": str(tmp_path / "routes.jsonl"), "VLLM_LOG_MOE_LAYERS": "all"})
    assert run.returncode == 0, run.output[-3000:]
    ends = {r["req_id"]: r for r in map(json.loads, open(run.log)) if r["type"] == "request_end"}
    for out in run.result["outputs"]:
        assert_cut_as_returned(ends[out["id"]], out["prompt_token_ids"], out["samples"][0], out["stop_reasons"][0])
    assert any(out["stop_reasons"][0] == "e" for out in run.result["outputs"])
    left = [p for p in Path(tempfile.gettempdir()).glob("vllm-moe-returned-*")
            if not Path(f"/proc/{p.name.split('-')[3]}").exists()]
    assert left == []


def test_sigterm_leaves_a_complete_log_without_duplicates(served):
    """`vllm serve` stops its engine with --shutdown-timeout 0 by default: SIGKILL to
    the engine's processes right after SIGTERM, before any exit handler. The log was
    idle by then, so it ends with the provisional 'end' of its last request."""
    log = analysis_read_log(served["log"])
    assert log.end is not None, log.notes
    assert log.end["requests_ended"] == log.end["requests"] == LOGGED
    assert log.end["final"] or any("provisional 'end'" in note for note in log.notes)
    assert log.duplicates == 0 and not log.truncated_tail
    assert log.records == log.end["route_records"]
    assert log.requests == LOGGED - PAIRS  # distinct caller ids: a pair's samples share one


def test_metrics_endpoint_shows_the_logs_expert_load(served):
    """VLLM_LOG_MOE_METRICS=1: /metrics, scraped once the writer is at rest, holds the
    log's counts of computed positions per layer and expert, in vLLM's style."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(served["metrics"])}
    experts = {(s.labels["layer"], s.labels["expert"]): s.value for s in families["vllm:moe_expert_tokens"].samples
               if s.name.endswith("_total") and s.value}
    loads = analysis_read_log(served["log"]).loads
    computed = loads[loads.phase != "cached"].groupby(["layer", "expert"])["count"].sum()
    assert experts == {(str(layer), str(expert)): float(n) for (layer, expert), n in computed.items() if n}
    assert {s.labels["model_name"] for s in families["vllm:moe_load_imbalance"].samples} == {str(served["model"])}
    assert len(families["vllm:moe_load_imbalance"].samples) == 4
    assert "vllm:num_requests_running" in families  # vLLM's own metrics, on the same endpoint


def test_concurrent_requests_match_the_oracle(served, tmp_path):
    outputs = [{"id": f"{r['response_id']}-0", "prompt_token_ids": r["prompt_token_ids"],
                "samples": [r["token_ids"]]} for r in served["concurrent"]]
    run = restricted(served["log"], outputs, tmp_path / "concurrent.jsonl")
    counts = check_against_oracle(run, served["model"], layers=[0, 1, 2, 3])
    assert counts["compared"] == 4 * sum(len(o["prompt_token_ids"]) + 12 - 1 for o in outputs)


def test_memory_levels_off_over_4000_requests(served):
    """Resident memory of each server process every 500 requests. The worker, which
    writes the log, rises over the first ~2,000 requests (malloc arenas of the writer
    thread) and then levels off; vLLM's own worker also grows by 0-90 MiB at random
    (BENCHMARKS.md). So this bound catches gross growth only: anything near 64 kB kept
    per request (every rendered line, say) or an unbounded queue behind a slow writer.
    The queue's bound itself is tested in test_route_log_writer."""
    rss = dict(served["rss"])
    assert list(rss) == list(range(RSS_EVERY, MANY + 1, RSS_EVERY))
    half, last = rss[MANY // 2], rss[MANY]
    growth = {name.split()[0]: last[name] - half[name] for name in half if name in last}
    report(SimpleNamespace(log=served["log"]),
           {"rss_mib_after_requests": {n: {k.split()[0]: round(v) for k, v in m.items()} for n, m in rss.items()},
            "growth_mib_second_half": growth})
    assert max(growth.values()) < 128, (growth, served["rss"])


async def few(port: int, model: str, pid: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    done = await asyncio.gather(*(complete(client, model, p, 6) for p in prompts(5, [12 + 5 * i for i in range(FEW)])))
    await client.close()
    return {"concurrent": done}


FEW = 16


def test_metrics_with_two_api_servers_equal_the_log(model, tmp_path):
    """--api-server-count 2: vLLM serves /metrics from prometheus_client's multiprocess
    files; the writer publishes there, so either API server shows the log's counts."""
    from test_route_log_metrics import expert_counts, log_counts, parsed

    result = serve(tmp_path / "run", model, tmp_path / "routes.jsonl", few, FEW, api_servers=2)
    assert result["returncode"] == 0, result["output"][-3000:]
    assert len(result["concurrent"]) == FEW
    expected = log_counts(tmp_path / "routes.jsonl")
    assert expected and {layer for layer, _ in expected} == set(range(DEMO.num_layers))
    for scrape in result["scrapes"]:
        assert expert_counts(parsed(scrape)) == expected
        assert "vllm:num_requests_running" in scrape  # vLLM's own metrics beside ours


def test_killing_the_api_server_leaves_no_process(model, tmp_path):
    """SIGKILL of the API server alone, with generations running: the engine core, its
    worker and the log's writer end too, the log says how it ended, and no file of the
    API server's is left."""
    port, log = free_port(), tmp_path / "routes.jsonl"
    env, cmd = server(model, log, port)
    with open(tmp_path / "server.txt", "w") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_until(lambda: healthy(proc, port), 600, "the server's /health")
            body = json.dumps({"model": str(model), "prompt": list(range(1, 9)), "max_tokens": 240,
                               "ignore_eos": True}).encode()
            for _ in range(4):  # their connections die with the server
                threading.Thread(target=post_quietly, args=(f"http://127.0.0.1:{port}/v1/completions", body),
                                 daemon=True).start()
            wait_until(lambda: log.stat().st_size > 200_000, 300, "routes of the running requests")
            tree = process_tree(proc.pid)
            assert len(tree) >= 3  # the API server, the engine core, the writer
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            wait_until(lambda: gone(tree), 60, "the engine's processes to follow the API server")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    end = records[-1]
    assert end["type"] == "end" and end["final"] is True and end["front_end_exited"] is True
    ends = [r for r in records if r["type"] == "request_end"]
    # Aborted by the engine's shutdown (the worker cannot tell an abort from an end):
    # each request short of its 8 + 240 - 1 positions.
    assert len(ends) == end["requests"] == 4 and all(r["routed_positions"] < 247 for r in ends)
    # The API server's files (returned tokens, /metrics' directory) went with the writer.
    assert not list(Path(tempfile.gettempdir()).glob(f"vllm-moe-*-{proc.pid}-*"))


def post_quietly(url: str, body: bytes) -> None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=600)
    except OSError:
        pass
