# SPDX-License-Identifier: Apache-2.0
"""Per-token MoE routing log, switched on by ``VLLM_LOG_MOE=/path/log.jsonl`` (or a
parquet log, route_log/writer/columns.py), and live expert load on /metrics by
``VLLM_LOG_MOE_METRICS`` (route_log/metrics.py), with or without a log.

Call order in each worker process (every call is a no-op while the log is off):
  route_log/config.route_log_settings  front end, as the engine's config is made: settings
  attach(model, vllm_config)        model loaded, before torch.compile / graph capture
  begin_step(scheduler_output)      top of every execute_model: requests in and out
  end_forward(req_ids, qsl, done[, input_ids])  after the forward of every real (non-dummy) step
  end_sample(sampled[, num_sampled]) after sampling, with speculative decoding: which drafts held
  the log closes at process exit (atexit and multiprocessing finalizers)

CUDA-graph rule: the only work inside the forward is ``RouteLogger._capture``: two
device copies into buffers allocated in ``attach``, which graphs record and replay.
After the forward, on the model's thread: a few numpy operations map rows to
requests, device copies put the step's rows into a shared-memory ring
(route_log/engine/copies.py), and a message of 40 bytes tells the writer process
(route_log/writer/), which waits for the copy, renders the JSON (or parquet
columns) and writes it, and counts the experts' load, with its own GIL and core.

Speculative decoding: a step's last k rows of a request are its draft tokens, routed
before verification. Each step's rows go to the ring after its forward, as always, but
the step waits in a queue (engine/speculative.py; with every later begin_step, in order) until sampling
says how many drafts each request kept: ``end_sample`` queues a device-to-host copy of
the sampler's tokens with an event, and the queue is settled, oldest first, whenever
its head's event has completed (never waited for, but at close or when the ring is
full). Rejected rows are neither stored nor rendered, and the request's next position
is the first rejected one. This works with async scheduling: the runner's host
positions then run ahead by the drafts it rejected in steps whose tokens the
scheduler had not seen; such a start, between the last kept row and the end of the
last scheduled span, is the last kept row's successor (as upstream's aux-output
connector reattaches it).
"""

import atexit
import multiprocessing.util
from array import array
from functools import partial

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.route_log.channel import (
    BLOCKS,
    BLOCKS_HEAD,
    CACHED,
    REQUEST,
    REQUEST_END,
    REQUEST_END_HEAD,
    REQUEST_HEAD,
    TEXT,
    RouteLogChannel,
    WriterGone,
    step_layout,
)
from vllm.model_executor.layers.fused_moe.route_log.config import (
    ENV_PATH,
    RouteLogConfig,
    WriterLayout,
    buffer_bytes,
    select_layers,
)
from vllm.model_executor.layers.fused_moe.route_log.engine.copies import StepCopies
from vllm.model_executor.layers.fused_moe.route_log.engine.files import locked_log
from vllm.model_executor.layers.fused_moe.route_log.engine.speculative import HeldSteps
from vllm.model_executor.layers.fused_moe.route_log.engine.layers import moe_routers
from vllm.model_executor.layers.fused_moe.route_log.engine.meta import block_store_settings, route_log_meta
from vllm.model_executor.layers.fused_moe.route_log.format import format_meta
from vllm.model_executor.layers.fused_moe.route_log.engine.requests import (
    Slots,
    request_from,
)
from vllm.platforms import current_platform

logger = init_logger(__name__)

class RouteLogger:
    """Owns the device buffers, the open requests and the channel to the writer
    process of one worker. Only the thread that runs the model calls it."""

    def __init__(self, config: RouteLogConfig, meta: dict, layers: list[int], top_k: int,
                 max_rows: int, device: torch.device, path: str, request_fields: dict,
                 block_store: dict | None = None, speculative: bool = False,
                 max_model_len: int = 1 << 62):
        self.layers = layers  # may be empty on a pipeline stage without logged layers
        self.max_model_len = max_model_len
        self.top_k = top_k
        # [max_num_batched_tokens, num_logged_layers, top_k]; row i = batch row i.
        # Two buffers: torch.compile cannot trace a copy into a view of another dtype.
        self.ids = torch.zeros(max_rows, len(layers), top_k, dtype=torch.int32, device=device)
        self.weights = torch.zeros(max_rows, len(layers), top_k, dtype=torch.float32, device=device)
        self.slots = Slots()
        # {"block_size": ..., "gap_reason": ...}: None without prefix caching.
        self.block_store = block_store if layers else None
        self.speculative = speculative
        step_max = step_layout(max_rows, max_rows, len(layers), top_k)[-1]
        capacity = buffer_bytes(config, step_max)
        meta = {**meta, "buffer_bytes": capacity, **format_meta(config.format)}
        log = locked_log(path, config.format, meta) if path else None  # None: metrics only
        try:
            self.channel = RouteLogChannel(capacity, log.fileno() if log else None, {
                "path": path, "layers": layers, "top_k": top_k, "format": config.format,
                "num_experts": meta.get("num_experts", 1 << 15),
                "metrics": config.metrics and {"directory": config.metrics_dir, "granularity": config.metrics,
                                               "model_name": meta.get("served_model_name", "")},
                "request_fields": request_fields,  # extra fields of request records
                "front_end_pid": config.front_end_pid, "returned_path": config.returned_path,
                **(self.block_store or {})})
        finally:
            if log:
                log.close()  # the writer holds its own descriptor, and with it the lock
        try:
            self.copies = StepCopies(self.channel, self.ids, self.weights, pin=device.type == "cuda")
        except RuntimeError as e:
            raise RuntimeError(f"{ENV_PATH}: {e}") from None
        self.stopped = False
        self.held = HeldSteps(self) if speculative else None
        atexit.register(self.close)
        # Worker processes end through multiprocessing, which skips atexit.
        multiprocessing.util.Finalize(self, self.close, exitpriority=100)

    def close(self) -> None:
        """Ends the log: requests still open are reported as unfinished; waits for the
        writer to render what it holds."""
        if self.stopped:
            return
        if self.held is not None:
            self.held.drain(wait=True)
        for engine_id in list(self.slots.of):
            self._end_request(engine_id, finished=False)
        self.stopped = True
        status = self.channel.close(timeout=120)
        if status != 0:
            logger.error("VLLM_LOG_MOE: the route-log writer process ended with status %s; "
                         "the log may lack its closing record", status)

    def _capture(self, slot: int, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        # Inside the forward: device copies only (recorded into CUDA graphs).
        n = topk_ids.shape[0]
        if n > self.ids.shape[0]:
            raise RuntimeError(f"{ENV_PATH}: {n} routed rows exceed the buffer of {self.ids.shape[0]}")
        self.ids[:n, slot].copy_(topk_ids)
        self.weights[:n, slot].copy_(topk_weights)

    def begin_step(self, scheduler_output) -> None:
        if self.stopped:
            return
        new_reqs = scheduler_output.scheduled_new_reqs
        cached = scheduler_output.scheduled_cached_reqs
        finished = scheduler_output.finished_req_ids
        if self.held is not None:
            self.held.begin_step(scheduler_output, new_reqs, cached, finished)
            return
        self._begin(new_reqs, cached.req_ids, cached.new_block_ids, cached.resumed_req_ids, finished)

    def _begin(self, new_reqs, cached_ids, new_block_ids, resumed, finished) -> None:
        """Requests in and out: request records, their KV blocks, request_end records."""
        try:
            for new_req in new_reqs:
                if new_req.req_id in self.slots.of:
                    continue
                request = request_from(new_req, self.max_model_len if self.speculative else None)
                if request is None:
                    self.channel.count_not_logged(new_req.req_id)
                    continue
                slot = self.slots.open(request)
                req_id, engine_id = request.req_id.encode(*TEXT), request.engine_req_id.encode(*TEXT)
                prompt = array("i", new_req.prompt_token_ids or ()).tobytes()
                sample = -1 if request.sample is None else request.sample
                self.channel.post(REQUEST, REQUEST_HEAD.pack(
                    slot, len(req_id), len(engine_id), len(prompt) // 4, sample, request.prompt_len,
                    request.prompt_tokens_cached) + req_id + engine_id + prompt)
                if self.block_store is not None:
                    self._post_blocks(slot, new_req.block_ids, replace=True)
            if self.block_store is not None:
                for engine_id, new_blocks in zip(cached_ids, new_block_ids):
                    if new_blocks is not None and (slot := self.slots.of.get(engine_id)) is not None:
                        self._post_blocks(slot, new_blocks, engine_id in resumed)
            for engine_id in finished:
                self._end_request(engine_id, finished=True)
            self.channel.flush()
        except WriterGone as e:
            self._writer_gone(e)

    def _post_blocks(self, slot: int, block_ids: tuple[list[int], ...], replace: bool) -> None:
        """The request's KV blocks (cache group 0), for the writer's block store."""
        if not block_ids or not block_ids[0]:
            return
        first = 0 if replace else int(self.slots.blocks[slot])
        self.slots.blocks[slot] = first + len(block_ids[0])
        self.channel.post(BLOCKS, BLOCKS_HEAD.pack(slot, first)
                          + np.asarray(block_ids[0], dtype=np.int32).tobytes())

    def _end_request(self, engine_id: str, finished: bool) -> None:
        slot = self.slots.close(engine_id)
        if slot is not None:
            slots = self.slots
            drafts = (slots.accepted[slot], slots.rejected[slot]) if self.speculative else (-1, -1)
            self.channel.post(REQUEST_END, REQUEST_END_HEAD.pack(
                slot, finished, slots.routed[slot], slots.recomputed[slot], slots.cached[slot], *drafts))

    def end_forward(self, req_ids, query_start_loc, num_computed_tokens, input_ids=None) -> None:
        """After a real step's forward: which rows belong to which request and
        position; hands the rows (and ``input_ids``, the step's token ids [>= rows],
        when given) to the writer without waiting for the device."""
        if self.stopped or not req_ids:
            return
        n = len(req_ids)
        slots, all_mine = self.slots.of_batch(req_ids)
        starts = np.asarray(query_start_loc[: n + 1], dtype=np.int64)
        first, ends = starts[:-1], starts[1:]
        pos = np.asarray(num_computed_tokens[:n], dtype=np.int64)
        if self.held is not None:
            self.held.hold(req_ids, starts, num_computed_tokens, input_ids)
            return
        if not all_mine:
            mine = slots >= 0  # not a caller's request otherwise
            slots, first, ends, pos = slots[mine], first[mine], ends[mine], pos[mine]
        self._log_rows(slots, first, ends, pos, int(starts[n]), input_ids)

    def end_sample(self, sampled_token_ids, num_sampled=None) -> None:
        if self.held is not None:
            self.held.end_sample(sampled_token_ids, num_sampled)

    def _log_rows(self, slots, first, ends, pos, num_rows: int, input_ids, region=None) -> None:
        """Maps a step's rows to positions and sends them: per caller's request, its
        slot, first and one-past-last row, and the position of its first row. With
        ``region``, the rows are in the ring already (speculative decoding)."""
        # After a preemption the same positions run again: log each once. Positions
        # skipped forward were served by the prefix cache: the writer replays them.
        counts = ends - first
        next_pos = self.slots.next_pos[slots]
        skip = np.minimum(np.maximum(next_pos - pos, 0), counts)
        jump = np.maximum(pos - next_pos, 0)
        self.slots.recomputed[slots] += skip
        self.slots.routed[slots] += counts - skip
        self.slots.cached[slots] += jump
        self.slots.next_pos[slots] = np.maximum(next_pos, pos + counts)
        if not self.layers:
            return
        fresh = first + skip
        if self.block_store is not None:  # every row, recomputed ones too, feeds the store
            spans = (slots, pos, first, ends, fresh)
        else:
            spans = (slots, pos + skip, fresh, ends, fresh)
            if not (keep := counts > skip).all():
                spans = tuple(column[keep] for column in spans)
        try:
            if jump.any():
                hit = jump > 0
                self.channel.post(CACHED, np.stack([slots, next_pos, pos], axis=1)[hit].tobytes())
            if region is not None:
                self.copies.post(region, spans)
            elif len(spans[0]):
                self.copies.send(spans, num_rows, input_ids)
            else:
                self.channel.flush()
        except WriterGone as e:
            self._writer_gone(e)

    def _writer_gone(self, error: WriterGone) -> None:
        self.stopped = True
        logger.error("VLLM_LOG_MOE: %s; the route log stops here and generation goes on", error)


_ACTIVE: RouteLogger | None = None


def attach(model: torch.nn.Module, vllm_config, model_config=None) -> torch.nn.Module:
    """Hooks the configured layers' routers; the model is returned unchanged. A
    speculative-decoding draft model (loaded with the draft's ``model_config``) is
    not logged: its routing is a guess at the target's."""
    global _ACTIVE
    settings = vllm_config.observability_config.moe_route_log  # route_log/config.py
    if settings is None:
        return model
    config = RouteLogConfig(**settings)
    spec = vllm_config.speculative_config
    if spec is not None and model_config is not None and model_config is spec.draft_model_config \
            and model_config is not spec.target_model_config:  # n-gram: the target's own
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
    block_store = block_store_settings(vllm_config) if config.path else None
    speculative = vllm_config.speculative_config is not None
    meta = route_log_meta(vllm_config, routers, layers, layout.meta(config.path or ""), block_store)
    # Requests are split across DP ranks: say which one served each.
    request_fields = {"dp_rank": layout.dp_rank} if layout.data_parallel_size > 1 else {}
    top_k = routers[layers[0]].top_k if layers else 0
    _ACTIVE = RouteLogger(
        config, meta, layers, top_k, vllm_config.scheduler_config.max_num_batched_tokens,
        torch.device(current_platform.device_type),
        config.path and layout.shard_path(config.path, layout.dp_rank, layout.pp_rank), request_fields,
        block_store, speculative, vllm_config.model_config.max_model_len,
    )
    for slot, layer in enumerate(layers):
        routers[layer].route_log_fn = partial(_ACTIVE._capture, slot)
    return model


def begin_step(scheduler_output) -> None:
    if _ACTIVE is not None:
        _ACTIVE.begin_step(scheduler_output)


def end_forward(req_ids, query_start_loc, num_computed_tokens, input_ids=None) -> None:
    if _ACTIVE is not None:
        _ACTIVE.end_forward(req_ids, query_start_loc, num_computed_tokens, input_ids)


def end_sample(sampled, num_sampled=None) -> None:
    if _ACTIVE is not None:
        _ACTIVE.end_sample(sampled, num_sampled)
