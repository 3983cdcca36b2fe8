"""Reads a parquet route log (VLLM_LOG_MOE=run.parquet, or VLLM_LOG_MOE_FORMAT=parquet)
into the same RouteLog as its JSONL form.

The log is a directory: records.jsonl holds the meta header and every record but the
routes (request, request_end, gap, part, end), routes/part-NNNNNN.parquet the route
records. Requests are read first, then every part, then the request ends, so token
counts see a request's prompt before its routes and its generated tokens after them.
Weights are rounded to the header's weight_decimals, as the JSONL writer rounds them,
so both forms give identical numbers.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.aggregates import WINDOW
from analysis.log_format import RouteLog, read_meta
from analysis.logfile import LogReader, feed_rows
from analysis.route_format import PARQUET_RECORDS as RECORDS, PARQUET_ROUTES as ROUTES, PART_GLOB
from analysis.source import BATCH_ROWS, read_ahead, unfinished_tail

PART_BATCH_ROWS = 1 << 18


def is_parquet_log(path: str | Path) -> bool:
    return (Path(path) / RECORDS).is_file()


def part_files(path: str | Path) -> list[Path]:
    """The closed parts, in the order written (hidden files are parts being written)."""
    return sorted((Path(path) / ROUTES).glob(PART_GLOB))


def read_parquet_log(path: str | Path, batch_rows: int = BATCH_ROWS, window: int = WINDOW,
                     token_layers: list[int] | None = None, exact: bool = False) -> RouteLog:
    directory = Path(path)
    with open(directory / RECORDS, "rb") as f:
        meta = read_meta(f.readline())
    with LogReader(meta, window, token_layers, directory / RECORDS, exact) as reader:
        return _read_parts(directory, meta, reader, batch_rows)


def _read_parts(directory: Path, meta: dict, reader: LogReader, batch_rows: int) -> RouteLog:
    reader.deferred_ends = []
    reader.parts_in_batches = True
    reader.log_path = directory
    tail = unfinished_tail(directory / RECORDS)
    feed_rows(directory / RECORDS, reader, batch_rows, tail)
    decimals = meta.get("weight_decimals", 9)
    parts = part_files(directory)
    for part in parts:
        read = 0
        for batch in read_ahead(pq.ParquetFile(part).iter_batches(PART_BATCH_ROWS)):
            reader.routes(pa.Table.from_batches([batch]), lambda i, at=read: f"{part.name} row {at + i}", decimals)
            read += batch.num_rows
        reader.end_part()  # a part's rows are sorted by layer: a position's layers meet within it
    ends = list(reader.deferred_ends)
    reader.end_requests(ends)
    log = reader.result(tail)
    log.notes += _part_notes(meta, reader.parts, parts, log.end)
    if log.end is None and (lost := _lost_with_open_part(parts, ends, len(meta["layers_logged"]))):
        log.notes.append(f"{lost} ended request(s) had routes in the part open at the stop: their "
                         "'request_end' counts more computed positions than the closed parts hold")
    return log


def _lost_with_open_part(parts: list[Path], ends: list[dict], num_layers: int) -> int:
    """Requests whose computed positions (request_end) outnumber their computed rows in
    the closed parts, per logged layer."""
    if not ends or not num_layers:
        return 0
    held: dict = {}
    if parts:
        rows = pa.concat_tables(pq.read_table(p, columns=["req_id", "sample", "cached"]) for p in parts)
        rows = rows.filter(pc.invert(rows["cached"].fill_null(False)))
        rows = pa.table({"req_id": rows["req_id"].cast(pa.string()), "sample": rows["sample"]})
        counts = rows.group_by(["req_id", "sample"]).aggregate([([], "count_all")]).to_pydict()
        held = {(r, s): n for r, s, n in zip(counts["req_id"], counts["sample"], counts["count_all"])}
    return sum(held.get((str(e["req_id"]), e.get("sample")), 0) < e.get("routed_positions", 0) * num_layers
               for e in ends)


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
