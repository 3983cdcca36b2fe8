"""Converts a route log between its JSONL and parquet forms, losing nothing.

    python -m analysis.convert SRC DST [--json]

A JSONL file becomes a parquet log (a directory: records.jsonl and routes/part-*.parquet,
as VLLM_LOG_MOE_FORMAT=parquet writes it); a parquet log's directory becomes a JSONL
file. Expert ids are kept exactly; weights as float32, which holds every weight the
JSONL writer's 9 decimals came from; written back, they have the same 9 decimals.
The JSONL written holds requests first, then the routes, then every other record.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.log_format import CHUNK_BYTES, LogFormatError, parse_block, read_meta
from analysis.merge import _line
from analysis.parquet_log import RECORDS, ROUTES, is_parquet_log, part_files
from analysis.route_format import FORMATS, PARQUET_OPTIONS, PART_ROWS, format_meta, id_type, part_name


def to_parquet(src: Path, dst: Path) -> dict:
    """JSONL file -> parquet log directory."""
    (dst / ROUTES).mkdir(parents=True, exist_ok=True)
    for stale in part_files(dst):
        stale.unlink()
    with open(src, "rb") as f, open(dst / RECORDS, "wb") as records:
        meta = _renamed_shards(read_meta(f.readline()), src, dst)
        parquet = format_meta("parquet")  # converted parts close by rows only
        meta = {**meta, **{k: parquet[k] for k in ("format", "routes", "part_rows")}}
        records.write(_line(meta))
        parts = _Parts(dst, meta, records)
        end, tail = None, b""
        while chunk := f.read(CHUNK_BYTES):
            block = tail + chunk
            cut = block.rfind(b"\n") + 1
            tail = block[cut:]
            try:
                table = parse_block(block, cut)
            except (pa.ArrowInvalid, ValueError):
                raise LogFormatError("unreadable lines; python -m analysis.stats names the first") from None
            for kind, line in _other_lines(table, block, cut):
                if kind == "end":
                    end = line
                elif kind != "part":  # the source's parts are not this log's
                    records.write(line)
            parts.add(table)
        parts.write()
        if end is not None:
            records.write(end)
    return {"parts": parts.count, "route_records": parts.total, "truncated_tail_bytes": len(tail)}


def to_jsonl(src: Path, dst: Path) -> dict:
    """Parquet log directory -> JSONL file: requests, routes, then the other records."""
    data = (src / RECORDS).read_bytes()
    lines = data[: data.rfind(b"\n")].split(b"\n")  # an unfinished last line (a crash) left out
    meta = _renamed_shards(read_meta(lines[0]), src, dst)
    meta = {k: v for k, v in meta.items() if k not in format_meta("parquet")}
    kinds = [json.loads(line)["type"] if line.strip() else None for line in lines[1:]]
    total = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as out:
        out.write(_line({**meta, **format_meta("jsonl")}))
        out.writelines(line + b"\n" for line, kind in zip(lines[1:], kinds) if kind == "request")
        for part in part_files(src):
            for batch in pq.ParquetFile(part).iter_batches(PART_ROWS):
                out.write(route_lines(batch, meta.get("weight_decimals", 9)))
                total += batch.num_rows
        out.writelines(line + b"\n" for line, kind in zip(lines[1:], kinds)
                       if kind not in (None, "request", "part"))
    return {"route_records": total}


def _renamed_shards(meta: dict, src: Path, dst: Path) -> dict:
    """A shard's header names its run's shards (log.dp0.jsonl, ...): renamed to the
    destination's suffix, so that shards converted alike still find each other
    (python -m analysis.merge)."""
    shards = meta.get("parallel", {}).get("shards")
    if not shards:
        return meta
    old = src.suffix if src.suffix in (".jsonl", ".parquet") else ""
    new = dst.suffix if dst.suffix in (".jsonl", ".parquet") else ""
    renamed = [(name[: len(name) - len(old)] if old and name.endswith(old) else name) + new for name in shards]
    return {**meta, "parallel": {**meta["parallel"], "shards": renamed}}


class _Parts:
    """Route rows of a JSONL log, written as parquet parts of PART_ROWS rows, each named
    by a 'part' record in ``records`` after the records written so far, as the engine's
    writer orders them (analysis.parquet_log reads each part where its record is)."""

    def __init__(self, dst: Path, meta: dict, records):
        self.dst, self.records, self.batches, self.rows, self.count, self.total = dst, records, [], 0, 0, 0
        num_experts = meta.get("num_experts", 1 << 15)
        self.id_type = id_type(num_experts)

    def add(self, table: pa.Table) -> None:
        routes = table.filter(pc.equal(table["type"], "route"))
        if not routes.num_rows:
            return
        self.batches.append(pa.table({
            "req_id": pc.dictionary_encode(routes["req_id"]),
            "sample": routes["sample"].cast(pa.int32()),
            "token_idx": routes["token_idx"].cast(pa.int32()),
            "layer": routes["layer"].cast(pa.int16()),
            "topk_ids": routes["topk_ids"].cast(pa.list_(self.id_type)),
            "topk_weights": routes["topk_weights"].cast(pa.list_(pa.float32())),
            "cached": routes["cached"].fill_null(False),
        }))
        self.rows += routes.num_rows
        if self.rows >= PART_ROWS:
            self.write()

    def write(self) -> None:
        if not self.rows:
            return
        table = pa.concat_tables(self.batches).unify_dictionaries().combine_chunks()
        table = table.take(pa.array(np.argsort(table["layer"].to_numpy(), kind="stable")))
        name = part_name(self.count)
        pq.write_table(table, self.dst / ROUTES / name, **PARQUET_OPTIONS)
        self.records.write(_line({"type": "part", "file": f"{ROUTES}/{name}", "rows": self.rows,
                                  "bytes": (self.dst / ROUTES / name).stat().st_size}))
        self.total += self.rows
        self.count += 1
        self.batches, self.rows = [], 0



def route_lines(batch: pa.RecordBatch, decimals: int = 9) -> bytes:
    """JSONL route records of a parquet batch, one per row, vectorised."""
    n = batch.num_rows
    if n == 0:
        return b""
    req = batch.column("req_id")
    if not pa.types.is_dictionary(req.type):
        req = pc.dictionary_encode(req)
    names = pa.array([f'"req_id":{json.dumps(v)},' for v in req.dictionary.to_pylist()], pa.string())
    sample = batch.column("sample")
    pieces = [pa.scalar('{"type":"route",'), names.take(req.indices),
              pc.if_else(sample.is_null(), "", pc.binary_join_element_wise('"sample":', sample.cast(pa.string()), ",", "")),
              pc.if_else(batch.column("cached"), '"cached":true,', ""),
              pa.scalar('"token_idx":'), batch.column("token_idx").cast(pa.string()),
              pa.scalar(',"layer":'), batch.column("layer").cast(pa.string()),
              pa.scalar(',"topk_ids":['), _joined(_columns(batch.column("topk_ids"), n), lambda c: pa.array(c).cast(pa.string())),
              pa.scalar('],"topk_weights":['), _joined(_columns(batch.column("topk_weights"), n),
                                                       lambda w: _decimal(w, decimals)),
              pa.scalar("]}\n")]
    lines = pc.binary_join_element_wise(*pieces, "")
    offsets = np.frombuffer(lines.buffers()[1], np.int32, n + 1, lines.offset * 4)
    return lines.buffers()[2].to_pybytes()[offsets[0] : offsets[-1]]


def _columns(lists: pa.Array, n: int) -> list[np.ndarray]:
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
    return list(values.reshape(n, -1).T)


def _joined(columns: list[np.ndarray], text) -> pa.Array:
    parts = [text(c) for c in columns]
    return pc.binary_join_element_wise(*parts, ",")


def _decimal(values: np.ndarray, decimals: int) -> pa.Array:
    """Fixed-point text with ``decimals`` decimals, as the JSONL writer writes weights;
    null for values that are not finite, as its fallback does."""
    scaled = np.rint(values.astype(np.float64) * 10**decimals)
    finite = np.isfinite(scaled)
    whole = np.where(finite, np.abs(scaled), 0).astype(np.int64)
    sign = pc.if_else(pa.array(scaled < 0), "-", "")
    text = pc.binary_join_element_wise(
        sign, pa.array(whole // 10**decimals).cast(pa.string()), ".",
        pc.utf8_lpad(pa.array(whole % 10**decimals).cast(pa.string()), decimals, "0"), "")
    return pc.if_else(pa.array(finite), text, "null")


def _other_lines(table: pa.Table, block: bytes, cut: int) -> list[tuple[str, bytes]]:
    """(type, line) of every record of ``block[:cut]`` but the routes."""
    kind = table["type"].to_numpy(zero_copy_only=False)
    others = np.flatnonzero(kind != "route")
    ends = np.flatnonzero(np.frombuffer(block, np.uint8, cut) == ord("\n"))
    starts = np.r_[0, ends[:-1] + 1]
    return [(kind[i], block[starts[i] : ends[i] + 1]) for i in others]


def convert(src: str | Path, dst: str | Path, to: str | None = None) -> dict:
    """``src`` in the other form at ``dst``; ``to`` ("jsonl" or "parquet") is checked
    against ``src``'s form, and else ``dst``'s suffix must name the form."""
    src, dst = Path(src), Path(dst)
    form = "jsonl" if is_parquet_log(src) else "parquet"
    if (to or dst.suffix.lstrip(".")) != form:
        raise LogFormatError(f"{dst}: the {'parquet' if form == 'jsonl' else 'JSONL'} log converts to {form}; "
                             f"name it *.{form}, or say --to {form}" if to is None else
                             f"--to {to}: {src} is already {to}; it converts to {form}")
    if form == "jsonl":
        return {"from": "parquet", "to": "jsonl", **to_jsonl(src, dst)}
    return {"from": "jsonl", "to": "parquet", **to_parquet(src, dst)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert a route log between JSONL and parquet")
    parser.add_argument("src", help="a JSONL log, or a parquet log's directory")
    parser.add_argument("dst", help="the other form: a directory for parquet, a file for JSONL")
    parser.add_argument("--to", choices=FORMATS, help="the form to write, where dst's suffix does not say it")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        summary = {"src": args.src, "dst": args.dst, **convert(args.src, args.dst, args.to)}
    except (LogFormatError, OSError) as e:
        print(f"{args.src}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary) if args.json else
          f"{args.src} ({summary['from']}) -> {args.dst} ({summary['to']}): {summary['route_records']} route records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
