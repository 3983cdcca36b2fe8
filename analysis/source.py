"""DuckDB reads a JSONL route log's records (a whole log, or a parquet log's
records.jsonl), in the log's order, as Arrow record batches. Everything after the read
(checks, de-duplication, counting) is logfile.LogReader's.

JSONL is read with ``ignore_errors``: a line DuckDB cannot read becomes a row of
nulls in its place, so one pass reads a log, and an unfinished last line (a crash)
or a malformed one in the middle is found by its row. Blank lines are skipped by
DuckDB, so a row's line number is counted from the file only when an error needs it
(``line_of_row``).
"""

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa

from analysis.route_format import PARQUET_ROUTES

BATCH_ROWS = 1 << 20
# The fields the reader uses, as DuckDB reads them. Route keys and ids are read as
# JSON and typed in SQL, with a `suspect` flag where a value is not a whole number
# (DuckDB's own casts would read "0", 1.5 or true as a number): one regular expression
# over their text, 1.6 s of a 10M-record log's 7.8 s read, where json_type() per value
# took 3.7 s. Other fields are typed as the writer writes them.
JSONL_COLUMNS = {
    "type": "VARCHAR", "req_id": "JSON", "sample": "JSON", "token_idx": "JSON", "layer": "JSON",
    "topk_ids": "JSON", "topk_weights": "DOUBLE[]", "cached": "BOOLEAN",
    "prompt_len": "BIGINT", "prompt_token_ids": "BIGINT[]", "generated_token_ids": "BIGINT[]",
    "routed_positions": "BIGINT", "cached_positions": "BIGINT", "returned_tokens": "BIGINT",
    "first_token_idx": "BIGINT", "last_token_idx": "BIGINT", "layers": "BIGINT[]",  # gap
    "file": "VARCHAR", "rows": "BIGINT", "closed_at": "VARCHAR",  # part
    "final": "BOOLEAN", "ended_at": "VARCHAR", "write_error": "VARCHAR", "front_end_exited": "BOOLEAN",  # end
}


# A route's keys and ids as DuckDB holds them (minified JSON text), ids first: every
# character must be one of a whole number's or a list's, and no '[' but the first (a
# string req_id is left out: any text is a name).
KEYS_TEXT = ("concat(topk_ids, ',', CASE WHEN starts_with(req_id::VARCHAR, '\"') THEN '' ELSE req_id::VARCHAR END, "
             "',', sample, ',', token_idx, ',', layer)")
TYPED = f"""
    req_id ->> '$' AS req_id,
    TRY_CAST(sample AS BIGINT) AS sample, TRY_CAST(token_idx AS BIGINT) AS token_idx,
    TRY_CAST(layer AS BIGINT) AS layer, TRY_CAST(topk_ids AS BIGINT[]) AS topk_ids,
    coalesce(regexp_matches({KEYS_TEXT}, '[^-0-9,\\[\\]]|.\\['), false) AS suspect"""


def _connection() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = true")  # the log's order: windows, token counts, first sightings
    con.execute("SET enable_progress_bar = false")  # the CLIs' stderr carries their own messages only
    return con


def read_ahead(batches: Iterator) -> Iterator:
    """The batches, the next one made on a second thread (DuckDB's read, Arrow's parquet
    decoding: the GIL released) while the caller counts this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(next, batches, None)
        while (batch := upcoming.result()) is not None:
            upcoming = pool.submit(next, batches, None)
            yield batch


def _rows(relation: duckdb.DuckDBPyRelation, batch_rows: int) -> Iterator[pa.RecordBatch]:
    for batch in read_ahead(relation.to_arrow_reader(BATCH_ROWS)):
        for at in range(0, batch.num_rows, batch_rows):
            yield batch.slice(at, batch_rows)


def jsonl_batches(path: str | Path, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Every non-blank line of ``path``, the meta line first; a line that is not a JSON
    object, or whose field a column cannot hold, gives nulls; a route key or id that is
    not a whole number sets ``suspect``."""
    con = _connection()
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in JSONL_COLUMNS.items()) + "}"
    keys = ("req_id", "sample", "token_idx", "layer", "topk_ids")
    others = ", ".join(k for k in JSONL_COLUMNS if k not in keys)
    relation = con.sql(f"SELECT {others}, {TYPED} FROM read_json(?, format='newline_delimited', "
                       f"columns={columns}, ignore_errors=true)", params=[str(path)])
    yield from _rows(relation, batch_rows)


def route_rows(path: str | Path) -> str:
    """A SQL query of a log's route rows (req_id, sample, token_idx, layer, topk_ids,
    topk_weights), JSONL or parquet, for the passes that join records: read as typed,
    since the reader has named every bad line before them."""
    path = Path(path)
    if path.is_dir():
        source = f"read_parquet('{path / PARQUET_ROUTES}/*.parquet')"
        return (f"SELECT req_id::VARCHAR AS req_id, sample, token_idx, layer, topk_ids::INTEGER[] AS topk_ids, "
                f"topk_weights FROM {source}")
    columns = ("{type: 'VARCHAR', req_id: 'VARCHAR', sample: 'BIGINT', token_idx: 'BIGINT', layer: 'BIGINT', "
               "topk_ids: 'INTEGER[]', topk_weights: 'DOUBLE[]'}")
    return (f"SELECT req_id, sample, token_idx, layer, topk_ids, topk_weights FROM read_json('{path}', "
            f"format = 'newline_delimited', columns = {columns}, ignore_errors = true) WHERE type = 'route'")


def conflicting_repeats(path: str | Path) -> int:
    """Keys (req_id, sample, token_idx, layer) logged more than once with different
    experts or weights: a second pass over the log, made only when it repeats keys."""
    return duckdb.sql(f"""SELECT count(*) FROM (SELECT 1 FROM ({route_rows(path)})
        GROUP BY req_id, sample, token_idx, layer
        HAVING count(DISTINCT (topk_ids, topk_weights)) > 1)""").fetchall()[0][0]


def _from_the_end(path: str | Path, enough) -> bytes:
    """The file's last bytes, read backwards 64 KiB at a time until ``enough(text)``
    (or the whole file)."""
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        text = b""
        while end and not enough(text):
            step = min(end, 1 << 16)
            end -= step
            f.seek(end)
            text = f.read(step) + text
        return text


def _complete_lines(text: bytes) -> list[bytes]:
    return [line for line in text[: text.rfind(b"\n") + 1].split(b"\n") if line.strip()]


def unfinished_tail(path: str | Path) -> bytes:
    """The bytes after the last newline: a line the writer had not finished."""
    text = _from_the_end(path, lambda text: b"\n" in text)
    return text[text.rfind(b"\n") + 1:]


def last_line(path: str | Path) -> bytes:
    """The last complete, non-blank line (an unfinished one after it left out); the
    first of the lines read back may be cut, so a second one is read before it."""
    lines = _complete_lines(_from_the_end(path, lambda text: len(_complete_lines(text)) > 1))
    if not lines:
        raise ValueError(f"{path}: no complete line")
    return lines[-1]


def line_of_row(path: str | Path, row: int) -> tuple[int, bytes]:
    """The line number and text of DuckDB's row ``row`` (0: the first non-blank line)."""
    seen = -1
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number, line.rstrip(b"\n")
    raise IndexError(row)


def why_unreadable(line: bytes) -> str:
    """What is wrong with a line DuckDB could not read (or read only in part)."""
    from analysis.logfile import wrong_field

    try:
        record = json.loads(line)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(record, dict) or "type" not in record:
        return "not a record with a 'type'"
    return wrong_field(record) or "unreadable"
