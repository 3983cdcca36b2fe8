"""The parquet route log (VLLM_LOG_MOE_FORMAT=parquet): the same records as JSONL, read
with the same numbers by our analysis and by DuckDB, converted both ways without loss,
and readable up to its last closed part after the writer is killed."""

import dataclasses
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis import stats
from analysis.convert import convert
from analysis.logfile import read_log
from analysis.parquet_log import part_files
from conftest import run_engine, wait_until
from route_checks import check_against_oracle, check_token_ids, top2_spec, with_repeated_prompt
from test_route_log_writer import LAYERS, cached_reqs, make_logger, new_request, step


def request(name, prompt_len, cached, blocks, sample=None):
    engine_id = f"{name}-0123abcd" if sample is None else f"{sample}_{name}-0123abcd"
    return SimpleNamespace(**vars(new_request(name, prompt_len, cached)) | {"req_id": engine_id},
                           block_ids=(blocks,))


def scripted_run(path: Path) -> None:
    """Block size 4: two samples of one request, a prefix-cache hit replayed, one that
    no forward computed (a 'gap'), and a request still open at close."""
    logger = make_logger(path, block_store={"block_size": 4})
    # Experts (value, position): values above the positions, so that no record names one twice.
    step(logger, new=[request("a", 10, 0, [3, 7]), request("p", 3, 0, [1], 0), request("p", 3, 0, [2], 1)],
         batch=[("a", 0, 8), ("0_p", 0, 3), ("1_p", 0, 3)], value=501)
    step(logger, batch=[("a", 8, 2), ("0_p", 3, 1), ("1_p", 3, 1)], value=502, cached=cached_reqs(a=([8],)))
    step(logger, new=[request("b", 10, 8, [3, 7, 4]), request("e", 6, 4, [6, 10])],
         finished=["0_p", "1_p"], batch=[("b", 8, 2), ("e", 4, 2)], value=503)
    logger.close()


@pytest.fixture
def twins(tmp_path):
    """One scripted run written as JSONL and as parquet."""
    scripted_run(tmp_path / "log.jsonl")
    scripted_run(tmp_path / "log.parquet")
    return tmp_path / "log.jsonl", tmp_path / "log.parquet"


def routes_of(path: Path) -> dict:
    """{(req_id, sample, token_idx, layer): (ids, weights, cached)} of a JSONL log."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    routes = {(r["req_id"], r.get("sample"), r["token_idx"], r["layer"]):
              (r["topk_ids"], r["topk_weights"], r.get("cached", False)) for r in lines if r["type"] == "route"}
    assert len(routes) == sum(r["type"] == "route" for r in lines)
    return routes


def test_both_forms_of_one_run_give_the_same_analysis(twins):
    jsonl, parquet = (read_log(path) for path in twins)
    assert (parquet.records, parquet.gap_records, parquet.requests) == (jsonl.records, 4 * 3, 4)
    assert parquet.end["route_parts"] == 1 and parquet.end["route_records"] == jsonl.records
    for frame in ("loads", "tokens", "pairs", "confidence", "windows", "token_counts"):
        assert getattr(parquet, frame).equals(getattr(jsonl, frame)), frame
    assert stats.report(parquet, LAYERS, weighted=True) == stats.report(jsonl, LAYERS, weighted=True)
    table = pq.read_table(twins[1] / "routes")
    assert str(table.schema.field("topk_ids").type) == "list<element: int16>"  # no num_experts in the header
    assert set(table["sample"].to_pylist()) == {None, 0, 1}
    assert sum(table["cached"].to_pylist()) == 8 * 3


def test_convert_loses_nothing_either_way(twins, tmp_path):
    jsonl, parquet = twins
    convert(jsonl, tmp_path / "converted.parquet")
    convert(tmp_path / "converted.parquet", tmp_path / "round_trip.jsonl")
    convert(parquet, tmp_path / "from_parquet.jsonl")
    original = routes_of(jsonl)
    assert routes_of(tmp_path / "round_trip.jsonl") == original == routes_of(tmp_path / "from_parquet.jsonl")
    assert read_log(tmp_path / "converted.parquet").loads.equals(read_log(jsonl).loads)


def test_float32_holds_the_weight_behind_every_9_decimal_text():
    """Why JSONL -> parquet is lossless: the writer's text of a float32 weight, read
    back as float32, is the same weight (weights above 1 and tiny ones included)."""
    weights = 4 * np.random.default_rng(0).random(200_000, dtype=np.float32) ** 6
    text = [f"{float(w):.9f}" for w in weights]
    assert all(f"{float(np.float32(t)):.9f}" == t for t in text)


def test_duckdb_reads_the_parts_with_the_same_histogram(twins):
    _, parquet = twins
    load = read_log(parquet).loads.groupby(["layer", "expert"])["count"].sum()
    sql = duckdb.sql(f"""
        SELECT layer, expert, count(*) AS n
        FROM (SELECT layer, unnest(topk_ids) AS expert FROM read_parquet('{parquet}/routes/*.parquet'))
        GROUP BY ALL ORDER BY ALL""").fetchall()
    assert {(layer, expert): n for layer, expert, n in sql} == {k: v for k, v in load.items() if v}


def test_a_killed_writer_leaves_every_closed_part_readable(tmp_path):
    """A part closes whenever no request is open; the open part dies with the writer,
    and the reader says where the routes stop."""
    path = tmp_path / "log.parquet"
    logger = make_logger(path)
    step(logger, new=[new_request("a")], batch=[("a", 0, 5)], value=500)
    step(logger, finished=["a"])
    wait_until(lambda: len(part_files(path)) == 1, 30, "the first part to close")
    step(logger, new=[new_request("b")], batch=[("b", 0, 5)], value=500)
    wait_until(lambda: b'"req_id":"b"' in (path / "records.jsonl").read_bytes(), 30, "b's request record")
    (path / "routes" / ".part-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    os.kill(logger.channel.proc.pid, signal.SIGKILL)
    logger.channel.proc.wait()
    logger.close()
    log = read_log(path)
    assert log.end is None and log.records == 5 * 3 and log.requests == 2
    assert any("routes end with the last closed part" in note for note in log.notes)
    assert "1 of 2 requests (or samples) have no 'request_end': they were running where the log stops" in log.notes
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}/routes/*.parquet')").fetchall() == [(15,)]


def test_the_reader_counts_the_requests_a_killed_writer_lost(tmp_path):
    """'a' ends while 'b' runs, so the part holding both stays open; the writer dies."""
    path = tmp_path / "log.parquet"
    logger = make_logger(path)
    step(logger, new=[new_request("a"), new_request("b")], batch=[("a", 0, 5), ("b", 0, 5)])
    step(logger, finished=["a"])
    wait_until(lambda: b'"type":"request_end"' in (path / "records.jsonl").read_bytes(), 30, "a's request_end")
    os.kill(logger.channel.proc.pid, signal.SIGKILL)
    logger.channel.proc.wait()
    logger.close()
    log = read_log(path)
    assert log.end is None and log.records == 0 and part_files(path) == []
    assert "1 ended request(s) had routes in the part open at the stop: their 'request_end' counts more " \
           "computed positions than the closed parts hold" in log.notes
    assert "1 of 2 requests (or samples) have no 'request_end': they were running where the log stops" in log.notes


@pytest.mark.engine
def test_an_engine_writes_a_parquet_log_that_matches_the_oracle(models, tmp_path):
    spec = with_repeated_prompt(top2_spec(models["top2"]))
    log = tmp_path / "routes.parquet"
    run = run_engine(tmp_path / "on", spec, {"VLLM_LOG_MOE": str(log), "VLLM_LOG_MOE_LAYERS": "all"})
    assert run.returncode == 0, run.output[-3000:]
    meta = json.loads((log / "records.jsonl").read_text().splitlines()[0])
    assert meta["format"] == "parquet"
    assert str(pq.read_schema(part_files(log)[0]).field("topk_ids").type) == "list<element: uint8>"
    convert(log, tmp_path / "routes.jsonl")
    as_jsonl = dataclasses.replace(run, log=tmp_path / "routes.jsonl")
    assert check_against_oracle(as_jsonl, models["top2"], layers=[0, 1, 2, 3])["cached"] > 0
    check_token_ids(as_jsonl)
    parquet, jsonl = read_log(log), read_log(tmp_path / "routes.jsonl")
    assert stats.report(parquet, [0, 1, 2, 3], weighted=False) == stats.report(jsonl, [0, 1, 2, 3], weighted=False)


def skewed_parquet_log(tmp_path, seed: int) -> None:
    """log.parquet: 500 positions at layers 0 and 2, top-2 of 16 experts, expert e chosen
    in proportion to e + 1."""
    rng = np.random.default_rng(seed)
    lines = [{"type": "meta", "schema": 1, "layers_logged": [0, 2], "top_k": 2, "num_experts": 16}]
    lines += [{"type": "route", "req_id": f"r{t // 50}", "token_idx": t % 50, "layer": layer,
               "topk_ids": [int(e) for e in rng.choice(16, 2, replace=False, p=np.arange(1, 17) / 136)],
               "topk_weights": [0.6, 0.4]} for t in range(500) for layer in (0, 2)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    convert(tmp_path / "log.jsonl", tmp_path / "log.parquet")


def test_the_documented_ep_balance_query_equals_the_stats(tmp_path, capsys):
    """docs/parquet.md's DuckDB query, on a parquet log of 16 experts and 4 ranks."""
    skewed_parquet_log(tmp_path, seed=3)
    query = f"""
        WITH load AS (SELECT layer, expert, count(*) AS tokens
                      FROM (SELECT layer, unnest(topk_ids) AS expert
                            FROM read_parquet('{tmp_path}/log.parquet/routes/*.parquet') WHERE NOT cached)
                      GROUP BY ALL),
        ranks AS (SELECT layer, expert // 4 AS rank, sum(tokens) AS tokens FROM load GROUP BY ALL)
        SELECT layer, avg(tokens) / max(tokens) AS balance FROM ranks GROUP BY layer ORDER BY layer"""
    documented = dict(duckdb.sql(query).fetchall())
    assert stats.main([str(tmp_path / "log.parquet"), "--json"]) == 0
    ours = {s["layer"]: s["ep_balance"]["4"]["contiguous"] for s in json.loads(capsys.readouterr().out)["layers"]}
    assert documented == pytest.approx(ours) and set(ours) == {0, 2} and all(v < 0.9 for v in ours.values())


def test_the_documented_dask_queries_on_a_local_cluster_equal_the_stats(tmp_path, capsys):
    """docs/parquet.md's Dask spelling, run by a local cluster of two worker processes:
    the per-layer expert load and the 4-rank contiguous balance equal analysis.stats'."""
    import dask.dataframe as dd
    from dask.distributed import Client, LocalCluster

    skewed_parquet_log(tmp_path, seed=4)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        routes = dd.read_parquet(tmp_path / "log.parquet" / "routes", columns=["layer", "topk_ids"])
        load = routes.explode("topk_ids").groupby(["layer", "topk_ids"]).size().compute()
    load = load.rename("tokens").reset_index().astype({"topk_ids": int})
    load["rank"] = load["topk_ids"] // 4
    ranks = load.groupby(["layer", "rank"])["tokens"].sum()
    balance = (ranks.groupby("layer").mean() / ranks.groupby("layer").max()).to_dict()
    assert stats.main([str(tmp_path / "log.parquet"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert balance == pytest.approx({s["layer"]: s["ep_balance"]["4"]["contiguous"] for s in rep["layers"]})
    ours = {(s["layer"], e): round(share * 1000) for s in rep["layers"] for e, share in enumerate(s["shares"]) if share}
    assert {(layer, e): n for (layer, e), n in zip(zip(load["layer"], load["topk_ids"]), load["tokens"])} == ours


def staggered_log(path: Path) -> Path:
    """Six requests of 3 prompt + 3 generated positions, each starting a step after the
    one before, two layers, token ids: a log in an engine's step order."""
    lines = [{"type": "meta", "schema": 1, "model_id": "tiny", "layers_logged": [0, 1], "num_experts": 8, "top_k": 2}]
    for t in range(11):
        for r in range(6):
            name, position = f"r{r}", t - r
            if position == 0:
                lines.append({"type": "request", "req_id": name, "prompt_len": 3,
                              "prompt_token_ids": [10 + r, 11, 12]})
            if 0 <= position < 6:
                lines += [{"type": "route", "req_id": name, "token_idx": position, "layer": layer,
                           "topk_ids": [(r + position + layer) % 8, (r + position + layer + 1 + (r + position) % 7) % 8],
                           "topk_weights": [0.625, 0.375]} for layer in (0, 1)]
            if position == 6:
                lines.append({"type": "request_end", "req_id": name, "routed_positions": 6,
                              "generated_token_ids": [20 + r, 21, 22]})
    lines.append({"type": "end", "route_records": 6 * 6 * 2})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_parts_are_read_where_records_close_them(tmp_path, monkeypatch):
    """A request's end is counted once the part open at it is read, so the reader holds
    the open requests only; a log whose 'part' records all come last (converted before
    they were placed) breaks that order and is read again, every end last."""
    jsonl = staggered_log(tmp_path / "s.jsonl")
    monkeypatch.setattr("analysis.convert.PART_ROWS", 10)
    monkeypatch.setattr("analysis.convert.CHUNK_BYTES", 1000)  # a few lines at a time
    convert(jsonl, tmp_path / "s.parquet")
    kinds = [json.loads(line)["type"] for line in (tmp_path / "s.parquet/records.jsonl").read_text().splitlines()]
    assert kinds.count("part") >= 4 and kinds.index("part") < kinds.index("request_end") < len(kinds) - 3
    import analysis.parquet_log as parquet_log
    orders = []
    read_parts = parquet_log._read_parts
    monkeypatch.setattr(parquet_log, "_read_parts", lambda *a, **k: orders.append(k["ends_in_step"]) or read_parts(*a, **k))
    expected = read_log(jsonl)
    assert read_log(tmp_path / "s.parquet").token_counts.equals(expected.token_counts) and orders == [True]
    lines = (tmp_path / "s.parquet/records.jsonl").read_text().splitlines()
    parts = [line for line in lines if '"type":"part"' in line.replace(" ", "")]
    rest = [line for line in lines if line not in parts]
    (tmp_path / "s.parquet/records.jsonl").write_text("\n".join(rest[:-1] + parts + rest[-1:]) + "\n")
    log = read_log(tmp_path / "s.parquet")
    assert orders == [True, True, False] and log.token_counts.equals(expected.token_counts)
    assert stats.report(log, [0, 1], weighted=True) == stats.report(expected, [0, 1], weighted=True)
