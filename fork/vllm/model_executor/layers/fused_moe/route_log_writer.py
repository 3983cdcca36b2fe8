# SPDX-License-Identifier: Apache-2.0
"""Background JSONL writer of the MoE route log (see route_logger.py).

The engine thread only enqueues; this thread waits for each step's device-to-host
copy, renders its records with numpy (whole columns at a time, so the GIL is
mostly free for the engine) and appends them. The queue is bounded: when the
writer falls behind, ``put`` blocks the engine (back-pressure) and the wait is
counted in the closing record, so no record is ever dropped silently.

Whenever the queue is drained and every request seen has ended, the file ends with
a provisional 'end' record ("final": false), cut off again before the next write:
an engine killed while idle (vLLM force-kills engine processes that do not exit
within seconds of a shutdown) leaves a log that says it was complete up to then.
"""

import fcntl
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm.logger import init_logger

logger = init_logger(__name__)

WEIGHT_SCALE = 10**9  # weights are written with 9 decimals: |error| <= 5e-10


@dataclass
class StepRoutes:
    ids: Any  # torch int32 [num_rows, num_logged_layers, top_k], host memory once ready
    weights: Any  # torch float32, same shape
    ready: Any  # torch.cuda.Event to wait on, or None
    spans: list  # (request prefix bytes, first position, first row, end row)
    layers: list[int]


@dataclass
class RequestStart:
    request: Any  # route_logger._Request, first seen by the worker


@dataclass
class RequestEnd:
    request: Any  # route_logger._Request
    finished: bool  # False: still running when the engine shut down


def render_routes(ids: np.ndarray, weights: np.ndarray, spans, layers) -> bytes | memoryview:
    """Route records of one step, one JSON object per line, all columns at once.

    Numbers are right-aligned in fixed-width fields padded with spaces (valid JSON
    whitespace), so every line of a step has the same length.
    """
    if not spans:
        return b""
    rows = np.concatenate([np.arange(s, e) for _, _, s, e in spans])
    pos = np.concatenate([np.arange(p, p + e - s) for _, p, s, e in spans])
    owner = np.repeat(np.arange(len(spans)), [e - s for _, _, s, e in spans])
    top_k = ids.shape[2]
    step_ids, ids = ids, ids[rows].reshape(-1, top_k).astype(np.int64)
    scaled = np.rint(weights[rows].reshape(-1, top_k).astype(np.float64) * WEIGHT_SCALE)
    if ids.min() < 0 or not np.isfinite(scaled).all() or scaled.min() < 0:
        return render_routes_plain(step_ids, weights, spans, layers)
    scaled = scaled.astype(np.int64)
    num_layers = len(layers)
    prefixes = [p for p, _, _, _ in spans]
    width = max(map(len, prefixes))
    table = np.full((len(spans), width), ord(" "), dtype=np.uint8)
    for i, p in enumerate(prefixes):
        table[i, : len(p)] = np.frombuffer(p, dtype=np.uint8)
    pieces: list = [b'{"type":"route",', table[np.repeat(owner, num_layers)], b'"token_idx":']
    pieces += [_digits(np.repeat(pos, num_layers)), b',"layer":']
    pieces += [_digits(np.tile(np.asarray(layers, dtype=np.int64), len(rows))), b',"topk_ids":[']
    id_width = _width(ids)
    for k in range(top_k):
        pieces += [b"," if k else b"", _digits(ids[:, k], id_width)]
    pieces.append(b'],"topk_weights":[')
    int_width = _width(scaled // WEIGHT_SCALE)
    for k in range(top_k):
        pieces += [b"," if k else b"", _digits(scaled[:, k] // WEIGHT_SCALE, int_width), b"."]
        pieces.append(_digits(scaled[:, k] % WEIGHT_SCALE, 9, pad=ord("0")))
    pieces.append(b"]}\n")
    return _assemble(pieces, len(rows) * num_layers)


def _width(values: np.ndarray) -> int:
    return len(str(int(values.max()))) if values.size else 1


# [1000, 3] uint8: the three zero-padded ASCII digits of 0..999
_TRIPLES = np.frombuffer("".join(f"{i:03d}" for i in range(1000)).encode(), np.uint8).reshape(-1, 3)


def _digits(values: np.ndarray, width: int | None = None, pad: int = ord(" ")) -> np.ndarray:
    """uint8 [len(values), width]: decimal digits, right-aligned, padded with ``pad``.
    Three digits per table lookup: integer division is the slow part."""
    width = width or _width(values)
    groups = [_TRIPLES[values // 1000**g % 1000] for g in range(-(-width // 3) - 1, -1, -1)]
    digits = np.concatenate(groups, axis=1)[:, -width:]
    if pad != ord("0") and width > 1:
        powers = 10 ** np.arange(width - 1, 0, -1, dtype=np.int64)
        digits[:, :-1][values[:, None] < powers] = pad
    return digits


def _assemble(pieces: list, num_records: int) -> memoryview:
    widths = [len(p) if isinstance(p, bytes) else p.shape[1] for p in pieces]
    out = np.empty((num_records, sum(widths)), dtype=np.uint8)
    col = 0
    for piece, w in zip(pieces, widths):
        if isinstance(piece, bytes):
            out[:, col : col + w] = np.frombuffer(piece, dtype=np.uint8)
        else:
            out[:, col : col + w] = piece
        col += w
    return memoryview(out).cast("B")


def render_routes_plain(ids, weights, spans, layers) -> bytes:
    """Record by record, with json, from the same arguments as render_routes: the
    fallback for values the fast path cannot write (negative ids, non-finite weights)
    and the reference the tests hold it to."""
    lines = []
    for prefix, first, start, end in spans:
        for position, row in enumerate(range(start, end), first):
            for slot, layer in enumerate(layers):
                weights_out = [round(float(w), 9) if np.isfinite(w) else None for w in weights[row, slot]]
                lines.append(
                    f'{{"type":"route",{prefix.decode()}"token_idx":{position},"layer":{layer},'
                    f'"topk_ids":{json.dumps(ids[row, slot].tolist())},'
                    f'"topk_weights":{json.dumps(weights_out)}}}\n'
                )
    return "".join(lines).encode()


class RouteLogWriter:
    """Owns the log file from its meta line to its closing 'end' record."""

    def __init__(self, path: str, meta: dict, max_pending_steps: int,
                 on_requests: dict | None = None, end_fields=dict):
        self.path = path
        self.on_requests = on_requests or {}  # extra fields of request records
        self.end_fields = end_fields  # () -> the caller's fields of 'end' records
        self._file = open(path, "ab")  # truncated only once the lock is held
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ValueError(
                f"VLLM_LOG_MOE={path!r} is being written by another engine"
            ) from None
        self.stats = {"steps": 0, "route_records": 0, "requests": 0, "requests_ended": 0,
                      "engine_waits": 0}
        self.error: str | None = None
        self._provisional_end_at: int | None = None  # offset of a provisional 'end'
        self._file.truncate(0)
        self._file.write(_json_line(meta))
        self._at_rest()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_steps)
        self._thread = threading.Thread(target=self._run, name="moe-route-log", daemon=True)
        self._thread.start()
        self._closed = False

    def put(self, item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.stats["engine_waits"] += 1
            self._queue.put(item)

    def close(self) -> None:
        """Drains the queue, appends the final 'end' record and closes the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._write(self._end_line(final=True))
        self._file.close()

    def _end_line(self, final: bool) -> bytes:
        return _json_line({"type": "end", "final": final, **self.stats, **self.end_fields(),
                           "write_error": self.error,
                           "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(self._render(item))
                if self._queue.empty():
                    self._at_rest()
            except Exception as e:  # the engine must never block on a dead writer
                self._fail(e)
            self._queue.task_done()

    def _at_rest(self) -> None:
        """Flushes; with no request open, ends the file with a provisional 'end'."""
        if self.stats["requests"] == self.stats["requests_ended"] and self.error is None:
            self._file.flush()
            offset = self._file.tell()
            self._write(self._end_line(final=False))
            self._provisional_end_at = offset
        self._file.flush()

    def _render(self, item) -> bytes:
        if isinstance(item, RequestStart):
            self.stats["requests"] += 1
            return _request_line("request", item.request, **self.on_requests)
        if isinstance(item, RequestEnd):
            self.stats["requests_ended"] += 1
            return _request_line("request_end", item.request, finished=item.finished,
                                 **self.on_requests)
        if item.ready is not None:
            item.ready.synchronize()
        self.stats["steps"] += 1
        self.stats["route_records"] += sum(e - s for _, _, s, e in item.spans) * len(item.layers)
        return render_routes(item.ids.numpy(), item.weights.numpy(), item.spans, item.layers)

    def _write(self, data: bytes) -> None:
        if self.error is None:
            try:
                if self._provisional_end_at is not None:
                    self._file.flush()
                    self._file.truncate(self._provisional_end_at)
                    self._provisional_end_at = None
                self._file.write(data)
            except OSError as e:
                self._fail(e)

    def _fail(self, e: Exception) -> None:
        if self.error is None:
            self.error = f"{type(e).__name__}: {e}"
            logger.error("VLLM_LOG_MOE: writing %s failed (%s); the route log stops "
                         "here and generation goes on", self.path, self.error)


def _request_line(kind: str, request, **extra) -> bytes:
    record = {"type": kind, "req_id": request.req_id}
    if request.sample is not None:
        record["sample"] = request.sample
    if kind == "request":
        record.update(engine_req_id=request.engine_req_id, prompt_len=request.prompt_len,
                      prompt_tokens_cached=request.prompt_tokens_cached)
    else:
        record.update(routed_positions=request.routed,
                      recomputed_positions=request.recomputed)
    record.update(extra)
    return _json_line(record)


def _json_line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"
