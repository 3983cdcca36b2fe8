"""Reads a parquet route log (VLLM_LOG_MOE=run.parquet, or VLLM_LOG_MOE_FORMAT=parquet)
into the same RouteLog as its JSONL form.

The log is a directory: records.jsonl holds the meta header and every record but the
routes (request, request_end, gap, part, end), routes/part-NNNNNN.parquet the route
records. records.jsonl is read in order, and each part where the 'part' record that
closes it stands; a request's end waits for the part open when it was written, so token
counts see a request's prompt before its routes and its generated tokens after them,
and memory holds the open requests only.
Weights are rounded to the header's weight_decimals, as the JSONL writer rounds them,
so both forms give identical numbers.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.aggregates import WINDOW
from analysis.log_format import RouteLog, read_meta
from analysis.logfile import LogReader, complete_rows
from analysis.route_format import PARQUET_RECORDS as RECORDS, PARQUET_ROUTES as ROUTES, PART_GLOB
from analysis.source import BATCH_ROWS, read_ahead, unfinished_tail
from analysis.tokens import EndedEarly

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
    try:
        with LogReader(meta, window, token_layers, directory / RECORDS, exact) as reader:
            return _read_parts(directory, meta, reader, batch_rows, ends_in_step=True)
    except EndedEarly:
        with LogReader(meta, window, token_layers, directory / RECORDS, exact) as reader:
            return _read_parts(directory, meta, reader, batch_rows, ends_in_step=False)


def _read_parts(directory: Path, meta: dict, reader: LogReader, batch_rows: int, ends_in_step: bool) -> RouteLog:
    """records.jsonl in order, each part read where its 'part' record closes it. A
    request's routes are in the parts closed after its 'request' record, the last of them
    at the latest the first closed after its 'request_end': the ends written while a part
    was open are counted once it is read, so memory holds the open requests only. With
    ``ends_in_step`` False (a log that breaks that order), every end is counted last."""
    reader.deferred_ends = []
    reader.parts_in_batches = True
    reader.log_path = directory
    records = directory / RECORDS
    tail = unfinished_tail(records)
    decimals = meta.get("weight_decimals", 9)
    unread = {part.name: part for part in part_files(directory)}

    def read(part: Path) -> None:
        done = 0
        for batch in read_ahead(pq.ParquetFile(part).iter_batches(PART_BATCH_ROWS)):
            reader.routes(pa.Table.from_batches([batch]), lambda i, at=done: f"{part.name} row {at + i}", decimals)
            done += batch.num_rows
        reader.end_part()  # a part's rows are sorted by layer: a position's layers meet within it

    def close(name: str) -> None:
        if (part := unread.pop(name, None)) is not None:
            read(part)
        if ends_in_step:
            reader.end_requests(reader.deferred_ends)
            reader.deferred_ends = []

    for batch in complete_rows(records, batch_rows, tail):
        cuts = np.flatnonzero(pc.equal(batch["type"], "part").fill_null(False).to_numpy(zero_copy_only=False))
        names = batch["file"].take(pa.array(cuts)).to_pylist()
        start = 0
        for cut, name in zip(cuts.tolist(), names):
            reader.add(batch.slice(start, cut + 1 - start))
            close(Path(name).name)
            start = cut + 1
        if start < batch.num_rows:
            reader.add(batch.slice(start))
    for part in sorted(unread.values()):  # closed, but the stop came before its 'part' record
        read(part)
    reader.end_requests(reader.deferred_ends)
    log = reader.result(tail)
    log.notes += _part_notes(meta, reader.parts, part_files(directory), log.end)
    if log.end is None and reader.short_ends:
        log.notes.append(f"{reader.short_ends} ended request(s) had routes in the part open at the stop: their "
                         "'request_end' counts more computed positions than the closed parts hold")
    return log


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
