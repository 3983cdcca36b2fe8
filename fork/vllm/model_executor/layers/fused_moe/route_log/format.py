# SPDX-License-Identifier: Apache-2.0
"""The MoE route log's format, defined once: what the writer writes and what
``analysis/`` reads. docs/log-format.md describes the records.

Standard library only (pyarrow is imported where a parquet schema is asked for): the
writer process loads this file without vLLM, and ``analysis/route_format.py`` is this
very file (a symbolic link), so that logs can be read where vLLM is not installed.

A JSONL log is one file; every line is a JSON object with a "type":
    meta         the first line: what was logged, by which engine, what is not
    request      a caller's request (or one sample of it) was scheduled
    route        one (request, position, layer): topk_ids and topk_weights
    request_end  the request ended; its positions counted (returned_tokens: the
                 front end cut its response, front_end.py)
    gap          positions that have no route record, and why
    part         (parquet) a closed part of route records
    end          the log closed (final false: provisional, the engine still ran)
A parquet log is a directory: PARQUET_RECORDS holds every record but the routes,
PARQUET_ROUTES/part-NNNNNN.parquet the routes, as ``route_schema`` columns.
A shard (one per data-parallel rank and pipeline stage) is named by ``shard_path``.
"""

import os

SCHEMA_VERSION = 1
RECORD_TYPES = ("meta", "request", "route", "request_end", "gap", "part", "end")
WEIGHT_DECIMALS = 9  # JSONL weights: fixed-point text, |error| <= 5e-10
FORMATS = ("jsonl", "parquet")

PARQUET_RECORDS, PARQUET_ROUTES = "records.jsonl", "routes"  # in a parquet log's directory
PART_GLOB = "part-*.parquet"  # closed parts; one being written is hidden (.part-*.tmp)
PART_ROWS = 1 << 20  # a part closes at this many rows, held in memory till then
PART_SECONDS = 10.0  # or this long after its first row
# Ids' and weights' bytes split into streams (a float's exponent apart from its
# mantissa), then zstd: at top_k 4 of 60 experts, ~12.7 of a record's ~15.3 bytes
# are weights (their mantissas are noise), ~2.5 ids; the rest run-length encoded.
PARQUET_OPTIONS = {
    "compression": "zstd", "compression_level": 9,
    "use_dictionary": ["req_id", "sample", "token_idx", "layer"],
    "use_byte_stream_split": ["topk_ids.list.element", "topk_weights.list.element"],
}


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def id_type(num_experts: int):
    """The narrowest integer type that holds every expert id."""
    import pyarrow as pa

    return pa.uint8() if num_experts <= 1 << 8 else pa.int16() if num_experts <= 1 << 15 else pa.int32()


def route_schema(num_experts: int):
    """The columns of a parquet part: one row per route record."""
    import pyarrow as pa

    return pa.schema([
        ("req_id", pa.dictionary(pa.int32(), pa.string())),
        ("sample", pa.int32()),  # null unless the request asked for n > 1 samples
        ("token_idx", pa.int32()),
        ("layer", pa.int16()),
        ("topk_ids", pa.list_(id_type(num_experts))),
        ("topk_weights", pa.list_(pa.float32())),
        ("cached", pa.bool_()),
    ])


def format_meta(format: str) -> dict:
    """What the meta header says of the format."""
    if format == "jsonl":
        return {"format": "jsonl"}
    return {"format": "parquet", "routes": f"{PARQUET_ROUTES}/part-NNNNNN.parquet",
            "part_rows": PART_ROWS, "part_seconds": PART_SECONDS,
            "crash_loss": "a crash loses the open part: at most part_rows route records or "
                          "part_seconds of routing; parts close whenever no request is open"}


def shard_path(path: str, dp_rank: int, pp_rank: int, dp_size: int, pp_size: int) -> str:
    """The file (or parquet directory) of one writer: ``path`` with .dpN and .ppN
    before its extension, where there is more than one of either."""
    root, ext = os.path.splitext(path)
    dp = f".dp{dp_rank}" if dp_size > 1 else ""
    pp = f".pp{pp_rank}" if pp_size > 1 else ""
    return f"{root}{dp}{pp}{ext}"


def records_path(path: str, format: str) -> str:
    """The file the JSONL records go to, which the engine locks: the log itself, or a
    parquet log's records file."""
    return path if format == "jsonl" else os.path.join(path, PARQUET_RECORDS)
