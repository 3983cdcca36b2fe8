"""VLLM_LOG_MOE* settings: every bad value fails before anything is written, with a
message naming the variable and what it accepts."""

import fcntl
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from vllm.model_executor.layers.fused_moe.route_log.config import (
    KNOWN_ENV,
    LAYERS_HELP,
    RouteLogConfig,
    RouteLogError,
    parse_layers,
)


@pytest.mark.parametrize(
    "spec, layers",
    [("0", (0,)), ("0,12,23", (0, 12, 23)), ("0-3", (0, 1, 2, 3)), ("5, 0-2 ,2", (0, 1, 2, 5)),
     ("all", None), (" ALL ", None), ("7-7", (7,))],
)
def test_layer_lists(spec, layers):
    assert parse_layers(spec) == layers


@pytest.mark.parametrize("spec", ["", "x", "-1", "1,,2", "0-", "1.5", "3-1", "0;1", "all,0"])
def test_bad_layer_lists(spec):
    with pytest.raises(RouteLogError, match="VLLM_LOG_MOE_LAYERS") as e:
        parse_layers(spec)
    assert LAYERS_HELP in str(e.value)


def test_defaults_and_off(tmp_path):
    assert RouteLogConfig.from_env({}) is None
    config = RouteLogConfig.from_env({"VLLM_LOG_MOE": str(tmp_path / "r.jsonl")})
    assert config == RouteLogConfig(str(tmp_path / "r.jsonl"), (0,), None)
    sized = RouteLogConfig.from_env({"VLLM_LOG_MOE": str(tmp_path / "r.jsonl"), "VLLM_LOG_MOE_BUFFER_MB": "64"})
    assert sized.buffer_mb == 64
    assert RouteLogConfig.from_env({"VLLM_LOG_MOE": str(tmp_path / "r.parquet")}).format == "parquet"
    assert RouteLogConfig.from_env({"VLLM_LOG_MOE": str(tmp_path / "r"), "VLLM_LOG_MOE_FORMAT": "Parquet"}).format == "parquet"


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RouteLogConfig.from_env({"VLLM_LOG_MOE": "r.jsonl"}).path == str(tmp_path / "r.jsonl")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"VLLM_LOG_MOE": ""}, "VLLM_LOG_MOE is empty"),
        ({"VLLM_LOG_MOE": "   "}, "VLLM_LOG_MOE is empty"),
        ({"VLLM_LOG_MOE": "{tmp}"}, "is a directory"),
        ({"VLLM_LOG_MOE": "{tmp}/missing/r.jsonl"}, "missing does not exist"),
        ({"VLLM_LOG_MOE": "{tmp}/r.jsonl/x/r.jsonl"}, "/r.jsonl is a file, not a directory"),
        ({"VLLM_LOG_MOE": "/proc/routes.jsonl"}, "cannot write there"),
        ({"VLLM_LOG_MOE": "/sys/routes.jsonl"}, "cannot write there"),
        ({"VLLM_LOG_MOE": "/proc/routes.parquet"}, "cannot write there"),
        ({"VLLM_LOG_MOE_LAYERS": "0"}, "VLLM_LOG_MOE_LAYERS set but VLLM_LOG_MOE is not"),
        ({"VLLM_LOG_MOE": "{tmp}/r.jsonl", "VLLM_LOG_MOE_LAYER": "0"}, "unknown variable(s) VLLM_LOG_MOE_LAYER"),
        ({"VLLM_LOG_MOE": "{tmp}/r.jsonl", "VLLM_LOG_MOE_BUFFER_MB": "0"}, "VLLM_LOG_MOE_BUFFER_MB='0'"),
        ({"VLLM_LOG_MOE": "{tmp}/r.jsonl", "VLLM_LOG_MOE_BUFFER_MB": "x"}, "expected a whole number of MiB"),
        ({"VLLM_LOG_MOE": "{tmp}/r.jsonl", "VLLM_LOG_MOE_MAX_PENDING_STEPS": "64"},
         "unknown variable(s) VLLM_LOG_MOE_MAX_PENDING_STEPS"),
        ({"VLLM_LOG_MOE": "{tmp}/r.jsonl", "VLLM_LOG_MOE_FORMAT": "csv"},
         "VLLM_LOG_MOE_FORMAT='csv': expected one of jsonl, parquet"),
        ({"VLLM_LOG_MOE": "{tmp}/r.jsonl", "VLLM_LOG_MOE_FORMAT": "parquet"}, None),
    ],
)
def test_bad_settings(tmp_path, env, message):
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    if message is None or "is a file, not" in message:  # a file where a directory goes
        (tmp_path / "r.jsonl").write_text("")
    if message is None:
        message = "VLLM_LOG_MOE='%s/r.jsonl' is a file; expected a directory" % tmp_path
    with pytest.raises(RouteLogError) as e:
        RouteLogConfig.from_env(env)
    assert message in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["r.jsonl"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_directory(tmp_path):
    tmp_path.chmod(0o555)
    with pytest.raises(RouteLogError, match=r"cannot write there \(Permission denied\)"):
        RouteLogConfig.from_env({"VLLM_LOG_MOE": str(tmp_path / "r.jsonl")})


@pytest.mark.parametrize("name, format", [("r.jsonl", "jsonl"), ("r.parquet", "parquet")])
def test_a_log_another_engine_writes_is_refused_at_start_up(tmp_path, name, format):
    """The front end tries the engine's lock, and leaves the log as it was."""
    held = tmp_path / name if format == "jsonl" else tmp_path / name / "records.jsonl"
    held.parent.mkdir(exist_ok=True)
    held.write_text("another engine's line\n")
    with open(held, "ab") as log:
        fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RouteLogError, match="is being written by another engine"):
            RouteLogConfig.from_env({"VLLM_LOG_MOE": str(tmp_path / name)})
    assert RouteLogConfig.from_env({"VLLM_LOG_MOE": str(tmp_path / name)}).format == format
    assert held.read_text() == "another engine's line\n"


@pytest.mark.parametrize("model, env, line", [
    ("top2", {"VLLM_LOG_MOE": "/proc/routes.jsonl"},
     "VLLM_LOG_MOE='/proc/routes.jsonl': cannot write there (No such file or directory); "
     "expected a path to a .jsonl file in an existing, writable directory"),
    ("top4", {"VLLM_LOG_MOE": "{tmp}/r.jsonl", "VLLM_LOG_MOE_LAYERS": "0-3"},
     f"VLLM_LOG_MOE_LAYERS: layer(s) [1] are not MoE layers; valid MoE layers: 0,2-3; accepted: {LAYERS_HELP}"),
])
def test_a_bad_setting_ends_vllm_serve_with_one_line(models, tmp_path, model, env, line):
    """No traceback, status 1, before any engine process starts or the model loads."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOG_MOE")}
    full_env.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    run = subprocess.run([str(Path(sys.executable).parent / "vllm"), "serve", str(models[model]),
                          "--port", "1", "--dtype", "float32"], env=full_env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in run.stderr + run.stdout and "EngineCore" not in run.stderr + run.stdout
    assert list(tmp_path.iterdir()) == []


def engine_config(model, monkeypatch, engine=None, **env):
    from vllm.engine.arg_utils import EngineArgs

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return EngineArgs(model=str(model), skip_tokenizer_init=True, **(engine or {})).create_engine_config()


def test_front_end_rejects_a_model_without_experts(models, tmp_path, monkeypatch):
    with pytest.raises(RouteLogError, match="has no MoE layers"):
        engine_config(models["dense"], monkeypatch, VLLM_LOG_MOE=str(tmp_path / "r.jsonl"))
    assert not (tmp_path / "r.jsonl").exists()


def test_front_end_rejects_layers_out_of_range(models, tmp_path, monkeypatch):
    with pytest.raises(RouteLogError, match=r"layer\(s\) \[4, 9\] out of range; .* decoder layers 0-3"):
        engine_config(models["top2"], monkeypatch, VLLM_LOG_MOE=str(tmp_path / "r.jsonl"),
                      VLLM_LOG_MOE_LAYERS="0,4,9")


def test_metrics_go_where_vllm_reads_prometheus_files(models, tmp_path, monkeypatch):
    """Several API servers: vLLM's PROMETHEUS_MULTIPROC_DIR, which each of them reads.
    One: a directory of the front end's own, read by a collector on its registry."""
    from prometheus_client import REGISTRY

    from vllm.model_executor.layers.fused_moe.route_log import metrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    config = engine_config(models["top2"], monkeypatch, VLLM_LOG_MOE_METRICS="1")
    assert config.observability_config.moe_route_log["metrics_dir"] == str(tmp_path)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    own = engine_config(models["top2"], monkeypatch, VLLM_LOG_MOE_METRICS="1").observability_config.moe_route_log
    assert os.path.isdir(own["metrics_dir"]) and own["metrics_dir"] != str(tmp_path)
    assert metrics._COLLECTOR in REGISTRY._collector_to_names and metrics._COLLECTOR._path == own["metrics_dir"]


def test_front_end_accepts_good_settings_and_is_silent_when_off(models, tmp_path, monkeypatch):
    """The settings reach the engine's processes in the config they are given, read
    through vllm.envs; off, the field stays upstream's default."""
    assert engine_config(models["top2"], monkeypatch).observability_config.moe_route_log is None
    config = engine_config(models["top2"], monkeypatch, VLLM_LOG_MOE=str(tmp_path / "r.jsonl"),
                           VLLM_LOG_MOE_LAYERS="all", VLLM_LOG_MOE_FORMAT="jsonl")
    settings = pickle.loads(pickle.dumps(config)).observability_config.moe_route_log
    returned = settings["returned_path"]  # the front end's own file (route_log/front_end.py), empty
    assert os.path.basename(returned).startswith(f"vllm-moe-returned-{os.getpid()}-") and os.path.getsize(returned) == 0
    assert RouteLogConfig(**settings) == RouteLogConfig(str(tmp_path / "r.jsonl"), None, None, "jsonl",
                                                        front_end_pid=os.getpid(), returned_path=returned)
    assert list(tmp_path.iterdir()) == []  # the file is created by the worker, not here


def test_every_variable_is_declared_in_vllm_envs():
    """vLLM warns of undeclared VLLM_* variables and caches declared ones after start-up."""
    import vllm.envs as envs

    assert set(KNOWN_ENV) <= set(envs.environment_variables)
    from vllm.config import ObservabilityConfig
    from vllm.engine.arg_utils import get_kwargs

    assert "moe_route_log" in get_kwargs(ObservabilityConfig)  # `vllm serve` builds its parser from it


def test_front_end_checks_speculative_decoding(models, tmp_path, monkeypatch):
    """Drafts are logged with either model runner and with async scheduling; with
    pipeline parallelism, whose last stage alone samples, the engine does not start."""
    from vllm.model_executor.layers.fused_moe.route_log.config import route_log_settings

    ngram = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    config = engine_config(models["top2"], monkeypatch, {"speculative_config": ngram},
                           VLLM_LOG_MOE=str(tmp_path / "r.jsonl"))
    for async_scheduling in (True, False):
        config.scheduler_config.async_scheduling = async_scheduling
        route_log_settings(config)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    route_log_settings(config)
    config.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(RouteLogError, match=r"speculative decoding \(ngram\) with pipeline parallelism"):
        route_log_settings(config)
    assert list(tmp_path.iterdir()) == []

def test_front_end_rejects_dense_layers_and_a_ring_smaller_than_a_step(models, tmp_path, monkeypatch):
    """Known model families (here Qwen2-MoE with an mlp_only layer): the workers' checks,
    made as the config is, so that `vllm serve` says one line instead of an engine failure."""
    from vllm.model_executor.layers.fused_moe.route_log.config import known_moe_layers

    with pytest.raises(RouteLogError, match=r"layer\(s\) \[1\] are not MoE layers; valid MoE layers: 0,2-3"):
        engine_config(models["top4"], monkeypatch, VLLM_LOG_MOE=str(tmp_path / "r.jsonl"), VLLM_LOG_MOE_LAYERS="0-2")
    # 16,384 rows x (a 40-byte span, 4 layers x top-2 x 4-byte ids and weights, a token id): 1.7 MiB
    with pytest.raises(RouteLogError, match=r"VLLM_LOG_MOE_BUFFER_MB=1: one step of this engine needs up to 2 MiB"):
        engine_config(models["top2"], monkeypatch, {"max_num_batched_tokens": 16384},
                      VLLM_LOG_MOE=str(tmp_path / "r.jsonl"), VLLM_LOG_MOE_LAYERS="all", VLLM_LOG_MOE_BUFFER_MB="1")
    config = engine_config(models["top4"], monkeypatch, VLLM_LOG_MOE=str(tmp_path / "r.jsonl"), VLLM_LOG_MOE_LAYERS="all")
    assert known_moe_layers(config.model_config.hf_text_config) == [0, 2, 3]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fields, layers", [
    ({"model_type": "qwen3_next", "num_experts": 8, "decoder_sparse_step": 1, "mlp_only_layers": [2]}, [0, 1, 3]),
    ({"model_type": "deepseek_v3", "n_routed_experts": 8, "first_k_dense_replace": 1, "moe_layer_freq": 2}, [2]),
    ({"model_type": "glm4_moe", "n_routed_experts": 8, "first_k_dense_replace": 1, "moe_layer_freq": 2}, [1, 2, 3]),
    ({"model_type": "llama4_text", "interleave_moe_layer_step": 2}, [1, 3]),
    ({"model_type": "gpt_oss"}, [0, 1, 2, 3]),
    ({"model_type": "some_new_moe"}, None),
])
def test_moe_layers_of_families_whose_config_spells_them_out(fields, layers):
    """vLLM's rules per family (models/<family>.py); glm4_moe ignores moe_layer_freq."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.route_log.config import known_moe_layers

    assert known_moe_layers(SimpleNamespace(num_hidden_layers=4, **fields)) == layers


def test_front_end_checks_the_ring_of_listed_layers_of_any_family(models, tmp_path, monkeypatch):
    """A family whose config does not spell out its MoE layers: listed layers still size
    the ring here (the default, layer 0, among them); with 'all' the workers check it."""
    from vllm.model_executor.layers.fused_moe.route_log import config as route_log_config

    monkeypatch.setattr(route_log_config, "known_moe_layers", lambda hf_config: None)
    engine = {"max_num_batched_tokens": 16384}
    with pytest.raises(RouteLogError, match=r"VLLM_LOG_MOE_BUFFER_MB=1: one step of this engine needs up to 2 MiB"):
        engine_config(models["top2"], monkeypatch, engine, VLLM_LOG_MOE=str(tmp_path / "r.jsonl"),
                      VLLM_LOG_MOE_LAYERS="0-3", VLLM_LOG_MOE_BUFFER_MB="1")
    engine_config(models["top2"], monkeypatch, engine, VLLM_LOG_MOE_LAYERS="0")  # one layer: 0.94 MiB a step
    with pytest.raises(RouteLogError, match=r"VLLM_LOG_MOE_BUFFER_MB=1: one step of this engine needs up to 4 MiB"):
        engine_config(models["top2"], monkeypatch, {"max_num_batched_tokens": 65536}, VLLM_LOG_MOE_LAYERS="0")
    engine_config(models["top2"], monkeypatch, engine, VLLM_LOG_MOE_LAYERS="all")
    assert list(tmp_path.iterdir()) == []
