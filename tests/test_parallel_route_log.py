"""Pipeline parallelism on vLLM's CPU backend: each stage writes the layers it owns to
its own shard; analysis.merge joins them into one log equal to the HF oracle.
(Tensor and data parallelism need GPUs: tests/test_multi_gpu_route_log.py.)"""

import dataclasses
import json
import os

import pytest

from analysis.merge import merge
from conftest import run_engine
from route_checks import check_against_oracle, read_log, top2_spec

pytestmark = pytest.mark.engine


def split_cpus(parts: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for one worker per part (one NUMA node here)."""
    cpus = sorted(os.sched_getaffinity(0))
    size = max(len(cpus) // parts, 1)
    return "|".join(",".join(map(str, cpus[i * size:(i + 1) * size] or cpus[-1:])) for i in range(parts))


@pytest.fixture(scope="module")
def pp2(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp2")
    spec = top2_spec(models["top2"])
    spec["engine"]["pipeline_parallel_size"] = 2
    env = {"VLLM_LOG_MOE": str(tmp / "routes.jsonl"), "VLLM_LOG_MOE_LAYERS": "all",
           "VLLM_CPU_OMP_THREADS_BIND": split_cpus(2)}
    run = run_engine(tmp / "run", spec, env)
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_each_stage_writes_the_layers_it_owns(pp2):
    assert not pp2.log.exists()  # shards only, until merged
    shards = [pp2.log.with_name(f"routes.pp{p}.jsonl") for p in (0, 1)]
    metas = [json.loads(s.read_text().splitlines()[0]) for s in shards]
    assert [m["layers_logged"] for m in metas] == [[0, 1], [2, 3]]
    assert [m["parallel"]["writer"] for m in metas] == [
        {"dp_rank": 0, "pp_rank": p, "tp_rank": 0} for p in (0, 1)]
    assert metas[0]["parallel"]["shards"] == ["routes.pp0.jsonl", "routes.pp1.jsonl"]
    for shard in shards:  # both stages saw every request; each closed its shard
        _, _, requests, end = read_log(shard)
        assert len(requests["request"]) == len(requests["request_end"]) == end["requests"] == 7
        pp2.assert_log_closed(end)


def test_merged_shards_equal_the_oracle(pp2, models, tmp_path):
    summary = merge(pp2.log, tmp_path / "merged.jsonl")
    assert summary["complete"] and summary["shards"] == ["routes.pp0.jsonl", "routes.pp1.jsonl"]
    merged = dataclasses.replace(pp2, log=tmp_path / "merged.jsonl")
    meta, _, requests, end = read_log(merged.log)
    assert meta["layers_logged"] == [0, 1, 2, 3] and "writer" not in meta["parallel"]
    assert meta["parallel"]["pipeline_parallel_size"] == 2
    assert len(requests["request"]) == end["requests"] == 7  # once, from stage 0
    ends = {(r["req_id"], r.get("sample")): r for r in requests["request_end"]}
    for out in pp2.result["outputs"]:  # token ids from stage 0's input ids
        for s, generated in enumerate(out["samples"]):
            assert ends[(out["id"], s if len(out["samples"]) > 1 else None)]["generated_token_ids"] == generated[:-1]
    assert end["route_records"] == sum(e["route_records"] for e in end["shards"].values())
    check_against_oracle(merged, models["top2"], layers=[0, 1, 2, 3])


def test_parquet_shards_merge_into_a_log_equal_to_the_oracle(models, tmp_path):
    """The same run with VLLM_LOG_MOE_FORMAT=parquet: a directory per stage, merged
    directly into one parquet log, which (converted for the oracle's reader) equals it."""
    from analysis.convert import convert

    env = {"VLLM_LOG_MOE": str(tmp_path / "routes.parquet"), "VLLM_LOG_MOE_LAYERS": "all",
           "VLLM_CPU_OMP_THREADS_BIND": split_cpus(2)}
    spec = top2_spec(models["top2"])
    spec["engine"]["pipeline_parallel_size"] = 2
    run = run_engine(tmp_path / "run", spec, env)
    assert run.returncode == 0, run.output[-3000:]
    assert sorted(p.name for p in tmp_path.glob("routes.*.parquet")) == ["routes.pp0.parquet", "routes.pp1.parquet"]
    summary = merge(tmp_path / "routes.parquet", tmp_path / "merged.parquet")
    assert summary["complete"] and summary["shards"] == ["routes.pp0.parquet", "routes.pp1.parquet"]
    convert(tmp_path / "merged.parquet", tmp_path / "merged.jsonl")
    merged = dataclasses.replace(run, log=tmp_path / "merged.jsonl")
    meta, _, requests, end = read_log(merged.log)
    assert meta["layers_logged"] == [0, 1, 2, 3] and len(requests["request"]) == end["requests"] == 7
    assert end["route_parts"] == len(list((tmp_path / "merged.parquet" / "routes").glob("part-*.parquet")))
    check_against_oracle(merged, models["top2"], layers=[0, 1, 2, 3])
