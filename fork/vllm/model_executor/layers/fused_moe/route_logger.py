# SPDX-License-Identifier: Apache-2.0
"""Per-token MoE routing log, switched on by ``VLLM_LOG_MOE=/path/log.jsonl``.

Call order in each worker process (every call is a no-op while the log is off):
  route_log_config.check_engine_config  front end, before the engine starts: settings
  attach(model, vllm_config)        model loaded, before torch.compile / graph capture
  begin_step(scheduler_output)      top of every execute_model: requests in and out
  end_forward(req_ids, qsl, done)   after the forward of every real (non-dummy) step
  the writer closes at process exit (atexit and multiprocessing finalizers)

CUDA-graph rule: the only work inside the forward is ``RouteLogger._capture``: two
device copies into buffers allocated in ``attach``, which graphs record and replay.
Rows are mapped to requests on the host after the forward, from the runner's batch
metadata, and turned into JSON by ``RouteLogWriter`` on its own thread.
"""

import atexit
import json
import multiprocessing.util
import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from vllm.model_executor.layers.fused_moe.route_log_config import (
    ENV_LAYERS,
    ENV_PATH,
    LAYERS_HELP,
    RouteLogConfig,
    RouteLogError,
    WriterLayout,
)
from vllm.model_executor.layers.fused_moe.route_log_writer import (
    RequestEnd,
    RequestStart,
    RouteLogWriter,
    StepRoutes,
)
from vllm.platforms import current_platform

SCHEMA_VERSION = 1
COVERAGE = (
    "One route record per (request, position, logged layer) that went through the "
    "forward pass. Positions served from the prefix cache skip the forward and have "
    "no route records: each request's 'request' record gives prompt_len and "
    "prompt_tokens_cached. The last generated token is never fed back, so it has none. "
    "'request_end' closes a request (finished false: still running at shutdown). "
    "Requests no caller sent (vLLM's warm-up) are not logged; 'end' counts them. "
    "An 'end' with final false was written when no request was open and the engine's "
    "processes were then stopped without closing the log: complete up to ended_at."
)


def moe_routers(model: torch.nn.Module) -> dict[int, Any]:
    """{decoder-layer index: router} for every MoE layer whose router we can hook."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    routers = {}
    for module in model.modules():
        if not isinstance(module, MoERunner):
            continue
        if module.routed_experts.quant_method.is_monolithic:
            raise RouteLogError(
                f"{ENV_PATH}: layer {module.layer_id} uses a monolithic MoE kernel that "
                "routes inside the kernel; the route log needs a modular one"
            )
        if not isinstance(module.router, BaseRouter):
            raise RouteLogError(
                f"{ENV_PATH}: router {type(module.router).__name__} is not supported"
            )
        routers[module.layer_id] = module.router
    return routers


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


@dataclass
class _Request:
    """What the worker knows of one request; positions are absolute in the request."""

    req_id: str  # the id the caller gets back
    engine_req_id: str
    sample: int | None  # index among the n samples of a parallel-sampling request
    prompt_len: int
    prompt_tokens_cached: int  # positions computed before its first forward
    next_pos: int  # every position below it is already logged
    routed: int = 0
    recomputed: int = 0
    prefix: bytes = field(init=False)

    def __post_init__(self) -> None:
        sample = "" if self.sample is None else f'"sample":{self.sample},'
        self.prefix = f'"req_id":{json.dumps(self.req_id)},{sample}'.encode()


def _prompt_len(new_req) -> int:
    if new_req.prompt_token_ids is not None:
        return len(new_req.prompt_token_ids)
    return 0 if new_req.prompt_embeds is None else new_req.prompt_embeds.shape[0]


def _request_from(new_req) -> _Request | None:
    """None for requests no caller sent (vLLM's warm-up): only the front end sets
    external_req_id."""
    engine_id = new_req.req_id
    external = getattr(new_req, "external_req_id", None)
    if external is None:
        return None
    child = re.fullmatch(rf"(\d+)_{re.escape(external)}(-[0-9a-f]{{8}})?", engine_id)
    return _Request(
        req_id=external,
        engine_req_id=engine_id,
        sample=int(child[1]) if child else None,
        prompt_len=_prompt_len(new_req),
        prompt_tokens_cached=new_req.num_computed_tokens,
        next_pos=new_req.num_computed_tokens,
    )


class RouteLogger:
    """Owns the device buffers, the request table and the writer of one worker."""

    def __init__(self, config: RouteLogConfig, vllm_config, routers: dict[int, Any],
                 layers: list[int], layout: WriterLayout):
        self.layers = layers  # may be empty on a pipeline stage without logged layers
        router = routers[layers[0]] if layers else None
        top_k = router.top_k if router else 0
        rows = vllm_config.scheduler_config.max_num_batched_tokens
        device = torch.device(current_platform.device_type)
        # [max_num_batched_tokens, num_logged_layers, top_k]; row i = batch row i.
        self.ids = torch.zeros(rows, len(self.layers), top_k, dtype=torch.int32, device=device)
        self.weights = torch.zeros(rows, len(self.layers), top_k, dtype=torch.float32, device=device)
        self.requests: dict[str, _Request] = {}
        self.not_logged = 0  # requests without a caller (vLLM's warm-up)
        self.not_logged_ids: list[str] = []  # the first 20 of them
        path = layout.shard_path(config.path, layout.dp_rank, layout.pp_rank)
        meta = self._meta(vllm_config, routers, router, layout.meta(config.path))
        # Requests are split across DP ranks: say which one served each.
        on_requests = {"dp_rank": layout.dp_rank} if layout.data_parallel_size > 1 else {}
        self.writer = RouteLogWriter(path, meta, config.max_pending_steps, on_requests,
                                     end_fields=self._end_fields)
        for slot, layer in enumerate(self.layers):
            routers[layer].route_log_fn = partial(self._capture, slot)
        atexit.register(self.close)
        # Worker processes end through multiprocessing, which skips atexit.
        multiprocessing.util.Finalize(self, self.close, exitpriority=100)

    def close(self) -> None:
        """Ends the log: requests still open are reported as unfinished."""
        for request in self.requests.values():
            self.writer.put(RequestEnd(request, finished=False))
        self.requests.clear()
        self.writer.close()

    def _end_fields(self) -> dict:
        return {"requests_not_logged": self.not_logged,
                "requests_not_logged_ids": list(self.not_logged_ids)}

    def _capture(self, slot: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        # Inside the forward: device copies only (recorded into CUDA graphs).
        n = topk_ids.shape[0]
        if n > self.ids.shape[0]:
            raise RuntimeError(f"{ENV_PATH}: {n} routed rows exceed the buffer of {self.ids.shape[0]}")
        self.ids[:n, slot].copy_(topk_ids)
        self.weights[:n, slot].copy_(topk_weights)

    def begin_step(self, scheduler_output) -> None:
        for new_req in scheduler_output.scheduled_new_reqs:
            if new_req.req_id in self.requests:
                continue
            request = _request_from(new_req)
            if request is None:
                self.not_logged += 1
                if len(self.not_logged_ids) < 20:
                    self.not_logged_ids.append(new_req.req_id)
                continue
            self.requests[new_req.req_id] = request
            self.writer.put(RequestStart(request))
        for engine_id in scheduler_output.finished_req_ids:
            request = self.requests.pop(engine_id, None)
            if request is not None:
                self.writer.put(RequestEnd(request, finished=True))

    def end_forward(self, req_ids, query_start_loc, num_computed_tokens) -> None:
        spans = []
        for i, engine_id in enumerate(req_ids):
            request = self.requests.get(engine_id)
            if request is None:
                continue  # not a caller's request
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            pos = int(num_computed_tokens[i])
            # After a preemption the same positions run again: log each once.
            skip = min(max(request.next_pos - pos, 0), end - start)
            request.recomputed += skip
            request.routed += end - start - skip
            request.next_pos = max(request.next_pos, pos + end - start)
            if end - start > skip:
                spans.append((request.prefix, pos + skip, start + skip, end))
        if not spans or not self.layers:
            return
        num_rows = int(query_start_loc[len(req_ids)])
        ids, weights, ready = self._snapshot(num_rows)
        self.writer.put(StepRoutes(ids, weights, ready, spans, self.layers))

    def _snapshot(self, num_rows: int):
        """Copies this step's rows off the device before the next forward reuses them:
        the copy is queued on the same stream, after this forward and before the next."""
        if self.ids.device.type != "cuda":
            return self.ids[:num_rows].clone(), self.weights[:num_rows].clone(), None
        ids = torch.empty((num_rows, *self.ids.shape[1:]), dtype=torch.int32, pin_memory=True)
        weights = torch.empty(ids.shape, dtype=torch.float32, pin_memory=True)
        ids.copy_(self.ids[:num_rows], non_blocking=True)
        weights.copy_(self.weights[:num_rows], non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return ids, weights, ready

    def _meta(self, vllm_config, routers: dict[int, Any], router, parallel: dict) -> dict:
        import vllm

        model = vllm_config.model_config
        return {
            "type": "meta",
            "schema": SCHEMA_VERSION,
            "model_id": model.model,
            "vllm_version": vllm.__version__,
            "torch_version": torch.__version__,
            "device": _device_name(),
            "dtype": str(model.dtype).removeprefix("torch."),
            "seed": model.seed,
            "layers_logged": self.layers,
            "moe_layers": sorted(routers),
            "num_layers": model.get_total_num_hidden_layers(),
            "num_experts": router.global_num_experts if router else model.get_num_experts(),
            "top_k": router.top_k if router else None,
            "renormalize": getattr(router, "renormalize", None),
            "prefix_caching": bool(vllm_config.cache_config.enable_prefix_caching),
            "enforce_eager": bool(model.enforce_eager),
            "cudagraph_mode": str(vllm_config.compilation_config.cudagraph_mode),
            "model_runner": "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1",
            "async_scheduling": bool(vllm_config.scheduler_config.async_scheduling),
            "parallel": parallel,
            "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
            "weight_decimals": 9,
            "coverage": COVERAGE,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"cpu: {names[0]}" if names else "cpu"
    except OSError:
        return "cpu"


_ACTIVE: RouteLogger | None = None


def attach(model: torch.nn.Module, vllm_config) -> torch.nn.Module:
    """Hooks the configured layers' routers; the model is returned unchanged."""
    global _ACTIVE
    config = RouteLogConfig.from_env()
    if config is None:
        return model
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank
    from vllm.distributed.utils import get_pp_indices

    routers = moe_routers(model)
    layout = WriterLayout.of(vllm_config.parallel_config, get_pp_group().rank_in_group)
    stage = None
    if layout.pipeline_parallel_size > 1:
        stage = range(*get_pp_indices(
            vllm_config.model_config.get_total_num_hidden_layers(),
            layout.pp_rank, layout.pipeline_parallel_size,
        ))
    layers = select_layers(config.layers, sorted(routers), stage)
    if get_tensor_model_parallel_rank() != 0:
        return model  # routing is replicated across TP ranks; rank 0 writes
    if _ACTIVE is not None:
        raise RuntimeError(f"{ENV_PATH}: a second model was loaded in this process")
    _ACTIVE = RouteLogger(config, vllm_config, routers, layers, layout)
    return model


def begin_step(scheduler_output) -> None:
    if _ACTIVE is not None:
        _ACTIVE.begin_step(scheduler_output)


def end_forward(req_ids, query_start_loc, num_computed_tokens) -> None:
    if _ACTIVE is not None:
        _ACTIVE.end_forward(req_ids, query_start_loc, num_computed_tokens)
