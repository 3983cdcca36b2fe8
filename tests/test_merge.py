"""analysis.merge on hand-made shards: what is joined, what is refused, what is reported."""

import json
import os

import pytest

from analysis.logfile import read_log
from analysis.merge import MergeError, main, merge


def meta(dp: int) -> dict:
    return {"type": "meta", "schema": 1, "model_id": "m", "vllm_version": "0.31.0", "num_experts": 4,
            "top_k": 2, "layers_logged": [0], "moe_layers": [0], "started_at": f"2026-11-26T0{dp}",
            "parallel": {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 2,
                         "expert_parallel": True, "writer": {"dp_rank": dp, "pp_rank": 0, "tp_rank": 0},
                         "shards": ["log.dp0.jsonl", "log.dp1.jsonl"]}}


def shard_lines(dp: int, req: str, final=True) -> list[dict]:
    return [
        meta(dp),
        {"type": "request", "req_id": req, "engine_req_id": f"{req}-0", "prompt_len": 2,
         "prompt_tokens_cached": 0, "dp_rank": dp},
        *({"type": "route", "req_id": req, "token_idx": t, "layer": 0, "topk_ids": [dp, 3],
           "topk_weights": [0.625, 0.375]} for t in range(2)),  # float32 values, as a router's
        {"type": "request_end", "req_id": req, "routed_positions": 2, "recomputed_positions": 0,
         "finished": True, "dp_rank": dp},
        {"type": "end", "final": final, "steps": 1, "route_records": 2, "requests": 1, "requests_ended": 1,
         "engine_waits": 0, "requests_not_logged": 0, "write_error": None, "ended_at": f"t{dp}"},
    ]


def write(path, lines, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in lines) + tail)


def test_dp_shards_join_into_one_log(tmp_path):
    write(tmp_path / "log.dp0.jsonl", shard_lines(0, "a"))
    write(tmp_path / "log.dp1.jsonl", shard_lines(1, "b", final=False))
    summary = merge(tmp_path / "log.jsonl")
    assert summary["complete"] and summary["shards_not_shut_down"] == ["log.dp1.jsonl"]
    log = read_log(tmp_path / "log.jsonl")
    assert (log.requests, log.records) == (2, 4)
    assert log.meta["parallel"]["merged_from"] == ["log.dp0.jsonl", "log.dp1.jsonl"]
    assert log.end["final"] is False and log.end["route_records"] == 4
    assert any("provisional 'end'" in note for note in log.notes)


def test_a_shard_read_alone_says_it_is_one_of_several(tmp_path):
    write(tmp_path / "log.dp0.jsonl", shard_lines(0, "a"))
    assert any("analysis.merge" in note for note in read_log(tmp_path / "log.dp0.jsonl").notes)


def test_a_missing_shard_is_named(tmp_path):
    write(tmp_path / "log.dp0.jsonl", shard_lines(0, "a"))
    with pytest.raises(MergeError, match=r"\['log.dp1.jsonl'\] of .* missing"):
        merge(tmp_path / "log.jsonl")


def test_a_killed_shard_leaves_the_merged_log_incomplete(tmp_path):
    write(tmp_path / "log.dp0.jsonl", shard_lines(0, "a"))
    write(tmp_path / "log.dp1.jsonl", shard_lines(1, "b")[:-1], tail=b'{"type":"route","req')
    summary = merge(tmp_path / "log.jsonl")
    assert not summary["complete"]
    assert summary["shards_without_end"] == ["log.dp1.jsonl"]
    assert summary["unfinished_last_line_bytes"] == {"log.dp1.jsonl": 20}
    log = read_log(tmp_path / "log.jsonl")
    assert log.end is None and log.records == 4


def test_cli_without_shards_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "log.jsonl")]) == 2
    assert "no shards" in capsys.readouterr().err


def test_the_newest_run_names_the_shards(tmp_path):
    stale = shard_lines(0, "old")
    stale[0]["parallel"] |= {"pipeline_parallel_size": 2, "shards": ["log.dp0.pp0.jsonl", "log.dp0.pp1.jsonl"]}
    write(tmp_path / "log.dp0.pp0.jsonl", stale)
    os.utime(tmp_path / "log.dp0.pp0.jsonl", (1, 1))
    write(tmp_path / "log.dp0.jsonl", shard_lines(0, "a"))
    write(tmp_path / "log.dp1.jsonl", shard_lines(1, "b"))
    assert merge(tmp_path / "log.jsonl")["shards"] == ["log.dp0.jsonl", "log.dp1.jsonl"]


def test_shards_converted_to_parquet_and_back_still_merge(tmp_path):
    from analysis.convert import convert

    parquet_shards(tmp_path)
    for dp in (0, 1):
        convert(tmp_path / "pq" / f"log.dp{dp}.parquet", tmp_path / "back" / f"log.dp{dp}.jsonl")
    shards = read_log(tmp_path / "pq" / "log.dp0.parquet").meta["parallel"]["shards"]
    assert shards == ["log.dp0.parquet", "log.dp1.parquet"]
    assert merge(tmp_path / "back" / "log.jsonl")["complete"]
    assert (read_log(tmp_path / "back" / "log.jsonl").records, read_log(tmp_path / "log.dp1.jsonl").records) == (4, 2)


def parquet_shards(tmp_path, killed: bool = False):
    """The two JSONL shards, and each converted to a parquet shard under pq/."""
    from analysis.convert import convert

    for dp, req in ((0, "a"), (1, "b")):
        lines = shard_lines(dp, req)
        lines[-1]["route_parts"] = 1  # as the writer of a parquet shard ends it
        write(tmp_path / f"log.dp{dp}.jsonl", lines[:-1] if killed and dp == 1 else lines)
        convert(tmp_path / f"log.dp{dp}.jsonl", tmp_path / "pq" / f"log.dp{dp}.parquet")


def test_parquet_shards_merge_into_a_parquet_log(tmp_path):
    from analysis import stats

    parquet_shards(tmp_path)
    summary = merge(tmp_path / "pq" / "log.parquet")
    assert summary["complete"] and summary["shards"] == ["log.dp0.parquet", "log.dp1.parquet"]
    assert sorted(p.name for p in (tmp_path / "pq" / "log.parquet" / "routes").iterdir()) == [
        "part-000000.parquet", "part-000001.parquet"]
    merge(tmp_path / "log.jsonl")
    merged, as_jsonl = read_log(tmp_path / "pq" / "log.parquet"), read_log(tmp_path / "log.jsonl")
    assert (merged.records, merged.requests, merged.notes) == (4, 2, [])
    assert merged.end["route_parts"] == 2 and merged.end["route_records"] == 4
    assert stats.report(merged, [0], weighted=True) == stats.report(as_jsonl, [0], weighted=True)
    with pytest.raises(MergeError, match="already holds parts"):
        merge(tmp_path / "pq" / "log.parquet")


def test_a_killed_parquet_shard_leaves_the_merged_log_incomplete(tmp_path):
    parquet_shards(tmp_path, killed=True)
    (tmp_path / "pq" / "log.dp0.parquet" / "routes" / "part-000000.parquet").unlink()
    summary = merge(tmp_path / "pq" / "log.parquet")
    assert not summary["complete"] and summary["shards_without_end"] == ["log.dp1.parquet"]
    log = read_log(tmp_path / "pq" / "log.parquet")
    assert log.end is None and log.records == 2
    assert any("part-000000.parquet.missing-from-log.dp0.parquet" in note for note in log.notes)
