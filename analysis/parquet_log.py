"""Reads a parquet route log (VLLM_LOG_MOE=run.parquet, or VLLM_LOG_MOE_FORMAT=parquet)
into the same RouteLog as its JSONL form.

The log is a directory: records.jsonl holds the meta header and every record but the
routes (request, request_end, gap, part, end), routes/part-NNNNNN.parquet the route
records. Requests are read first, then every part, then the request ends, so token
counts see a request's prompt before its routes and its generated tokens after them.
Weights are rounded to the header's weight_decimals, as the JSONL writer rounds them,
so both forms give identical numbers.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from analysis.log_format import CHUNK_BYTES, RouteLog, read_meta
from analysis.logfile import LogReader, feed_lines
from analysis.aggregates import WINDOW
from analysis.route_format import PARQUET_RECORDS as RECORDS, PARQUET_ROUTES as ROUTES, PART_GLOB

BATCH_ROWS = 1 << 18


def is_parquet_log(path: str | Path) -> bool:
    return (Path(path) / RECORDS).is_file()


def part_files(path: str | Path) -> list[Path]:
    """The closed parts, in the order written (hidden files are parts being written)."""
    return sorted((Path(path) / ROUTES).glob(PART_GLOB))


def read_parquet_log(path: str | Path, chunk_bytes: int = CHUNK_BYTES, window: int = WINDOW,
                     token_layers: list[int] | None = None) -> RouteLog:
    directory = Path(path)
    with open(directory / RECORDS, "rb") as f:
        meta = read_meta(f.readline())
        reader = LogReader(meta, window, token_layers)
        reader.deferred_ends = []
        tail = feed_lines(f, reader, chunk_bytes)
    decimals = meta.get("weight_decimals", 9)
    parts = part_files(directory)
    for part in parts:
        read = 0
        for batch in _prefetched(pq.ParquetFile(part).iter_batches(BATCH_ROWS)):
            reader.routes(pa.Table.from_batches([batch]), lambda i, at=read: f"{part.name} row {at + i}", decimals)
            read += batch.num_rows
    reader.end_requests(reader.deferred_ends)
    log = reader.result(tail)
    log.notes += _part_notes(meta, reader.parts, parts, log.end)
    return log


def _prefetched(batches):
    """The batches, each decoded on a second thread while the one before is counted."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(next, batches, None)
        while (batch := upcoming.result()) is not None:
            upcoming = pool.submit(next, batches, None)
            yield batch


def _part_notes(meta: dict, listed: list[dict], found: list[Path], end: dict | None) -> list[str]:
    names = {Path(record["file"]).name for record in listed}
    notes = []
    missing = sorted(names - {p.name for p in found})
    if missing:
        notes.append(f"part(s) {', '.join(missing)} named in records.jsonl are missing: their "
                     f"{sum(r['rows'] for r in listed if Path(r['file']).name in missing)} route records are not read")
    if end is None:  # a provisional 'end' comes after its parts closed: nothing open is lost
        last = listed[-1].get("closed_at", "its close time not recorded") if listed else "none closed"
        notes.append(f"routes end with the last closed part ({last}); the part open at the stop "
                     f"is lost: at most {meta.get('part_rows', '?')} route records or "
                     f"{meta.get('part_seconds', '?')} s of routing")
    return notes
