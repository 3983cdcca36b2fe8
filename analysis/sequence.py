"""Routing across positions and layers: adjacent_overlap (the next position of the same
request and sample) and layer_affinity (the next logged layer of the same position).
The reader counts both as it streams the log (analysis/neighbours.py); where a log's
order could hide a pair from it, DuckDB joins the whole log instead, exactly.
Distinct records only, as the reader counts them.

For that join each record is narrowed to what the two metrics read (a 64-bit hash of its request and
sample, position, layer, top-k expert set as 64-bit masks, top-1 expert), DuckDB runs
with a memory limit and spills the rest to a temporary directory, so memory stays flat
as logs grow. Two streams whose hashes collide would be taken for one: at 2^-64 per
pair, ignored."""

import math
import tempfile
from pathlib import Path

import duckdb

from analysis.neighbours import mean_jaccard
from analysis.source import route_rows

TOP_TRANSITIONS = 5
MEMORY_LIMIT = "512MB"  # DuckDB's own; past it, joins and tables spill to disk


def _records(path: Path, num_experts: int, distinct: bool) -> str:
    """The log's route records, narrowed, as a SQL query; ``distinct``: the log repeats
    some (the reader counted duplicates), keep one of each."""
    # Expert e sets bit e % 64 of mask word e // 64: Jaccard by bit counts, no list work per pair.
    masks = ", ".join(
        f"list_reduce(list_transform(topk_ids, lambda e: CASE WHEN e // 64 = {w} THEN 1::UBIGINT << (e % 64) "
        f"ELSE 0::UBIGINT END), lambda a, b: a | b) AS m{w}" for w in range(_words(num_experts)))
    narrow = (f"SELECT hash(req_id, coalesce(sample, -1)) AS q, token_idx, layer, {masks}, "
              f"topk_ids[list_position(topk_weights, list_max(topk_weights))] AS top1 FROM ({route_rows(path)})")
    return f"SELECT DISTINCT ON (q, token_idx, layer) * FROM ({narrow})" if distinct else narrow


def _words(num_experts: int) -> int:
    return max(1, -(-num_experts // 64))


def add_sequence_metrics(stats: dict, log, path: str | Path, layers: list[int]) -> None:
    """Adds adjacent_overlap to each of ``stats``' layers and layer_affinity to it:
    ``stats`` is analysis.stats.report's for ``log``, read from ``path``. Pairs of
    consecutively logged layers, both among ``layers``."""
    logged = log.meta["layers_logged"]
    steps = [(a, b) for a, b in zip(logged, logged[1:]) if a in layers and b in layers]
    if log.neighbours.unordered == 0:
        by_slot = log.neighbours.adjacent_overlap()
        overlap = {logged[slot]: value for slot, value in by_slot.items()}
        counts = {step: log.neighbours.transitions(logged.index(step[0])) for step in steps}
    else:
        overlap, counts = _joined(stats, path, steps)
    for entry in stats["layers"]:
        entry["adjacent_overlap"] = overlap.get(entry["layer"], math.nan)
    stats["layer_affinity"] = [
        {"from": a, "to": b, "positions": sum(counts[(a, b)].values()),
         "cond_entropy_bits": conditional_entropy(counts[(a, b)]), "top_transitions": top_transitions(counts[(a, b)])}
        for a, b in steps]


def _joined(stats: dict, path: str | Path, steps: list[tuple[int, int]]) -> tuple[dict, dict]:
    """Both metrics' counts from one read of the log, its records narrowed and kept in
    DuckDB while they are joined."""
    with tempfile.TemporaryDirectory(prefix="route-log-duckdb-") as spill:
        con = duckdb.connect()
        con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'; SET temp_directory = '{spill}'; "
                    "SET preserve_insertion_order = false")
        con.execute(f"CREATE TEMP TABLE r AS {_records(Path(path), stats['num_experts'], stats['duplicates'] > 0)}")
        overlap = adjacent_overlap(con, _words(stats["num_experts"]))
        counts = layer_transitions(con, steps)
        con.close()
    return overlap, counts


def adjacent_overlap(con, words: int = 1) -> dict[int, float]:
    """Per layer: the mean Jaccard index of the top-k expert sets of positions t and t+1
    of the same request and sample. ``con``: a DuckDB connection with the records as r,
    their sets as ``words`` mask columns m0, m1, ..."""
    common = " + ".join(f"bit_count(a.m{w} & b.m{w})" for w in range(words))
    either = " + ".join(f"bit_count(a.m{w} | b.m{w})" for w in range(words))
    rows = con.sql(f"""
        SELECT a.layer, {common} AS common, {either} AS either, count(*) FROM r a
        JOIN r b ON b.q = a.q AND b.layer = a.layer AND b.token_idx = a.token_idx + 1
        GROUP BY ALL""").fetchall()
    layers = sorted({int(layer) for layer, *_ in rows})
    return {layer: mean_jaccard((c, e, n) for at, c, e, n in rows if at == layer) for layer in layers}


def layer_transitions(con, steps: list[tuple[int, int]]) -> dict[tuple[int, int], dict[tuple[int, int], int]]:
    """For each (from, to) layer pair, over the positions logged at both: (top-1 expert
    at from, top-1 at to) -> positions. Top-1: the largest gate weight."""
    if not steps:
        return {}
    values = ", ".join(f"({a}, {b})" for a, b in steps)
    rows = con.sql(f"""
        WITH steps(f, t) AS (VALUES {values})
        SELECT steps.f, steps.t, x.top1, y.top1, count(*) FROM steps
        JOIN r x ON x.layer = steps.f
        JOIN r y ON y.layer = steps.t AND y.q = x.q AND y.token_idx = x.token_idx
        GROUP BY ALL""").fetchall()
    counts = {step: {} for step in steps}
    for f, t, x, y, n in rows:
        counts[(f, t)][(x, y)] = n
    return counts


def conditional_entropy(counts: dict[tuple[int, int], int]) -> float:
    """H(Y | X) in bits from joint counts of (x, y); NaN without any."""
    total = sum(counts.values())
    if not total:
        return math.nan
    by_x: dict[int, int] = {}
    for (x, _), n in counts.items():
        by_x[x] = by_x.get(x, 0) + n
    # fsum: exact, so the order DuckDB returns the counts in cannot change a bit
    return 0.0 - math.fsum(n / total * math.log2(n / by_x[x]) for (x, _), n in counts.items())


def top_transitions(counts: dict[tuple[int, int], int]) -> list[dict]:
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_TRANSITIONS]
    return [{"from_expert": int(x), "to_expert": int(y), "share": n / total} for (x, y), n in ranked]
