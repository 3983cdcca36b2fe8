# SPDX-License-Identifier: Apache-2.0
"""The route-log writer process: renders and appends what the engine's worker sends.

Started by channel.RouteLogChannel with the log file (locked, meta line
written), the ring's memfd and the pipe's read end. It runs beside the engine, on
its own core and with its own GIL, so rendering never competes with the engine's
thread. It imports numpy (pyarrow for a parquet log, prometheus_client for metrics). It
ends when the pipe closes: after CLOSE with the
final 'end' record; without CLOSE (the engine died) with what it had.

Whenever the pipe is drained and every request seen has ended, the file ends with a
provisional 'end' record ("final": false), cut off again before the next write: an
engine killed while idle leaves a log that says it was complete up to then.
SIGINT and SIGTERM are ignored: the engine decides when the log ends.
"""

import json
import os
import select
import signal
import sys
import time

import numpy as np

from ..channel import (
    BLOCKS,
    BLOCKS_HEAD,
    CACHED,
    CLOSE,
    ENGINE_WAITS,
    FRAME,
    NOT_LOGGED,
    NOT_LOGGED_ID,
    REQUEST,
    REQUEST_END,
    REQUEST_END_HEAD,
    REQUEST_HEAD,
    STEP,
    TEXT,
    STEP_HEAD,
    WAIT_NS,
    SPAN,
    RingReader,
    step_layout,
)
from ..front_end import RETURNED_PREFIX, ReturnedReader, remove_orphans
from ..metrics import DIR_PREFIX
from .log_file import LogFile
from .render import fields_text, render_rows, request_end_line, request_line, request_prefix
from .store import BlockRoutes

CHUNK_RECORDS = 1 << 15  # rendered at a time: bounds the writer's own memory
NO_PROMPT_IDS = 1 << 62  # prompt_len of a prompt given as embeddings: no position is "after" it


class Writer:
    def __init__(self, args: dict):
        self.path = args["path"]
        self.layers = args["layers"]
        self.top_k = args["top_k"]
        self.pipe = args["pipe_fd"]
        self.log = LogFile(args["file_fd"], self.path)
        self.ring = RingReader(args["ring_fd"], args["capacity"])
        self.parent = os.getppid()
        self.prefix = np.full((64, 64), ord(" "), dtype=np.uint8)  # [slot, byte]
        self.prefix_len = np.zeros(64, dtype=np.int64)
        self.prompt_len = np.zeros(64, dtype=np.int64)  # [slot]: tokens whose ids came with the request
        self.stats = {"steps": 0, "route_records": 0, "requests": 0, "requests_ended": 0,
                      "cached_route_records": 0, "cached_positions_unknown": 0}
        block_size = args.get("block_size")
        self.store = BlockRoutes(block_size, len(self.layers), self.top_k) if block_size else None
        self.gap_reason = args.get("gap_reason")  # why cached positions cannot be replayed
        self.request_fields = fields_text(args.get("request_fields", {}))  # ends each request record
        self.front_end_pid = args.get("front_end_pid")
        self.returned = ReturnedReader(args.get("returned_path"))  # counts of responses the front end cut
        self.engine_ids: dict[int, str] = {}  # slot -> the engine's id of its open request
        self.columns = None  # the parquet log's route parts; None: routes are JSONL lines
        if args.get("format") == "parquet":
            from .columns import RouteColumns
            self.columns = RouteColumns(self.path, self.layers, self.top_k, args["num_experts"])
        self.load = None  # the expert load behind /metrics
        # With metrics asked for: None, or why /metrics shows no expert load ('end' says it).
        self.metrics_error: dict = {}
        if metrics := args.get("metrics"):
            from .load import LoadMetrics
            self.metrics_error = {"metrics_error": None}
            try:
                self.load = LoadMetrics(metrics["directory"], metrics["model_name"], self.layers,
                                        args["num_experts"], self.top_k, metrics["granularity"])
            except OSError as e:
                self.metrics_error["metrics_error"] = str(e)
                print(f"ERROR [route_log writer] VLLM_LOG_MOE_METRICS: {e}; /metrics will not show "
                      "expert load", file=sys.stderr, flush=True)
        self.pending: list[np.ndarray] = []  # CACHED spans [n, 3] awaiting the next STEP
        self.generated: dict[int, list[np.ndarray]] = {}  # slot -> token ids fed after the prompt
        self.not_logged_ids: list[str] = []
        self.inbox = bytearray()

    def run(self) -> None:
        self.at_rest()
        while (message := self.next_message()) is not None:
            kind, payload = message
            if kind == CLOSE:
                self.replay_cached()
                self.roll()
                self.log.write(self.end_line(final=True))
                break
            self.handle(kind, payload)
        else:
            self.roll()
        if self.load is not None:
            self.load.publish()
        self.log.flush()
        if self.front_end().get("front_end_exited"):  # killed: its exit handlers never ran
            for prefix in (RETURNED_PREFIX, DIR_PREFIX):
                remove_orphans(prefix)

    def next_message(self) -> tuple[int, bytes] | None:
        while True:
            if len(self.inbox) >= FRAME.size:
                kind, size = FRAME.unpack_from(self.inbox)
                if len(self.inbox) >= FRAME.size + size:
                    payload = bytes(self.inbox[FRAME.size : FRAME.size + size])
                    del self.inbox[: FRAME.size + size]
                    return kind, payload
            if not select.select([self.pipe], [], [], 0)[0]:
                self.at_rest()
                while self.load is not None and not select.select([self.pipe], [], [], 1.0)[0]:
                    self.load.publish()  # idle: the window gauge moves on
            data = os.read(self.pipe, 1 << 20)
            if not data:
                return None  # the engine is gone without closing the log
            self.inbox += data

    def handle(self, kind: int, payload: bytes) -> None:
        if kind == STEP:
            self.step(*STEP_HEAD.unpack(payload))
        elif kind == REQUEST:
            slot, size, id_size, tokens, sample, prompt_len, cached = REQUEST_HEAD.unpack_from(payload)
            at = REQUEST_HEAD.size + size
            req_id = payload[REQUEST_HEAD.size : at].decode(*TEXT)
            prefix = self.bind(slot, req_id, None if sample < 0 else sample)
            engine_req_id = payload[at : at + id_size].decode(*TEXT)
            self.engine_ids[slot] = engine_req_id
            prompt = np.frombuffer(payload, np.int32, tokens, at + id_size)
            # No ids (a prompt of embeddings): where the prompt ends is not known here.
            self.prompt_len[slot] = tokens or NO_PROMPT_IDS
            self.stats["requests"] += 1
            if self.log.file is not None:  # metrics alone: no line to render
                line = request_line(prefix, engine_req_id, prompt_len, cached, self.request_fields)
                self.log.write(_with_field(line, "prompt_token_ids", prompt))
        elif kind == REQUEST_END:
            slot, *counts = REQUEST_END_HEAD.unpack(payload)
            generated = self.generated.pop(slot, None)
            engine_req_id = self.engine_ids.pop(slot, "")
            self.stats["requests_ended"] += 1
            if self.log.file is not None:
                line = request_end_line(self.prefix[slot, : self.prefix_len[slot]].tobytes(), *counts,
                                        self.request_fields)
                if generated:
                    line = _with_field(line, "generated_token_ids", np.concatenate(generated))
                if (returned := self.returned.pop(engine_req_id)) is not None:
                    line = line[:-2] + b',"returned_tokens":%d}\n' % returned
                self.log.write(line)
        elif kind == BLOCKS:
            slot, first = BLOCKS_HEAD.unpack_from(payload)
            if self.store is not None:
                self.store.set_blocks(slot, first, np.frombuffer(payload, np.int32, offset=BLOCKS_HEAD.size))
        elif kind == CACHED:
            self.pending.append(np.frombuffer(payload, np.int64).reshape(-1, 3))
        elif kind == NOT_LOGGED_ID:
            self.not_logged_ids.append(payload.decode())

    def bind(self, slot: int, req_id: str, sample: int | None) -> bytes:
        """The slot's request from now on; returns its records' prefix."""
        prefix = request_prefix(req_id, sample)
        rows, width = self.prefix.shape
        if slot >= rows or len(prefix) > width:
            grown = np.full((max(rows, 2 * slot + 1), max(width, len(prefix))), ord(" "), np.uint8)
            grown[:rows, :width] = self.prefix
            self.prefix = grown
            self.prefix_len = np.resize(self.prefix_len, grown.shape[0])
            self.prompt_len = np.resize(self.prompt_len, grown.shape[0])
        self.prefix[slot] = ord(" ")
        self.prefix[slot, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        self.prefix_len[slot] = len(prefix)
        if self.columns is not None:
            self.columns.bind(slot, req_id, sample)
        return prefix

    def step(self, offset: int, end: int, rows: int, num_spans: int, has_tokens: int) -> None:
        num_layers = len(self.layers)
        ids_at, weights_at, tokens_at, trailer_at, _ = step_layout(rows, num_spans, num_layers, self.top_k)
        if not self.wait_for_device(offset + trailer_at):
            return
        spans = self.ring.array(offset, np.int64, num_spans * SPAN).reshape(-1, SPAN)
        shape, count = (rows, num_layers, self.top_k), rows * num_layers * self.top_k
        all_ids = self.ring.array(offset + ids_at, np.int32, count).reshape(shape)
        all_weights = self.ring.array(offset + weights_at, np.float32, count).reshape(shape)
        slots, first, start, stop, render_from = spans.T
        lengths = stop - start
        owner = np.repeat(np.arange(num_spans), lengths)
        row = start[owner] + np.arange(owner.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = first[owner] + row - start[owner]
        try:
            if self.store is not None:  # before replaying: a request may hit a block this step computed
                self.store.put(slots[owner], positions, all_ids[row], all_weights[row])
            self.replay_cached()
            shown = row >= render_from[owner]
            owner, row, positions = owner[shown], row[shown], positions[shown]
            if self.load is not None:
                self.load.add(all_ids[row])
            if has_tokens and self.log.file is not None:
                self.keep_generated(slots, owner, positions, self.ring.array(offset + tokens_at, np.int32, rows)[row])
            self.render(all_ids, all_weights, row, slots[owner], positions)
            if self.columns is not None and self.columns.due():
                self.roll()
        except Exception as e:  # a bug must not stop the ring: the engine would wait forever
            self.log.fail(e)
        self.ring.release(end)
        self.stats["steps"] += 1
        self.stats["route_records"] += owner.size * num_layers

    def keep_generated(self, slots, owner, positions, tokens) -> None:
        """The token ids fed at positions after each request's prompt (its generated
        tokens but the last), for its request_end record."""
        after = positions >= self.prompt_len[slots][owner]
        if not after.any():
            return
        owner, tokens = owner[after], tokens[after]
        cuts = np.flatnonzero(np.diff(owner)) + 1
        for group, part in zip(owner[np.r_[0, cuts]].tolist(), np.split(tokens, cuts)):
            self.generated.setdefault(int(slots[group]), []).append(part)

    def render(self, ids, weights, rows, slots, positions, cached: bool = False) -> None:
        """Route records of ids, weights [rows] (one per logged layer), owned by the
        requests in ``slots`` at ``positions``."""
        if self.columns is not None:
            if self.log.error is None:
                self.columns.add(ids[rows], weights[rows], slots, positions, cached)
            return
        if self.log.file is None:
            return
        prefixes = self.prefix[slots, : int(self.prefix_len[slots].max(initial=0))]
        if cached:  # one slot: no padding before the mark
            marked = np.frombuffer(b'"cached":true,', np.uint8)
            prefixes = np.hstack([prefixes, np.broadcast_to(marked, (len(slots), len(marked)))])
        chunk = max(1, CHUNK_RECORDS // max(len(self.layers), 1))
        for c in range(0, len(rows), chunk):
            sel = rows[c : c + chunk]
            self.log.write(render_rows(ids[sel], weights[sel], prefixes[c : c + chunk],
                                   positions[c : c + chunk], self.layers))

    def roll(self) -> None:
        """Closes the parquet log's open part (nothing for JSONL) and names it."""
        if self.columns is None or self.log.error is not None:
            return
        try:
            record = self.columns.roll()
        except Exception as e:  # as a failed write: the log stops, generation goes on
            self.log.fail(e)
            return
        if record is not None:
            self.log.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")

    def replay_cached(self) -> None:
        """Route records, marked cached, for positions the prefix cache served: from the
        store, or a 'gap' record for positions whose routing is not known here."""
        spans, self.pending = self.pending, []
        for slot, start, stop in (s for group in spans for s in group.tolist()):
            prefix = self.prefix[slot, : self.prefix_len[slot]].tobytes()
            known = np.zeros(stop - start, bool)
            if self.store is not None:
                ids, weights, known = self.store.get(slot, start, stop)
                rows = np.flatnonzero(known)
                self.render(ids, weights, rows, np.full(len(rows), slot), start + rows, cached=True)
                self.stats["cached_route_records"] += len(rows) * len(self.layers)
                self.stats["route_records"] += len(rows) * len(self.layers)
            for a, b in _runs(np.flatnonzero(~known)):
                self.log.write(b'{"type":"gap",' + prefix + json.dumps(
                    {"first_token_idx": start + a, "last_token_idx": start + b, "layers": self.layers,
                     "reason": self.gap_reason or "routing of these cached positions is not "
                     "known: their KV blocks were not computed by this engine's forward"},
                    separators=(",", ":"))[1:].encode() + b"\n")
                self.stats["cached_positions_unknown"] += b - a + 1

    def wait_for_device(self, trailer: int) -> bool:
        """The step's device copy has landed once its trailer reads 1. False if the
        engine died first (its device copies never finish)."""
        flag = self.ring.array(trailer, np.int64, 1)
        pause, checked = 10e-6, time.monotonic()
        while flag[0] != 1:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
            if time.monotonic() - checked > 0.1:
                if os.getppid() != self.parent:
                    return False
                checked = time.monotonic()
        return True

    def at_rest(self) -> None:
        """Flushes; with no request open, publishes the load and ends the file with a
        provisional 'end'."""
        idle = self.stats["requests"] == self.stats["requests_ended"]
        self.returned.keep_only(self.engine_ids)
        if idle and self.load is not None:
            self.load.publish()
        if self.log.file is None:
            return
        if idle and self.log.error is None:
            self.roll()
            self.log.write_provisional(self.end_line(final=False))
        self.log.flush()

    def end_line(self, final: bool) -> bytes:
        header = self.ring.header
        record = {"type": "end", "final": final, **self.stats,
                  "engine_waits": int(header[ENGINE_WAITS]),
                  "engine_wait_s": round(int(header[WAIT_NS]) / 1e9, 3),
                  "requests_not_logged": int(header[NOT_LOGGED]),
                  "requests_not_logged_ids": self.not_logged_ids,
                  "writer_max_rss_mb": _peak_rss_mb(),
                  "block_store_bytes": self.store.nbytes if self.store else 0,
                  **({"route_parts": self.columns.parts} if self.columns else {}),
                  "write_error": self.log.error, **self.metrics_error, **self.front_end(),
                  **({"returned_tokens_error": self.returned.error} if self.returned.error else {}),
                  "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    def front_end(self) -> dict:
        """Whether the process that configured the engine had exited by now: a log that
        ends while it runs was closed by the engine; after it, by its death."""
        if self.front_end_pid is None:
            return {}
        try:
            os.kill(self.front_end_pid, 0)
        except ProcessLookupError:
            return {"front_end_exited": True}
        except PermissionError:
            pass
        return {"front_end_exited": False}


def _with_field(line: bytes, name: str, values: np.ndarray) -> bytes:
    """The JSON record ``line`` ("...}\\n") with one more field, a list of integers."""
    return line[:-2] + f',"{name}":[{",".join(map(str, values.tolist()))}]}}\n'.encode()


def _runs(index: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive values in a sorted index."""
    if not index.size:
        return []
    breaks = np.flatnonzero(np.diff(index) != 1)
    return list(zip(index[np.r_[0, breaks + 1]].tolist(), index[np.r_[breaks, index.size - 1]].tolist()))


def _peak_rss_mb() -> int:
    """VmHWM: unlike ru_maxrss it starts at exec, not with the engine's size at fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmHWM"))


def main(args_json: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Writer(json.loads(args_json)).run()
