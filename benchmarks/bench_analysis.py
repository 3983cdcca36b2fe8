"""Analysis at scale: generate a synthetic route log, then time `analysis.stats` on it
beside DuckDB's plain per-layer histogram of the same file (the yardstick).

    python benchmarks/bench_analysis.py --records 10000000 --log /tmp/big.jsonl [--parquet]

The log is written with the fork's own renderer (route_log/writer/render.py), so its
lines are byte-for-byte what the engine writes: 24 layers, top-4 of 60 experts, requests
of 100 prompt + 128 generated positions, skewed expert popularity, token ids once per
request (Qwen's vocabulary size), so that token specialisation is counted too. The analysis runs in a
fresh process whose peak RSS is read from the kernel (ru_maxrss), together with its wall time.
With --parquet the log is also converted (python -m analysis.convert, LOG.parquet beside
it) and the analysis of that is timed the same way, with both logs' sizes.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LAYERS, EXPERTS, TOP_K, PROMPT, GENERATED, VOCAB = 24, 60, 4, 100, 128, 151_936


def generate(path: Path, records: int, seed: int = 0) -> int:
    from vllm.model_executor.layers.fused_moe.route_log.writer.render import render_rows

    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(EXPERTS, 0.5))
    positions = PROMPT + GENERATED
    requests = -(-records // (LAYERS * positions))
    meta = {"type": "meta", "schema": 1, "model_id": "synthetic", "layers_logged": list(range(LAYERS)),
            "moe_layers": list(range(LAYERS)), "num_layers": LAYERS, "num_experts": EXPERTS, "top_k": TOP_K}
    written = 0
    batch = 32  # requests rendered together
    with open(path, "wb") as f:
        f.write(json.dumps(meta).encode() + b"\n")
        for first in range(0, requests, batch):
            names = [f"req-{r}" for r in range(first, min(first + batch, requests))]
            for name in names:
                f.write(json.dumps({"type": "request", "req_id": name, "prompt_len": PROMPT,
                                    "prompt_tokens_cached": 0,
                                    "prompt_token_ids": rng.integers(0, VOCAB, PROMPT).tolist()}).encode() + b"\n")
            rows = len(names) * positions
            # Gumbel top-k: the k largest of log(popularity) + Gumbel noise are a draw
            # of k distinct experts without replacement, weighted by popularity.
            scores = np.log(popularity) + rng.gumbel(size=(rows, LAYERS, EXPERTS)).astype(np.float32)
            ids = np.argpartition(-scores, TOP_K, axis=2)[:, :, :TOP_K].astype(np.int32)
            raw = rng.random((rows, LAYERS, TOP_K), dtype=np.float32) + 0.05
            weights = raw / raw.sum(axis=2, keepdims=True)
            prefixes = np.array([[f'"req_id":"{n}",'.ljust(24).encode()] for n in names]).view(np.uint8)
            f.write(render_rows(ids, weights, np.repeat(prefixes, positions, axis=0),
                                np.tile(np.arange(positions), len(names)), list(range(LAYERS))))
            for name in names:  # the tokens fed after the prompt, as the fork logs them
                f.write(json.dumps({"type": "request_end", "req_id": name, "finished": True,
                                    "generated_token_ids": rng.integers(0, VOCAB, GENERATED).tolist()}).encode() + b"\n")
            written += rows * LAYERS
        f.write(json.dumps({"type": "end", "route_records": written}).encode() + b"\n")
    return written


# The yardstick: DuckDB's own per-layer expert histogram of the same file, 2 threads.
HISTOGRAM = """
import duckdb, sys
path = sys.argv[1]
source = (f"read_parquet('{path}/routes/*.parquet')" if path.endswith(".parquet") else
          f"read_json('{path}', format='newline_delimited', columns={{type: 'VARCHAR', layer: 'BIGINT', "
          "topk_ids: 'BIGINT[]'}, ignore_errors=true) WHERE type = 'route'")
con = duckdb.connect()
con.execute("SET threads = 2; SET enable_progress_bar = false")
rows = con.sql(f"SELECT layer, e, count(*) FROM (SELECT layer, unnest(topk_ids) AS e FROM {source}) GROUP BY ALL").fetchall()
print(sum(n for *_, n in rows))
"""


def measure(path: Path, tool: str = "stats") -> dict:
    """Runs ``analysis.stats --json`` (or the DuckDB histogram) in a fresh process;
    returns its wall time and peak RSS (this child's own, from wait4: RUSAGE_CHILDREN
    would keep the largest of all runs)."""
    command = ["-m", "analysis.stats", str(path), "--json"] if tool == "stats" else ["-c", HISTOGRAM, str(path)]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tool} {path} failed")
    records = json.loads(out)["route_records"] if tool == "stats" else int(out) // TOP_K
    return {"tool": tool, "wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024), "records": records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--log", type=Path, default=Path("/tmp/route_log_10m.jsonl"))
    parser.add_argument("--keep", action="store_true", help="keep an existing log of that name")
    parser.add_argument("--parquet", action="store_true", help="time the log's parquet form too")
    parser.add_argument("--runs", type=int, default=1, help="timed analyses of each form")
    args = parser.parse_args()
    if not (args.keep and args.log.exists()):
        t0 = time.perf_counter()
        written = generate(args.log, args.records)
        print(f"generated {written} route records, {args.log.stat().st_size / 1e9:.2f} GB "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
    forms = {"jsonl": args.log}
    if args.parquet:
        forms["parquet"] = args.log.with_suffix(".parquet")
        if not (args.keep and forms["parquet"].exists()):
            subprocess.run([sys.executable, "-m", "analysis.convert", str(args.log), str(forms["parquet"])], check=True)
    for _ in range(args.runs):  # alternated: the machine's drift weighs on every form and tool alike
        for form, path in forms.items():
            size = sum(f.stat().st_size for f in path.rglob("*")) if path.is_dir() else path.stat().st_size
            for tool in ("stats", "duckdb-histogram"):
                print(json.dumps({"form": form, "log_bytes": size, **measure(path, tool)}), flush=True)


if __name__ == "__main__":
    main()
