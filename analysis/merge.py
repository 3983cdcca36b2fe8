"""Joins the shards of a route log written by several ranks into one log.

    python -m analysis.merge LOG [--out PATH] [--json]

With pipeline (PP) or data (DP) parallelism every (DP rank, PP stage) writes its own
shard: LOG's name with .dpN and/or .ppN before the extension (log.dp1.pp0.jsonl), all
listed in each shard's meta header. Per-rank files need no locking or ordering
between processes, and a rank that dies cannot corrupt another's lines. The merged
log (default: LOG itself) is what one writer would have written: one meta header with
the parallel layout, every shard's route records, the request records once (from
pipeline stage 0; DP ranks serve disjoint requests and say which in ``dp_rank``), and
one 'end' record holding each shard's. If a shard has no 'end' (its rank was killed),
neither has the merged log, so readers report it as incomplete; if a shard ends with
a provisional 'end' (its rank was killed while idle), so does the merged log.

Parquet shards (log.dp0.parquet/ ...) merge into a parquet log: their records.jsonl as
above, and every closed part of every shard linked (hard links; copies across file
systems) into LOG/routes/ under a new number, its 'part' record renamed with it.
"""

import argparse
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

from analysis.parquet_log import RECORDS, ROUTES, part_files
from analysis.route_format import part_name

SUMMED = ("steps", "route_records", "engine_waits", "engine_wait_s", "requests_not_logged",
          "cached_route_records")
PARQUET_SUMMED = ("route_parts",)  # in a parquet log's 'end' only


class MergeError(ValueError):
    pass


def find_shards(log: str | Path) -> list[Path]:
    """The shard files of LOG, in the order its meta headers list them."""
    log = Path(log)
    root, ext = os.path.splitext(str(log))
    found = glob.glob(f"{glob.escape(root)}.dp*{ext}") + glob.glob(f"{glob.escape(root)}.pp*{ext}")
    if not found:
        raise MergeError(f"no shards of {log} ({log.stem}.dpN / .ppN{ext}) found; "
                         "only engines with pipeline or data parallelism write shards")
    # The newest shard names its run's set (an older run may have left other names).
    names = _meta(Path(max(found, key=os.path.getmtime)))["parallel"]["shards"]
    missing = [n for n in names if not (log.parent / n).exists()]
    if missing:
        raise MergeError(f"shard(s) {missing} of {log} are missing; expected {names}")
    return [log.parent / n for n in names]


def merge(log: str | Path, out: str | Path | None = None) -> dict:
    """Writes the merged log; returns what was merged."""
    shards = find_shards(log)
    metas = [_meta(s) for s in shards]
    _check_same_run(shards, metas)
    out = Path(out or log)
    parts = _LinkedParts(out) if shards[0].is_dir() else None
    ends, dropped = [], {}
    with open(out / RECORDS if parts else out, "wb") as dst:
        dst.write(_line(_merged_meta(metas, shards)))
        for shard, meta in zip(shards, metas):
            keep_requests = meta["parallel"]["writer"]["pp_rank"] == 0
            renamed = parts.link(shard) if parts else {}
            end, tail = _copy_body(_records(shard), dst, keep_requests, renamed)
            ends.append(end)
            if tail:
                dropped[shard.name] = tail
        if all(ends):
            dst.write(_line(_merged_end(metas, shards, ends)))
    return {
        "out": str(out),
        "shards": [s.name for s in shards],
        "complete": all(ends) and not dropped,
        "shards_without_end": [s.name for s, e in zip(shards, ends) if e is None],
        # Ended by a provisional 'end': the rank was killed while idle.
        "shards_not_shut_down": [s.name for s, e in zip(shards, ends) if e and not e.get("final", True)],
        "unfinished_last_line_bytes": dropped,
    }


class _LinkedParts:
    """The merged parquet log's routes/: parts numbered in shard order."""

    def __init__(self, out: Path):
        self.routes = out / ROUTES
        if self.routes.is_dir() and any(self.routes.iterdir()):
            raise MergeError(f"{self.routes} already holds parts; merge into a new --out")
        self.routes.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def link(self, shard: Path) -> dict[str, str]:
        """Links the shard's closed parts; returns their records' new 'file' names."""
        renamed = {}
        for part in part_files(shard):
            name = part_name(self.count)
            try:
                os.link(part, self.routes / name)
            except OSError:
                shutil.copyfile(part, self.routes / name)
            renamed[f"{ROUTES}/{part.name}"] = f"{ROUTES}/{name}"
            self.count += 1
        return renamed


def _records(shard: Path) -> Path:
    return shard / RECORDS if shard.is_dir() else shard


def _meta(path: Path) -> dict:
    with open(_records(path), "rb") as f:
        first = f.readline()
    try:
        meta = json.loads(first)
    except json.JSONDecodeError:
        raise MergeError(f"{path}: line 1 is not a meta header") from None
    if meta.get("type") != "meta" or "writer" not in meta.get("parallel", {}):
        raise MergeError(f"{path}: line 1 is not the meta header of a route-log shard")
    return meta


def _check_same_run(shards: list[Path], metas: list[dict]) -> None:
    def layout(meta):
        return {k: v for k, v in meta["parallel"].items() if k != "writer"}

    first = metas[0]
    for shard, meta in zip(shards, metas):
        for key in ("model_id", "schema", "vllm_version", "num_experts"):
            if meta[key] != first[key]:
                raise MergeError(f"{shard.name}: {key} {meta[key]!r} differs from "
                                 f"{shards[0].name}'s {first[key]!r}; not one run")
        if layout(meta) != layout(first):
            raise MergeError(f"{shard.name}: parallel layout differs from {shards[0].name}'s; not one run")


def _merged_meta(metas: list[dict], shards: list[Path]) -> dict:
    routed = [m for m in metas if m["layers_logged"]] or metas
    meta = dict(routed[0])
    meta["layers_logged"] = sorted({layer for m in metas for layer in m["layers_logged"]})
    meta["moe_layers"] = sorted({layer for m in metas for layer in m["moe_layers"]})
    meta["parallel"] = {k: v for k, v in meta["parallel"].items() if k != "writer"}
    meta["parallel"]["merged_from"] = [s.name for s in shards]
    meta["started_at"] = min(m["started_at"] for m in metas)
    return meta


def _copy_body(shard: Path, dst, keep_requests: bool, renamed: dict[str, str]) -> tuple[dict | None, int]:
    """Copies a shard's records after its meta line (a 'part' with its file renamed);
    returns its 'end' record (None if absent) and the length of an unfinished last line,
    which is not copied."""
    end, tail = None, 0
    with open(shard, "rb") as src:
        src.readline()
        for line in src:
            if not line.endswith(b"\n"):
                tail = len(line)
                continue
            kind = _kind(line)
            if kind == "end":
                end = json.loads(line)
            elif kind == "part":
                part = json.loads(line)
                missing = f"{part['file']}.missing-from-{shard.parent.name}"  # no other shard's name
                dst.write(_line(part | {"file": renamed.get(part["file"], missing)}))
            elif kind in ("route", "gap") or keep_requests:  # a gap names its shard's layers
                dst.write(line)
    return end, tail


def _kind(line: bytes) -> str:
    if line.startswith(b'{"type":"route"'):  # the engine's compact lines: no parsing
        return "route"
    return json.loads(line)["type"]


def _merged_end(metas: list[dict], shards: list[Path], ends: list[dict]) -> dict:
    stage0 = [e for m, e in zip(metas, ends) if m["parallel"]["writer"]["pp_rank"] == 0]
    errors = [f"{s.name}: {e['write_error']}" for s, e in zip(shards, ends) if e.get("write_error")]
    summed = SUMMED + tuple(key for key in PARQUET_SUMMED if any(key in e for e in ends))
    return {
        "type": "end",
        "final": all(e.get("final", True) for e in ends),
        **{key: sum(e.get(key, 0) for e in ends) for key in summed},
        "requests": sum(e["requests"] for e in stage0),
        "requests_ended": sum(e["requests_ended"] for e in stage0),
        "write_error": "; ".join(errors) or None,
        "ended_at": max(e["ended_at"] for e in ends),
        "merged_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shards": {s.name: e for s, e in zip(shards, ends)},
    }


def _line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Merge the per-rank shards of a VLLM_LOG_MOE log")
    parser.add_argument("log", help="the VLLM_LOG_MOE path the engine was started with")
    parser.add_argument("--out", help="where to write the merged log (default: LOG)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        summary = merge(args.log, args.out)
    except (MergeError, OSError) as e:
        print(f"{args.log}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        state = "complete" if summary["complete"] else "INCOMPLETE (see --json)"
        print(f"{summary['out']}: merged {len(summary['shards'])} shards, {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
