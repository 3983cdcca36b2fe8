"""The route log's cost to a busy engine loop, on CPU: the serving contention without a GPU.

    python benchmarks/bench_writer_cpu.py [--rounds 3] [--modes off,layer0,all] [--json OUT]

A Python loop stands in for the engine's thread: per step it does ``--engine-units``
of pure-Python work per scheduled request (the scheduler and the runner hold the GIL) and then waits ``--wait-ms`` with the GIL released (the GPU sync). A toy
scheduler admits ``--requests`` requests at once, prefills them in chunks of the
``--budget`` token budget, and decodes ``--max-tokens`` tokens each, as vLLM does with
one ``generate`` call. Every step goes through the real ``RouteLogger.begin_step`` /
``end_forward`` and its writer, with the device buffers replaced by host tensors
holding random routing. Each mode runs in a fresh process, modes rotate per round.
Mode "all-store" is "all" with the prefix-cache block store on (block size 16; KV
blocks handed out as vLLM does, block ids sent with each step, every row stored; no
cache hits). Reported: steps/s, the ratio of wall time to "off", engine waits, whether the log
holds every record, the writer's lag (last step to the closing record), the peak RSS
of the engine loop's process and of the writer process (from the log's 'end' record;
the writer of 3b4bc08 was a thread of the loop's process).
"""

import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

MODES = {"off": None, "layer0": [0], "all": "all", "all-store": "all"}
BLOCK_SIZE = 16


def make_logger(path: str, layers: list[int], rows: int, top_k: int, num_experts: int, store: bool):
    import torch

    from vllm.model_executor.layers.fused_moe import route_logger
    from vllm.model_executor.layers.fused_moe.route_log.config import RouteLogConfig

    config = RouteLogConfig.from_env({"VLLM_LOG_MOE": path, "VLLM_LOG_MOE_LAYERS": "all"})
    meta = {"type": "meta", "schema": 1, "layers_logged": layers, "num_experts": num_experts,
            "top_k": top_k, "bench": True}
    logger = route_logger.RouteLogger(config, meta, layers, top_k, rows, torch.device("cpu"), path, {},
                                      {"block_size": BLOCK_SIZE} if store else None)
    gen = torch.Generator().manual_seed(0)
    logger.ids.copy_(torch.randint(0, num_experts, logger.ids.shape, generator=gen))
    logger.weights.copy_(torch.rand(logger.weights.shape, generator=gen))
    return logger


class ToyScheduler:
    """All requests arrive at once; each step decodes every prefilled request and
    fills the rest of the token budget with prompt chunks, in arrival order."""

    def __init__(self, n: int, prompt_len: int, max_tokens: int, budget: int, wave: int):
        self.waiting = [SimpleNamespace(req_id=f"w{wave}-{i}-0123abcd", external_req_id=f"w{wave}-{i}",
                                        prompt_token_ids=[1] * prompt_len, prompt_embeds=None,
                                        num_computed_tokens=0, done=0, new=True, blocks=[])
                        for i in range(n)]
        self.next_block = 0
        self.running: list = []
        self.prompt_len, self.max_tokens, self.budget = prompt_len, max_tokens, budget
        self.finished: list[str] = []

    def step(self):
        finished, self.finished = self.finished, []
        batch, budget = [], self.budget
        for r in self.running:
            if r.done >= r.num_computed_tokens and r.num_computed_tokens >= self.prompt_len:
                batch.append((r, 1))
                budget -= 1
        for r in self.running + self.waiting:
            left = self.prompt_len - r.num_computed_tokens
            if left > 0 and budget > 0:
                batch.append((r, min(left, budget)))
                budget -= min(left, budget)
        new_blocks = self.allocate(batch)
        new = [r for r, _ in batch if r.new]
        for r in new:
            r.new = False
            r.block_ids = (list(r.blocks),)
            self.waiting.remove(r)
            self.running.append(r)
        old = [r.req_id for r, _ in batch if r not in new]
        cached = SimpleNamespace(req_ids=old, resumed_req_ids=set(),
                                 new_block_ids=[new_blocks.get(i) for i in old])
        out = SimpleNamespace(scheduled_new_reqs=new, scheduled_cached_reqs=cached, finished_req_ids=finished)
        return out, batch

    def allocate(self, batch) -> dict[str, tuple[list[int]]]:
        """KV blocks for the positions this step computes: {req_id: (new block ids,)}."""
        new_blocks = {}
        for r, n in batch:
            need = -(-(r.num_computed_tokens + n) // BLOCK_SIZE) - len(r.blocks)
            if need > 0:
                ids = list(range(self.next_block, self.next_block + need))
                self.next_block += need
                r.blocks += ids
                new_blocks[r.req_id] = (ids,)
        return new_blocks

    def advance(self, batch) -> None:
        for r, n in batch:
            r.num_computed_tokens += n
            r.done = r.num_computed_tokens
        for r in [r for r in self.running if r.num_computed_tokens >= self.prompt_len + self.max_tokens - 1]:
            self.running.remove(r)
            self.finished.append(r.req_id)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running


def busy(units: int, table: dict) -> None:
    """Pure-Python work that holds the GIL."""
    for i in range(units):
        table[i & 255] = table.get((i + 1) & 255, 0) + 1


def child(args) -> dict:
    import torch

    # Every mode carries vLLM's heap, as an engine does: its size sets the cost of GC.
    importlib.import_module("vllm.model_executor.layers.fused_moe.route_logger")

    # On a GPU the step's copy is the device's DMA; here a memcpy, kept to this thread
    # so that torch's thread pool does not fight the writer for the cores.
    torch.set_num_threads(1)
    mode = MODES[args.mode]
    logger = None
    if mode is not None:
        layers = list(range(args.layers)) if mode == "all" else mode
        logger = make_logger(args.log, layers, args.budget, args.top_k, args.experts, args.mode == "all-store")
    table: dict = {}
    steps = records = 0
    t0 = time.perf_counter()
    for wave in range(args.waves):
        sched = ToyScheduler(args.requests, args.prompt_len, args.max_tokens, args.budget, wave)
        while not sched.idle:
            out, batch = sched.step()
            if logger:
                logger.begin_step(out)
            busy(args.engine_units * len(batch), table)
            # The batch's metadata, which a model runner has whether it logs or not.
            req_ids = [r.req_id for r, _ in batch]
            counts = np.array([n for _, n in batch], dtype=np.int32)
            qsl = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            computed = np.array([r.num_computed_tokens for r, _ in batch], dtype=np.int32)
            if logger:
                logger.end_forward(req_ids, qsl, computed)
            time.sleep(args.wait_ms / 1000)
            sched.advance(batch)
            steps += 1
            records += sum(n for _, n in batch)
        if logger:  # the finished requests of the last step
            logger.begin_step(SimpleNamespace(scheduled_new_reqs=[], finished_req_ids=sched.finished,
                                              scheduled_cached_reqs=SimpleNamespace(
                                                  req_ids=[], resumed_req_ids=set(), new_block_ids=[])))
    wall = time.perf_counter() - t0
    result = {"mode": args.mode, "wall_s": wall, "steps": steps, "rows": records}
    if logger:
        t1 = time.perf_counter()
        logger.close()
        result["writer_lag_s"] = time.perf_counter() - t1
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def check_log(path: Path, rows: int, layers: int) -> dict:
    routes, end = 0, None
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b'{"type":"route"'):
                routes += 1
            elif line.startswith(b'{"type":"end"'):
                end = json.loads(line)
    expected = rows * layers
    return {"route_records": routes, "expected": expected, "complete": routes == expected,
            "engine_waits": end and end["engine_waits"], "final": end and end["final"],
            "writer_mb": end and end.get("writer_max_rss_mb"),
            "block_store_mb": end and round(end.get("block_store_bytes", 0) / 2**20, 1),
            "mb": path.stat().st_size / 1e6}


def run(args) -> list[dict]:
    names = args.modes.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for mode in order:
                log, out = Path(tmp) / f"{mode}.jsonl", Path(tmp) / f"{mode}.json"
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--log", str(log),
                       "--out", str(out)] + [f"--{k.replace('_', '-')}={v}" for k, v in shared(args).items()]
                subprocess.run(cmd, check=True)
                result = json.loads(out.read_text()) | {"round": rnd}
                if log.exists():
                    n = 1 if mode == "layer0" else args.layers
                    result["log"] = check_log(log, result["rows"], n)
                    log.unlink()
                print(json.dumps(result), flush=True)
                results.append(result)
    return results


def shared(args) -> dict:
    keys = ("requests", "prompt_len", "max_tokens", "budget", "layers", "top_k", "experts",
            "engine_units", "wait_ms", "waves")
    return {k: getattr(args, k) for k in keys}


def table(results: list[dict]) -> str:
    rounds = sorted({r["round"] for r in results})
    cell = {(r["mode"], r["round"]): r for r in results}
    lines = ["| mode | wall s (median) | steps/s | vs off (per round) | engine waits | log complete "
             "| writer lag s | loop peak RSS MB | writer peak RSS MB | block store MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        runs = [cell[(mode, n)] for n in rounds if (mode, n) in cell]
        if not runs:
            continue
        ratios = [r["wall_s"] / cell[("off", r["round"])]["wall_s"] for r in runs if ("off", r["round"]) in cell]
        logs = [r["log"] for r in runs if "log" in r]
        wall = statistics.median(r["wall_s"] for r in runs)
        lags = " / ".join(f"{r['writer_lag_s']:.2f}" for r in runs if "writer_lag_s" in r) or "-"
        lines.append(
            f"| {mode} | {wall:.2f} | {statistics.median(r['steps'] / r['wall_s'] for r in runs):.0f} "
            f"| {' / '.join(f'{x:.3f}x' for x in ratios)} "
            f"| {'-' if not logs else ' / '.join(str(x['engine_waits']) for x in logs)} "
            f"| {'-' if not logs else ('yes' if all(x['complete'] and x['final'] for x in logs) else 'NO')} "
            f"| {lags} "
            f"| {max(r['peak_rss_mb'] for r in runs):.0f} "
            f"| {max((x['writer_mb'] or 0 for x in logs), default=0) or '-'} "
            f"| {max((x.get('block_store_mb') or 0 for x in logs), default=0) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="off,layer0,all")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--prompt-len", type=int, default=150)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--budget", type=int, default=16384, help="max_num_batched_tokens")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--engine-units", type=int, default=150,
                   help="GIL-holding work per request per step (150: about 20 us on a 2-core EPYC)")
    p.add_argument("--wait-ms", type=float, default=50.0, help="GIL-free wait per step (the GPU)")
    p.add_argument("--waves", type=int, default=1, help="generate calls, one after the other")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(args)))
        return
    results = run(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": shared(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
