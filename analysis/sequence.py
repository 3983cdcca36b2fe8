"""Routing across positions and layers, computed by DuckDB over the log itself: these
need each record beside its neighbours (the next position of the same request and
sample, the next logged layer of the same position), which the streaming reader's
aggregates do not keep. Distinct records only, as the reader counts them."""

import math
from pathlib import Path

import duckdb

from analysis.route_format import PARQUET_ROUTES

JSON_COLUMNS = ("{type: 'VARCHAR', req_id: 'VARCHAR', sample: 'BIGINT', token_idx: 'BIGINT', layer: 'BIGINT', "
                "topk_ids: 'BIGINT[]', topk_weights: 'DOUBLE[]'}")
TOP_TRANSITIONS = 5


def _records(path: Path) -> str:
    """The log's distinct route records as a SQL query."""
    if path.is_dir():
        source = f"read_parquet('{path / PARQUET_ROUTES}/*.parquet')"
        routes = f"SELECT req_id::VARCHAR AS req_id, sample, token_idx, layer, topk_ids, topk_weights FROM {source}"
    else:  # the reader has validated every line but an unfinished last one
        source = (f"read_json('{path}', format = 'newline_delimited', columns = {JSON_COLUMNS}, "
                  "ignore_errors = true)")
        routes = f"SELECT req_id, sample, token_idx, layer, topk_ids, topk_weights FROM {source} WHERE type = 'route'"
    return (f"SELECT DISTINCT ON (req_id, s, token_idx, layer) req_id, coalesce(sample, -1) AS s, token_idx, "
            f"layer, topk_ids, topk_weights FROM ({routes})")


def add_sequence_metrics(stats: dict, path: str | Path, layers: list[int]) -> None:
    """Adds adjacent_overlap to each of ``stats``' layers and layer_affinity to it, from
    one read of the log (its distinct records, kept in DuckDB while both are computed)."""
    con = duckdb.connect()
    con.execute(f"CREATE TEMP TABLE r AS {_records(Path(path))}")
    overlap = adjacent_overlap(con)
    for entry in stats["layers"]:
        entry["adjacent_overlap"] = overlap.get(entry["layer"], math.nan)
    stats["layer_affinity"] = layer_affinity(con, layers)
    con.close()


def adjacent_overlap(con) -> dict[int, float]:
    """Per layer: the mean Jaccard index of the top-k expert sets of positions t and t+1
    of the same request and sample. ``con``: a DuckDB connection with the records as r."""
    rows = con.sql("""
        WITH pairs AS (
            SELECT layer, topk_ids AS b, lag(topk_ids) OVER w AS a, token_idx - lag(token_idx) OVER w AS step
            FROM r WINDOW w AS (PARTITION BY req_id, s, layer ORDER BY token_idx))
        SELECT layer, avg(len(list_intersect(a, b)) / len(list_distinct(list_concat(a, b)))::DOUBLE)
        FROM pairs WHERE step = 1 GROUP BY layer ORDER BY layer""").fetchall()
    # DuckDB's parallel mean sums in no fixed order: its last bits vary from run to run.
    return {int(layer): round(float(value), 12) for layer, value in rows}


def layer_affinity(con, layers: list[int]) -> list[dict]:
    """For each pair of consecutively logged layers, over the positions logged at both:
    H(top-1 expert at ``to`` | top-1 expert at ``from``) in bits, and the most frequent
    (from expert, to expert) pairs with their shares. Top-1: the largest gate weight."""
    pairs = [(a, b) for a, b in zip(sorted(layers), sorted(layers)[1:])]
    if not pairs:
        return []
    steps = ", ".join(f"({a}, {b})" for a, b in pairs)
    rows = con.sql(f"""
        WITH top AS (SELECT req_id, s, token_idx, layer,
                       topk_ids[list_position(topk_weights, list_max(topk_weights))] AS top1 FROM r),
        steps(f, t) AS (VALUES {steps})
        SELECT steps.f, steps.t, x.top1, y.top1, count(*) FROM steps
        JOIN top x ON x.layer = steps.f
        JOIN top y ON y.layer = steps.t AND y.req_id = x.req_id AND y.s = x.s AND y.token_idx = x.token_idx
        GROUP BY ALL""").fetchall()
    out = []
    for a, b in pairs:
        counts = {(x, y): n for f, t, x, y, n in rows if (f, t) == (a, b)}
        out.append({"from": a, "to": b, "positions": sum(counts.values()),
                    "cond_entropy_bits": conditional_entropy(counts),
                    "top_transitions": top_transitions(counts)})
    return out


def conditional_entropy(counts: dict[tuple[int, int], int]) -> float:
    """H(Y | X) in bits from joint counts of (x, y); NaN without any."""
    total = sum(counts.values())
    if not total:
        return math.nan
    by_x: dict[int, int] = {}
    for (x, _), n in counts.items():
        by_x[x] = by_x.get(x, 0) + n
    return 0.0 - sum(n / total * math.log2(n / by_x[x]) for (x, _), n in counts.items())


def top_transitions(counts: dict[tuple[int, int], int]) -> list[dict]:
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_TRANSITIONS]
    return [{"from_expert": int(x), "to_expert": int(y), "share": n / total} for (x, y), n in ranked]
