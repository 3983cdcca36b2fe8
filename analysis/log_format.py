"""What a route log is, whatever its form: the records' columns, the header check, the
table a read gives (RouteLog), and JSONL lines parsed a block at a time."""

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson

from analysis.route_format import SCHEMA_VERSION, WEIGHT_DECIMALS

# cached: prompt positions the prefix cache served, their routing replayed by the
# writer ("cached": true); unknown: no 'request' record seen.
PHASES = ("prompt", "generated", "unknown", "cached")
CHUNK_BYTES = 64 << 20
TOKEN_LAYERS = 4  # token specialisation: at most this many of the layers asked (dense counts)
COLUMNS = pa.schema([
    ("type", pa.string()), ("req_id", pa.string()), ("sample", pa.int64()),
    ("token_idx", pa.int64()), ("layer", pa.int64()), ("topk_ids", pa.list_(pa.int64())),
    ("topk_weights", pa.list_(pa.float64())), ("prompt_len", pa.int64()), ("cached", pa.bool_()),
    ("prompt_token_ids", pa.list_(pa.int64())), ("generated_token_ids", pa.list_(pa.int64())),
    ("routed_positions", pa.int64()), ("cached_positions", pa.int64()), ("returned_tokens", pa.int64()),
])
REQUEST_FIELDS = ["req_id", "sample", "prompt_len", "prompt_token_ids", "generated_token_ids", "routed_positions",
                  "cached_positions", "returned_tokens"]
# The minimal header; schema, num_experts and the rest are optional (num_experts is then
# inferred from the largest expert id seen).
META_FIELDS = ("layers_logged", "top_k")
NUMERIC_REQ_ID = re.compile(rb'"req_id"\s*:\s*(-?\d+)')


class LogFormatError(ValueError):
    """The log is not a route log this reader understands; says which line."""


@dataclass
class RouteLog:
    meta: dict
    loads: pd.DataFrame  # layer, phase, expert, count, weight
    tokens: pd.DataFrame  # layer, phase, tokens (distinct routed positions)
    requests: int = 0  # distinct caller request ids with a 'request' record
    records: int = 0  # route lines read
    duplicates: int = 0  # route lines whose (req_id, sample, token_idx, layer) came before
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # layer, a, b, count (a < b)
    confidence: pd.DataFrame = field(default_factory=pd.DataFrame)  # layer, measure, bin_low, count
    windows: pd.DataFrame = field(default_factory=pd.DataFrame)  # layer, window, tokens, max_over_mean
    unknown_types: dict = field(default_factory=dict)  # record type -> lines ignored
    token_counts: pd.DataFrame | None = None  # layer, expert, token, count; None: no token ids
    token_layers: list[int] = field(default_factory=list)  # the layers token_counts covers
    gap_records: int = 0  # route records 'gap' records say are missing (positions x layers)
    truncated_tail: bytes = b""  # an unfinished last line, e.g. after a crash
    end: dict | None = None  # the closing record, absent if the engine did not shut down
    neighbours: object = None  # analysis.neighbours.Neighbours: pairs of neighbouring records
    # Requests the front end cut (a stop string), and their logged positions past the
    # tokens returned to the caller: {"requests", "positions"}; empty if none.
    not_returned: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_meta(first_line: bytes) -> dict:
    try:
        meta = json.loads(first_line)
    except ValueError as e:
        raise LogFormatError(f"line 1: not JSON ({e}); a route log starts with its meta line") from None
    if not isinstance(meta, dict) or meta.get("type") != "meta":
        raise LogFormatError("line 1: missing meta header ({\"type\":\"meta\",...})")
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
        raise LogFormatError(f"line 1: meta header lacks {', '.join(missing)}")
    layers, top_k = meta["layers_logged"], meta["top_k"]
    if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                               for x in layers):
        raise LogFormatError(f"line 1: layers_logged must be a list of layer indices, got {json.dumps(layers)}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise LogFormatError(f"line 1: top_k must be a whole number >= 1, got {json.dumps(top_k)}")
    experts = meta.get("num_experts")
    if experts is not None and (not isinstance(experts, int) or isinstance(experts, bool) or experts < 1):
        raise LogFormatError(f"line 1: num_experts must be a whole number >= 1, got {json.dumps(experts)}")
    if meta.get("schema", 1) != SCHEMA_VERSION:
        raise LogFormatError(f"line 1: schema {meta['schema']}; this reader reads schema {SCHEMA_VERSION}")
    return meta


def _parse(block: bytes, cut: int) -> pa.Table:
    """The lines of ``block[:cut]``, read in place (a chunk is not copied)."""
    return pajson.read_json(pa.BufferReader(pa.py_buffer(block).slice(0, cut)), parse_options=pajson.ParseOptions(
        explicit_schema=COLUMNS, unexpected_field_behavior="ignore"))


WEIGHT_UNITS = 10.0**WEIGHT_DECIMALS  # weights are summed in the writer's last decimal's units


def weight_units(cells: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """[size] int64 sums of ``weights`` [n, k] in WEIGHT_UNITS per cell of ``cells`` [n, k]:
    exact, so neither chunking nor order changes a bit. Whole numbers summed as float64
    are exact below 2**53: rows are taken that many at a time."""
    units = np.rint(weights * WEIGHT_UNITS)
    rows = max(1, int(2**53 // (max(1.0, float(np.abs(units).max(initial=0.0))) * max(1, units.shape[1]))))
    total = np.zeros(size, np.int64)
    for at in range(0, len(cells), rows):
        total += np.bincount(cells[at : at + rows].ravel(), units[at : at + rows].ravel(), size).astype(np.int64)
    return total


def parse_block(block: bytes, cut: int) -> pa.Table:
    """The lines of ``block[:cut]``; a req_id written as a number is read as its
    decimal string. Raises pa.ArrowInvalid or ValueError for lines it cannot read."""
    try:
        return _parse(block, cut)
    except (pa.ArrowInvalid, ValueError):
        fixed = NUMERIC_REQ_ID.sub(rb'"req_id":"\1"', block[:cut])
        return _parse(fixed, len(fixed))


def records_of(table: pa.Table, rows: np.ndarray, fields: list[str] = REQUEST_FIELDS) -> list[dict]:
    """Rows (of 'request' / 'request_end' records, by default) as dicts of the fields they have."""
    if not len(rows):
        return []
    picked = table.take(pa.array(rows)).select(["type", *fields]).to_pylist()
    return [{k: v for k, v in record.items() if v is not None} for record in picked]

