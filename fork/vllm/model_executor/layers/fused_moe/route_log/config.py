# SPDX-License-Identifier: Apache-2.0
"""Settings of the MoE route log (route_logger.py): the VLLM_LOG_MOE* variables,
declared in vllm/envs.py and read through ``vllm.envs`` by the front end, checked with
a message that names the variable and what it accepts, and carried to the engine's
processes in ``ObservabilityConfig.moe_route_log``."""

import fcntl
import importlib.util
import os
import re
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .channel import step_layout
from .format import FORMATS, records_path, shard_path

ENV_PATH = "VLLM_LOG_MOE"
ENV_LAYERS = "VLLM_LOG_MOE_LAYERS"
ENV_BUFFER = "VLLM_LOG_MOE_BUFFER_MB"
ENV_FORMAT = "VLLM_LOG_MOE_FORMAT"
ENV_METRICS = "VLLM_LOG_MOE_METRICS"
KNOWN_ENV = (ENV_PATH, ENV_LAYERS, ENV_BUFFER, ENV_FORMAT, ENV_METRICS)
METRICS_HELP = "0 (off), 1 or expert (a series per layer and expert), layer (per-layer series only)"
LAYERS_HELP = (
    "a decoder-layer index (0), a comma list (0,12,23), an inclusive range "
    "(0-23), a mix of these (0,4-7), or 'all'"
)


class RouteLogError(SystemExit, ValueError):
    """A bad VLLM_LOG_MOE* setting, raised before anything is written. A SystemExit:
    left uncaught (vllm serve, a script) it ends the program with its one-line message
    and status 1, no traceback; a ValueError to callers that catch those."""


@dataclass(frozen=True)
class RouteLogConfig:
    path: str
    layers: tuple[int, ...] | None  # None: every MoE layer
    buffer_mb: int | None  # shared memory between engine and writer; None: 16 full steps
    format: str = "jsonl"  # "parquet": a directory of route parts (writer/columns.py)
    metrics: str | None = None  # live expert load on /metrics: "expert", "layer" (metrics.py)
    # Where the writers publish the load (metrics.py), chosen by the front end.
    metrics_dir: str | None = None
    # The front end's process: the log's 'end' says whether it had exited.
    front_end_pid: int | None = None
    # Where the front end notes the tokens it returned of responses it cut (front_end.py).
    returned_path: str | None = None

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "RouteLogConfig | None":
        """From ``environ`` (the variables that are set), or else from vllm.envs."""
        # vLLM only warns of an unknown VLLM_* name: a mistyped one of ours is an error.
        unknown = sorted(k for k in (os.environ if environ is None else environ)
                         if k.startswith(ENV_PATH) and k not in KNOWN_ENV)
        environ = _from_envs() if environ is None else environ
        if unknown:
            raise RouteLogError(
                f"unknown variable(s) {', '.join(unknown)}; the route log reads "
                f"{', '.join(KNOWN_ENV)}"
            )
        metrics = _parse_metrics(environ.get(ENV_METRICS))
        if ENV_PATH not in environ:
            others = [k for k in KNOWN_ENV[1:] if k in environ and (metrics is None or k == ENV_FORMAT)]
            if others:
                raise RouteLogError(
                    f"{', '.join(others)} set but {ENV_PATH} is not; set "
                    f"{ENV_PATH}=/path/log.jsonl to turn the route log on"
                )
            if metrics is None:
                return None
            return cls(path=None, layers=parse_layers(environ.get(ENV_LAYERS, "0")),
                       buffer_mb=_parse_positive(environ[ENV_BUFFER]) if ENV_BUFFER in environ else None,
                       format="none", metrics=metrics)
        format = _parse_format(environ.get(ENV_FORMAT), environ[ENV_PATH])
        return cls(
            path=_check_path(environ[ENV_PATH], format),
            layers=parse_layers(environ.get(ENV_LAYERS, "0")),
            buffer_mb=_parse_positive(environ[ENV_BUFFER]) if ENV_BUFFER in environ else None,
            format=format,
            metrics=metrics,
        )


def _from_envs() -> dict:
    import vllm.envs as envs

    return {name: getattr(envs, name) for name in KNOWN_ENV if envs.is_set(name)}


def parse_layers(spec: str) -> tuple[int, ...] | None:
    text = spec.strip()
    if text.lower() == "all":
        return None
    layers: set[int] = set()
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if match is None:
            raise RouteLogError(
                f"{ENV_LAYERS}={spec!r}: cannot read {item.strip()!r}; accepted: {LAYERS_HELP}"
            )
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise RouteLogError(
                f"{ENV_LAYERS}={spec!r}: range {first}-{last} runs backwards; "
                f"accepted: {LAYERS_HELP}"
            )
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))


def _parse_positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise RouteLogError(f"{ENV_BUFFER}={text!r}: expected a whole number of MiB >= 1")
    return int(text)


def _parse_metrics(text: str | None) -> str | None:
    value = (text or "0").strip().lower()
    if value in ("0", "1", "expert", "layer"):
        return None if value == "0" else "expert" if value == "1" else value
    raise RouteLogError(f"{ENV_METRICS}={text!r}: expected {METRICS_HELP}")


def _parse_format(text: str | None, path: str) -> str:
    """VLLM_LOG_MOE_FORMAT, or the path's suffix: .parquet chooses parquet."""
    format = (text or "").strip().lower() or ("parquet" if path.rstrip("/").endswith(".parquet") else "jsonl")
    if format not in FORMATS:
        raise RouteLogError(f"{ENV_FORMAT}={text!r}: expected one of {', '.join(FORMATS)}")
    if format == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise RouteLogError(f"{ENV_PATH}={path!r}: the parquet format needs pyarrow "
                            f"(pip install pyarrow); or set {ENV_FORMAT}=jsonl")
    return format


def _check_path(path: str, format: str = "jsonl") -> str:
    """The log's absolute path, once the file system has said that it can be written:
    an existing file or directory is opened, a new one's directory gets a probe file
    (permission bits alone accept /sys or /proc for root). Nothing is left behind, and
    a log another engine holds is refused now rather than by its worker."""
    expected = ("expected a path to a .jsonl file in an existing, writable directory"
                if format == "jsonl" else "expected a directory for the parquet log (created if "
                "missing) in an existing, writable directory")
    if not path.strip():
        raise RouteLogError(f"{ENV_PATH} is empty; {expected}")
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if format == "jsonl" and os.path.isdir(full):
        raise RouteLogError(f"{ENV_PATH}={path!r} is a directory; {expected}")
    if format == "parquet" and os.path.exists(full) and not os.path.isdir(full):
        raise RouteLogError(f"{ENV_PATH}={path!r} is a file; {expected}")
    above = next(str(p) for p in (Path(parent), *Path(parent).parents) if p.exists())
    if not os.path.isdir(above):
        raise RouteLogError(f"{ENV_PATH}={path!r}: {above} is a file, not a directory; {expected}")
    if above != parent:
        raise RouteLogError(f"{ENV_PATH}={path!r}: directory {parent} does not exist; {expected}")
    records = records_path(full, format)
    try:
        if os.path.exists(records):
            with open(records, "ab") as log:
                fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(log, fcntl.LOCK_UN)
        else:
            tempfile.TemporaryFile(dir=full if os.path.isdir(full) else parent).close()
    except BlockingIOError:
        raise RouteLogError(f"{ENV_PATH}={path!r} is being written by another engine") from None
    except OSError as e:
        raise RouteLogError(f"{ENV_PATH}={path!r}: cannot write there ({e.strerror}); {expected}") from None
    return full


def route_log_settings(vllm_config) -> dict | None:
    """Front end, as the engine's config is made: the settings, checked against the
    model and the parallel layout so that bad ones fail before any process starts.
    None (the route log off) unless a VLLM_LOG_MOE* variable is set; else the
    fields of a RouteLogConfig."""
    config = RouteLogConfig.from_env()
    if config is None:
        return None
    model = vllm_config.model_config
    if model.get_num_experts() <= 0:
        raise RouteLogError(f"{ENV_PATH if config.path else ENV_METRICS} is set but {model.model} has no MoE layers")
    num_layers = model.get_total_num_hidden_layers()
    beyond = [layer for layer in config.layers or () if layer >= num_layers]
    if beyond:
        raise RouteLogError(
            f"{ENV_LAYERS}: layer(s) {beyond} out of range; {model.model} has decoder "
            f"layers 0-{num_layers - 1}; accepted: {LAYERS_HELP}"
        )
    parallel = vllm_config.parallel_config
    # Families whose layout the config does not spell out: their workers check the
    # layers as the model loads; the ring is checked here when the layers are listed.
    moe_layers = known_moe_layers(model.hf_text_config)
    layers = config.layers if moe_layers is None else select_layers(config.layers, moe_layers)
    top_k = getattr(model.hf_text_config, "num_experts_per_tok", None)
    if layers is not None and top_k:
        rows = vllm_config.scheduler_config.max_num_batched_tokens
        stages = _stage_sizes(list(layers), num_layers, parallel.pipeline_parallel_size)
        buffer_bytes(config, step_layout(rows, rows, max(stages), top_k)[-1])
    _check_speculative(vllm_config)
    unsupported = {
        "micro-batching (DBO)": getattr(parallel, "use_ubatching", False),
        # Each TP rank would route only its slice of the tokens; TP rank 0 writes.
        "sequence-parallel MoE (DP > 1 and TP > 1 with expert parallelism)": getattr(
            parallel, "use_sequence_parallel_moe", False
        ),
    }
    for feature, enabled in unsupported.items():
        if enabled:
            raise RouteLogError(
                f"{ENV_PATH} does not support {feature} yet; unset {ENV_PATH} or turn it off"
            )
    if config.metrics:
        from .metrics import metrics_directory

        config = replace(config, metrics_dir=metrics_directory())
    if config.path:
        from .front_end import returned_file

        config = replace(config, returned_path=returned_file())
    return asdict(replace(config, front_end_pid=os.getpid()))


def _check_speculative(vllm_config) -> None:
    """Draft rows are kept or cut once sampling says which drafts held: the sampler
    runs on the last pipeline stage, which logs none of the others' layers."""
    spec = vllm_config.speculative_config
    if spec is not None and vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise RouteLogError(
            f"{ENV_PATH} does not support speculative decoding ({spec.method}) with pipeline "
            f"parallelism: the drafts' verdict is sampled on the last stage only; unset "
            f"{ENV_PATH} or turn one of them off"
        )


@dataclass(frozen=True)
class WriterLayout:
    """Where this worker's records go. Routing is replicated across the TP ranks of
    a stage, so TP rank 0 writes; each (data-parallel rank, pipeline stage) writes
    its own file (a shard) and ``python -m analysis.merge`` joins them. With one of
    each, the shard is VLLM_LOG_MOE itself."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    expert_parallel: bool
    dp_rank: int
    pp_rank: int

    @classmethod
    def of(cls, parallel_config, pp_rank: int) -> "WriterLayout":
        return cls(
            tensor_parallel_size=parallel_config.tensor_parallel_size,
            pipeline_parallel_size=parallel_config.pipeline_parallel_size,
            data_parallel_size=parallel_config.data_parallel_size,
            expert_parallel=bool(parallel_config.enable_expert_parallel),
            dp_rank=parallel_config.data_parallel_rank,
            pp_rank=pp_rank,
        )

    def shard_path(self, path: str, dp_rank: int, pp_rank: int) -> str:
        return shard_path(path, dp_rank, pp_rank, self.data_parallel_size, self.pipeline_parallel_size)

    def shard_paths(self, path: str) -> list[str]:
        """Every writer's file, data-parallel rank major."""
        return [
            self.shard_path(path, dp, pp)
            for dp in range(self.data_parallel_size)
            for pp in range(self.pipeline_parallel_size)
        ]

    def meta(self, path: str) -> dict:
        return {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "expert_parallel": self.expert_parallel,
            "writer": {"dp_rank": self.dp_rank, "pp_rank": self.pp_rank, "tp_rank": 0},
            "shards": [os.path.basename(p) for p in self.shard_paths(path)],
        }


def known_moe_layers(hf_config) -> list[int] | None:
    """The MoE layers of a model family whose layout its config spells out, so that a
    dense layer in VLLM_LOG_MOE_LAYERS fails at the front end (the rules of vLLM's
    model files of these families); None for other families, whose workers check as
    they load the model (moe_routers)."""
    kind = getattr(hf_config, "model_type", None)
    layers = range(getattr(hf_config, "num_hidden_layers", 0))
    if kind in ("qwen2_moe", "qwen3_moe", "qwen3_next"):
        dense = getattr(hf_config, "mlp_only_layers", None) or []
        step = getattr(hf_config, "decoder_sparse_step", 1)
        return [i for i in layers if i not in dense and hf_config.num_experts > 0 and (i + 1) % step == 0]
    if kind in ("deepseek_v2", "deepseek_v3", "glm4_moe"):
        every = 1 if kind == "glm4_moe" else getattr(hf_config, "moe_layer_freq", 1)
        return [i for i in layers if hf_config.n_routed_experts is not None
                and i >= hf_config.first_k_dense_replace and i % every == 0]
    if kind == "llama4_text":
        step = hf_config.interleave_moe_layer_step
        return [i for i in layers if step > 0 and (i + 1) % step == 0]
    if kind in ("mixtral", "olmoe", "granitemoe", "phimoe", "gpt_oss", "minimax_m2"):  # every layer
        return list(layers)
    return None


def _stage_sizes(layers: list[int], num_layers: int, stages: int) -> list[int]:
    """Logged layers per pipeline stage (each stage's writer has its own ring)."""
    if stages == 1:
        return [len(layers)]
    from vllm.distributed.utils import get_pp_indices

    return [sum(start <= layer < end for layer in layers)
            for start, end in (get_pp_indices(num_layers, rank, stages) for rank in range(stages))]


def select_layers(
    wanted: tuple[int, ...] | None, moe_layers: list[int], stage: range | None = None
) -> list[int]:
    """The wanted layers, checked against ``moe_layers``. With pipeline parallelism
    ``stage`` is this stage's decoder layers and ``moe_layers`` its MoE layers; the
    wanted layers of other stages are theirs to log."""
    if not moe_layers and stage is None:
        raise RouteLogError(f"{ENV_PATH} is set but the model has no MoE layers")
    if wanted is None:
        return moe_layers
    here = [layer for layer in wanted if stage is None or layer in stage]
    missing = [layer for layer in here if layer not in moe_layers]
    if missing:
        of_stage = "" if stage is None else f" of pipeline stage {stage.start}-{stage.stop - 1}"
        raise RouteLogError(
            f"{ENV_LAYERS}: layer(s) {missing} are not MoE layers; valid MoE layers"
            f"{of_stage}: {_ranges(moe_layers)}; accepted: {LAYERS_HELP}"
        )
    return here


def _ranges(values: list[int]) -> str:
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def buffer_bytes(config: RouteLogConfig, step_max: int) -> int:
    """The ring's size: VLLM_LOG_MOE_BUFFER_MB, or 16 steps of the largest batch."""
    if config.buffer_mb is None:
        return max(16 * step_max, 16 << 20)
    if config.buffer_mb << 20 < step_max:
        need = -(-step_max // (1 << 20))
        raise RouteLogError(
            f"{ENV_BUFFER}={config.buffer_mb}: one step of this engine needs up to {need} MiB; "
            f"expected a whole number >= {need}"
        )
    return config.buffer_mb << 20
