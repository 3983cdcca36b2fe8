"""Reads a route log into an expert-load table: DuckDB reads the records (source.py), a
batch at a time in the log's order, from a JSONL file here or a parquet log's directory
through parquet_log.py; LogReader checks and counts them.

Memory stays bounded by the batch plus ~70 bytes per (request, sample, layer), whatever
the log's size; a log out of one writer's order is read again with the exact set of
keys (seen_keys.py: 32 MiB plus 8 bytes per key). The load table has one row per
(layer, phase, expert): how often the expert was chosen and its summed gate weight. A
batch's distinct records are counted on two more threads while DuckDB reads the next.
"""

import json
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from analysis.aggregates import WINDOW, Aggregates
from analysis.heap import keep_freed_memory
from analysis.log_format import (PHASES, TOKEN_LAYERS, WEIGHT_UNITS, LogFormatError, RouteLog, read_meta,
                                 records_of, weight_units)
from analysis.neighbours import Neighbours, expert_masks, top_choice
from analysis.seen_keys import OutOfOrder, SeenRoutes, Streams
from analysis.source import (BATCH_ROWS, conflicting_repeats, jsonl_batches, last_line, line_of_row, unfinished_tail,
                             why_unreadable)
from analysis.tokens import TokenCounts


RARE_FIELDS = ["first_token_idx", "last_token_idx", "layers", "file", "rows", "closed_at", "final", "ended_at",
               "write_error", "front_end_exited"]
ROUTE_FIELDS = ["req_id", "sample", "token_idx", "layer", "topk_ids", "topk_weights", "cached"]
CACHED = PHASES.index("cached")
MAX_POSITION = 1 << 31  # token_idx beyond it: no engine's context, and it would alias another key


def wrong_field(record: dict) -> str | None:
    """Why a record's fields have types no writer gives, or None."""
    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if record["type"] == "route":
        for name in ("token_idx", "layer"):
            if name in record and not integer(record[name]):
                return f"{name} must be an integer, got {json.dumps(record[name])}"
        if "sample" in record and record["sample"] is not None and not integer(record["sample"]):
            return f"sample must be an integer, got {json.dumps(record['sample'])}"
        if not isinstance(record.get("req_id"), (str, int)) or isinstance(record.get("req_id"), bool):
            return f"req_id must be a string, got {json.dumps(record.get('req_id'))}"
        ids = record.get("topk_ids")
        if not isinstance(ids, list) or not all(integer(i) for i in ids):
            return f"topk_ids must be a list of integers, got {json.dumps(ids)}"
        weights = record.get("topk_weights")
        if not isinstance(weights, list) or not all(w is None or (isinstance(w, (int, float))
                                                                 and not isinstance(w, bool)) for w in weights):
            return f"topk_weights must be a list of numbers, got {json.dumps(weights)}"
    return None


def read_for_cli(path: str, layers: list[int] | None) -> tuple[RouteLog, list[int]]:
    """read_log for the command-line shells: a bad log or an unlogged layer becomes one
    line on stderr and exit status 2. Returns the log and the layers asked (default all)."""
    keep_freed_memory()
    try:
        log = read_log(path, token_layers=(layers or [])[:TOKEN_LAYERS] or None)
    except (LogFormatError, OSError) as e:
        _exit_with(f"{path}: {e}")
    logged = log.meta["layers_logged"]
    unknown = [layer for layer in layers or [] if layer not in logged]
    if unknown:
        _exit_with(f"layer(s) {unknown} not in the log; logged: {logged}")
    return log, layers or logged


def check_output(path: str | Path) -> None:
    """For the command-line shells, before a log is read: where ``path`` goes must be an
    existing, writable directory; else one line on stderr and exit status 2."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        _exit_with(f"{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        _exit_with(f"{path}: directory {parent} is not writable")


def _exit_with(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def read_log(path: str | Path, batch_rows: int = BATCH_ROWS, window: int = WINDOW,
             token_layers: list[int] | None = None) -> RouteLog:
    """A JSONL log, or a parquet log's directory (analysis.parquet_log).
    ``token_layers``: layers whose token specialisation is counted (default: the first).
    A log out of one writer's order is read a second time, de-duplicated exactly."""
    try:
        return _read_log(path, batch_rows, window, token_layers, exact=False)
    except OutOfOrder:
        return _read_log(path, batch_rows, window, token_layers, exact=True)


def _read_log(path, batch_rows: int, window: int, token_layers, exact: bool) -> RouteLog:
    if Path(path).is_dir():
        from analysis.parquet_log import read_parquet_log
        return read_parquet_log(path, batch_rows, window, token_layers, exact)
    with open(path, "rb") as f:
        meta = read_meta(f.readline())
    with LogReader(meta, window, token_layers, path, exact) as reader:
        tail = unfinished_tail(path)
        feed_rows(path, reader, batch_rows, tail)
        return reader.result(tail)


def feed_rows(path: str | Path, reader: "LogReader", batch_rows: int, tail: bytes) -> None:
    """Gives the reader every line after the meta line but an unfinished last one."""
    for batch in complete_rows(path, batch_rows, tail):
        reader.add(batch)


def complete_rows(path: str | Path, batch_rows: int, tail: bytes):
    """The file's rows in batches, less the unfinished last line ``tail`` (if any)."""
    pending = None
    for batch in jsonl_batches(path, batch_rows):
        if pending is not None:
            yield pending
        pending = batch
    if pending is not None:
        yield pending.slice(0, pending.num_rows - 1) if tail.strip() else pending


class LogReader:
    def __init__(self, meta: dict, window: int, token_layers: list[int] | None, path: str | Path | None = None,
                 exact: bool = False):
        self.meta = meta
        self.path = path  # the JSONL file whose rows are read (a parquet log's records.jsonl)
        self.log_path = path  # the log itself (a parquet log's directory)
        self.layers = list(meta["layers_logged"])
        self.inferred = "num_experts" not in meta
        self.num_experts = 0 if self.inferred else meta["num_experts"]
        self.top_k = meta["top_k"]
        self.agg = Aggregates(self.layers, self.num_experts, window)
        # A chunk's distinct records are counted on two more threads while the next is read
        # (numpy releases the GIL): the sums (load, pairs, histograms) on one, what follows
        # log order (windows, token counts) on the other. One chunk in flight keeps log
        # order and bounds memory; the reading thread settles it before it touches what the
        # counting reads.
        self.pools = [ThreadPoolExecutor(max_workers=1) for _ in range(2)]
        self.pending: list[Future] = []
        self.token_counts = TokenCounts(self.layers, token_layers or self.layers[:1])
        self.neighbours = Neighbours(len(self.layers), self.num_experts, self.top_k)
        shape = (len(self.layers), len(PHASES), self.num_experts)
        self.count = np.zeros(shape, np.int64)
        self.weight = np.zeros(shape, np.int64)  # in 1 / WEIGHT_UNITS: exact, whatever the order of reading
        self.tokens = np.zeros(shape[:2], np.int64)
        self.prompt_len: dict[str, int] = {}
        self.request_keys: set[tuple[str, int | None]] = set()  # (req_id, sample) of 'request' records
        self.unended: set[tuple[str, int | None]] = set()  # of those, without a 'request_end' yet
        self.null_weights = 0  # weights the writer wrote as null
        self.seen = SeenRoutes(exact)  # which route keys were counted so far
        self.streams = Streams()
        self.computed = np.zeros(0, np.int64)  # [stream] computed (not cached) route records read
        self.short_ends = 0  # request_end records whose computed positions outnumber those read
        self.cut = np.zeros(2, np.int64)  # requests the front end cut; their positions past the cut
        self.row = 0  # rows (non-blank lines, the meta line's included) consumed so far
        self.log = RouteLog(meta, pd.DataFrame(), pd.DataFrame())
        # Set, request_end records wait for end_requests (their routes come later).
        self.deferred_ends: list[dict] | None = None
        self.parts: list[dict] = []  # a parquet log's 'part' records
        self.end_row: int | None = None  # the JSONL row of the 'end' record
        self.parts_in_batches = False  # parquet: neighbours are paired a part at a time (end_part)

    def add(self, batch: pa.RecordBatch) -> None:
        """The next rows of the JSONL file, in order."""
        table = pa.Table.from_batches([batch])
        is_route = pc.equal(table["type"], "route").fill_null(False).to_numpy(zero_copy_only=False)
        self._check_rows(table, is_route)
        others = np.flatnonzero(~is_route)  # few: their types as Python strings
        kind = np.array(table["type"].take(pa.array(others)).to_pylist(), dtype=object)
        requests, ended = others[kind == "request"], others[kind == "request_end"]
        rare = (kind != "request") & (kind != "request_end")
        for row, kind_of, record in zip(others[rare], kind[rare], records_of(table, others[rare], RARE_FIELDS)):
            self._other(kind_of, record, self.row + row)  # the end, gaps, unknown types
        self._settle()  # the counting threads read the requests' prompts
        for record in records_of(table, requests):
            self.request_keys.add((str(record["req_id"]), record.get("sample")))
            self.unended.add((str(record["req_id"]), record.get("sample")))
            if "prompt_len" in record:
                self.prompt_len[str(record["req_id"])] = record["prompt_len"]
            self.token_counts.request(record)
        if len(others) < table.num_rows:
            rows = self.row + np.flatnonzero(is_route)
            routes = table.select(ROUTE_FIELDS).filter(pa.array(is_route))  # the other columns are not copied
            self.routes(routes, lambda i: f"line {line_of_row(self.path, rows[i])[0]}")
        ends = records_of(table, ended)
        if self.deferred_ends is None:
            self.end_requests(ends)  # after the routes they close
        else:
            self.deferred_ends += ends
        self.row += table.num_rows

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc) -> None:
        """The counting threads end (a read stopped by an error leaves them idle)."""
        for pool in self.pools:
            pool.shutdown(cancel_futures=True)

    def end_requests(self, records: list[dict]) -> None:
        self._settle()
        for record in records:
            self.unended.discard((str(record["req_id"]), record.get("sample")))
            self.token_counts.request_end(record)
            stream = self.streams.ids.get((str(record["req_id"]), record.get("sample") or 0))
            read = 0 if stream is None else self.computed[stream]
            self.short_ends += int(read < record.get("routed_positions", 0) * len(self.layers))
            if "returned_tokens" in record:  # positions >= prompt_len + returned_tokens: never returned
                logged = record.get("routed_positions", 0) + record.get("cached_positions", 0)
                prompt_len = self.prompt_len.get(str(record["req_id"]), logged)
                self.cut += (1, max(0, logged - prompt_len - record["returned_tokens"]))

    def _other(self, kind: str, record: dict, row: int) -> None:
        if kind == "end":  # its every field: read from the file (usually its last line) in result()
            self.log.end, self.end_row = record, row
        elif kind == "part":
            self.parts.append(record)
        elif kind == "gap":
            gap = record
            layers = len(gap.get("layers", self.layers))
            self.log.gap_records += (gap["last_token_idx"] - gap["first_token_idx"] + 1) * layers
        elif kind != "meta":
            self.log.unknown_types[kind] = self.log.unknown_types.get(kind, 0) + 1

    def routes(self, routes: pa.Table, where, decimals: int | None = None) -> None:
        """Route records: ``where(i)`` names record i's place in the log for errors;
        ``decimals``: weights rounded as the JSONL writer rounds them."""
        for name in ("req_id", "token_idx", "layer", "topk_ids", "topk_weights"):
            if routes[name].null_count:
                bad = np.flatnonzero(routes[name].is_null().to_numpy(zero_copy_only=False))[0]
                raise LogFormatError(f"{where(bad)}: route record without {name}")
        sizes = pc.list_value_length(routes["topk_ids"]).to_numpy()
        wsizes = pc.list_value_length(routes["topk_weights"]).to_numpy()
        if (sizes != self.top_k).any() or (wsizes != self.top_k).any():
            bad = np.flatnonzero((sizes != self.top_k) | (wsizes != self.top_k))[0]
            raise LogFormatError(f"{where(bad)}: expected top_k={self.top_k} ids and weights")
        layer = routes["layer"].to_numpy()
        slot = np.searchsorted(self.layers, layer)
        slot_ok = (slot < len(self.layers)) & (np.asarray(self.layers)[np.minimum(slot, len(self.layers) - 1)] == layer)
        ids = pc.list_flatten(routes["topk_ids"]).to_numpy().reshape(-1, self.top_k).astype(np.int32, copy=False)
        if self.inferred and ids.size and ids.max() >= self.num_experts:
            self._grow(int(ids.max()) + 1)
        ok = slot_ok
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            ok = ok & (ids >= 0).all(1) & (ids < self.num_experts).all(1)
        if not ok.all():
            bad = np.flatnonzero(~ok)[0]
            raise LogFormatError(f"{where(bad)}: layer or expert id outside the meta header's")
        weights = pc.list_flatten(routes["topk_weights"]).to_numpy(zero_copy_only=False).reshape(-1, self.top_k)
        token_idx = routes["token_idx"].to_numpy()
        masks = expert_masks(ids, self.neighbours.words)
        weights = self._check_values(ids, masks, weights, token_idx, where)
        if decimals is not None:
            weights = weights.astype(np.float64)  # in place from here: one copy
            weights *= 10**decimals
            np.rint(weights, out=weights)
            weights /= 10**decimals
        # A chunk holds few distinct requests: work on their ids, then index per row.
        encoded = pc.dictionary_encode(routes["req_id"]).combine_chunks()
        names, row_req = encoded.dictionary.to_pylist(), encoded.indices.to_numpy()
        samples = routes["sample"].fill_null(0).to_numpy()
        stream = self.streams.of(names, row_req, samples)
        fresh = self.seen.add_new(stream * len(self.layers) + slot, token_idx)
        self.log.records += len(layer)
        self.log.duplicates += int((~fresh).sum())
        phase = self._phases(names, row_req, token_idx, routes["cached"])
        computed = np.bincount(stream[phase != CACHED], minlength=len(self.streams.ids))
        self.computed = np.pad(self.computed, (0, len(computed) - len(self.computed))) + computed
        if not fresh.all():
            slot, phase, ids, weights, masks = slot[fresh], phase[fresh], ids[fresh], weights[fresh], masks[fresh]
            samples, row_req, token_idx, stream = samples[fresh], row_req[fresh], token_idx[fresh], stream[fresh]
        top1, top1_weight = top_choice(ids, weights)
        self._settle()
        self.pending = [self.pools[0].submit(self._tally_sums, slot, phase, ids, weights, top1_weight),
                        self.pools[1].submit(self._tally_ordered, slot, ids,
                                             (names, samples, row_req, token_idx), (stream, masks, top1))]

    def _check_values(self, ids: np.ndarray, masks: np.ndarray, weights: np.ndarray, token_idx: np.ndarray,
                      where) -> np.ndarray:
        """Values no engine writes stop the reading, named with their place. A weight the
        writer wrote as null (not finite in the engine) is counted, as 0, in a note.
        Returns the weights, those as 0."""
        bad = (token_idx < 0) | (token_idx >= MAX_POSITION)
        if bad.any():
            raise LogFormatError(f"{where(np.flatnonzero(bad)[0])}: token_idx outside 0..{MAX_POSITION - 1}")
        chosen = np.bitwise_count(masks).sum(1)  # distinct experts of each row
        if (chosen < ids.shape[1]).any():
            row = np.flatnonzero(chosen < ids.shape[1])[0]
            raise LogFormatError(f"{where(row)}: topk_ids names an expert twice: {ids[row].tolist()}")
        if not np.isfinite(weights.sum()):
            self.null_weights += int((~np.isfinite(weights)).sum())
            weights = np.where(np.isfinite(weights), weights, 0.0)
        if weights.size and (weights.min() < 0 or weights.max() > 1 + 1e-6):
            row = np.flatnonzero(((weights < 0) | (weights > 1 + 1e-6)).any(axis=1))[0]
            raise LogFormatError(f"{where(row)}: topk_weights must lie in [0, 1], got {weights[row].tolist()}")
        return weights

    def _tally_ordered(self, slot, ids, token_rows, neighbour_rows) -> None:
        """Windows, token counts and neighbours of distinct route records (one chunk at a
        time, in order)."""
        if self.token_counts.prompts:
            self.token_counts.routes(*token_rows, slot, ids)
        self.agg.add_windows(slot, ids)
        stream, masks, top1 = neighbour_rows
        self.neighbours.add(stream, slot, token_rows[3], masks, top1)
        if not self.parts_in_batches:
            self.neighbours.pair(hold_last=True)

    def end_part(self) -> None:
        """A parquet part's batches are all in: its neighbours are paired, on the thread
        that added them, while the next part is read."""
        self._settle()
        self.pending = [self.pools[1].submit(self.neighbours.pair)]

    def _tally_sums(self, slot, phase, ids, weights, top1_weight) -> None:
        """Load, pairs and histograms of distinct route records."""
        self.agg.add_sums(slot, ids, weights, top1_weight)
        cell = (slot * len(PHASES) + phase)[:, None] * self.num_experts + ids
        size = self.count.size
        self.count += np.bincount(cell.ravel(), minlength=size).reshape(self.count.shape)
        self.weight += weight_units(cell, weights, size).reshape(self.weight.shape)
        self.tokens += np.bincount(slot * len(PHASES) + phase, minlength=self.tokens.size).reshape(self.tokens.shape)

    def _settle(self) -> None:
        for pending in self.pending:
            pending.result()
        self.pending = []

    def _grow(self, num_experts: int) -> None:
        self._settle()
        extra = ((0, 0), (0, 0), (0, num_experts - self.num_experts))
        self.count, self.weight = np.pad(self.count, extra), np.pad(self.weight, extra)
        self.agg.grow(num_experts)
        self.neighbours.grow_experts(num_experts)
        self.num_experts = num_experts

    def _phases(self, names, row_req, token_idx, cached) -> np.ndarray:
        """0 prompt, 1 generated, 2 unknown (no 'request' record seen for the id),
        3 cached (replayed from the prefix cache)."""
        prompt_len = np.array([self.prompt_len.get(n, -1) for n in names], np.int64)[row_req]
        phase = np.where(prompt_len < 0, 2, (token_idx >= prompt_len).astype(np.int64))
        return np.where(cached.fill_null(False).to_numpy(zero_copy_only=False), 3, phase)

    def _unreadable(self, row: int, default: str) -> LogFormatError:
        """The error for the JSONL row ``row``, named by its line and, where the line says
        more than DuckDB's nulls, by what is wrong with it."""
        number, line = line_of_row(self.path, row)
        reason = why_unreadable(line)
        return LogFormatError(f"line {number}: {default if reason == 'unreadable' else reason}")

    def _check_rows(self, table: pa.Table, is_route: np.ndarray) -> None:
        """What DuckDB's read flags (a line it could not read, a key or id that is not a
        whole number), and route records without a required field, named by line."""
        for flag in (table["type"].is_null(), table["suspect"]):
            if pc.any(flag).as_py():
                bad = np.flatnonzero(flag.fill_null(False).to_numpy(zero_copy_only=False))[0]
                raise self._unreadable(self.row + bad, "unreadable (a line over DuckDB's 16 MB maximum_object_size?)")
        for name in ("req_id", "token_idx", "layer", "topk_ids", "topk_weights"):
            if table[name].null_count:
                missing = np.flatnonzero(is_route & table[name].is_null().to_numpy(zero_copy_only=False))
                if len(missing):
                    raise self._unreadable(self.row + missing[0], f"route record without {name}")

    def result(self, tail: bytes) -> RouteLog:
        log = self.log
        if self.end_row is not None:
            line = last_line(self.path) if self.end_row == self.row - 1 else line_of_row(self.path, self.end_row)[1]
            log.end = json.loads(line)
        if self.inferred:
            log.meta = {**log.meta, "num_experts": self.num_experts}
            log.notes.append(f"the header has no num_experts: {self.num_experts} inferred from the "
                             "largest expert id in the log (experts above it were never chosen)")
        log.meta.setdefault("model_id", "unnamed model")
        if log.unknown_types:
            log.notes.append("records of unknown types ignored: " + ", ".join(
                f"{kind} ({n})" for kind, n in sorted(log.unknown_types.items())))
        self._settle()
        for pool in self.pools:
            pool.shutdown()
        self.agg.finish()
        self.neighbours.pair()
        frames = self.agg.frames()
        log.pairs, log.confidence, log.windows = frames["pairs"], frames["confidence"], frames["windows"]
        log.neighbours = self.neighbours
        if self.token_counts.seen:
            log.token_counts = self.token_counts.frame()
            log.token_layers = self.token_counts.counted
        log.requests = len(self.prompt_len)
        if self.cut[0]:
            requests, positions = self.cut.tolist()
            log.not_returned = {"requests": requests, "positions": positions}
            log.notes.append(f"{requests} requests were cut by the front end (a stop string): {positions} of their "
                             "logged positions are past the tokens returned to the caller (request_end's "
                             "returned_tokens); their route records are counted like the others")
        log.truncated_tail = tail
        if tail:
            log.notes.append(f"the last line is unfinished ({len(tail)} bytes) and was skipped")
        if log.end is None:
            log.notes.append("no 'end' record: the engine had not closed the log (it was still "
                             "writing, or its processes were killed while requests ran)")
        elif log.end.get("final") is False:
            log.notes.append(f"the log ends with the provisional 'end' of {log.end['ended_at']}, "
                             "written when no request was open: complete up to then, not closed by "
                             "the engine (still running, or stopped without closing it)")
        if self.unended and log.end is None:  # a closed log ends every request
            log.notes.append(f"{len(self.unended)} of {len(self.request_keys)} requests "
                             "(or samples) have no 'request_end': they were running where the log stops")
        if log.end and log.end.get("returned_tokens_error"):
            log.notes.append(f"the writer could not read the front end's counts ({log.end['returned_tokens_error']}): "
                             "responses cut at a stop string are not marked")
        if log.end and log.end.get("write_error"):
            log.notes.append(f"the writer stopped at a write error ({log.end['write_error']}); "
                             "records after it are missing")
        shards = log.meta.get("parallel", {}).get("shards", [])
        if "writer" in log.meta.get("parallel", {}) and len(shards) > 1:
            log.notes.append(f"one shard of {len(shards)} ({', '.join(shards)}); "
                             "join them with python -m analysis.merge")
        if log.gap_records:
            log.notes.append(f"{log.gap_records} route records of positions served from the prefix "
                             "cache are missing ('gap' records say which and why)")
        if log.duplicates:
            conflicting = conflicting_repeats(self.log_path)
            log.notes.append(f"{log.duplicates} repeated route records were counted once (the first of each key)"
                             + (f"; {conflicting} key(s) were logged with different experts or weights: not "
                                "one engine's log (shards of different runs merged?)" if conflicting else ""))
        if self.null_weights:
            log.notes.append(f"{self.null_weights} gate weights are null (not finite in the engine): "
                             "counted as 0 in weighted figures")
        index = pd.MultiIndex.from_product([self.layers, PHASES, range(self.num_experts)],
                                           names=["layer", "phase", "expert"])
        log.loads = pd.DataFrame({"count": self.count.ravel(), "weight": self.weight.ravel() / WEIGHT_UNITS},
                                 index=index).reset_index()
        tokens_index = pd.MultiIndex.from_product([self.layers, PHASES], names=["layer", "phase"])
        log.tokens = pd.DataFrame({"tokens": self.tokens.ravel()}, index=tokens_index).reset_index()
        return log
