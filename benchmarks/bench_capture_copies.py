"""The device time of the route logger's copies: the capture copies, the one part of its
cost that a paused log still pays (bench_throughput_ab.py), and the step's copies to the
host ring. Inside the forward, per logged layer, RouteLogger._capture copies topk_ids and
topk_weights into its step buffers, and vLLM's CUDA graphs hold those copies. After the
forward, StepCopies.send (route_log/engine/copies.py) copies the step's rows of both buffers
into pinned host memory, asynchronously, on the forward's stream.

    python benchmarks/bench_capture_copies.py [--layers 1,24] [--rows 1000,16384] [--json]

Per case: the same two copies per layer as _capture (same buffers, shapes and dtypes as
attach makes for Qwen1.5-MoE: 16,384 rows, top-4, int32 ids and float32 weights) for
--steps steps, captured into one CUDA graph and replayed; the time per step is the
graph's time over its steps, measured with CUDA events, the median of --repeats
replays. A graph of its own pays one launch more than the copies would inside the
model's graph: an upper bound. The host copies: the two buffers' first rows into pinned
memory, timed with CUDA events around them, the median of --repeats.
"""

import argparse
import json
import statistics

import torch


def step_us(layers: int, rows: int, steps: int, repeats: int, top_k: int = 4, max_rows: int = 16384) -> float:
    ids = torch.zeros(max_rows, layers, top_k, dtype=torch.int32, device="cuda")
    weights = torch.zeros(max_rows, layers, top_k, dtype=torch.float32, device="cuda")
    topk_ids = torch.randint(0, 60, (rows, top_k), dtype=torch.int32, device="cuda")
    topk_weights = torch.rand(rows, top_k, device="cuda")
    def capture():
        for slot in range(layers):
            ids[:rows, slot].copy_(topk_ids)
            weights[:rows, slot].copy_(topk_weights)

    capture()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            capture()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / steps)
    assert torch.equal(ids[:rows, -1], topk_ids) and torch.equal(weights[:rows, -1], topk_weights)
    return statistics.median(times)


def ring_copy_us(layers: int, rows: int, repeats: int, top_k: int = 4) -> float:
    ids = torch.zeros(rows, layers, top_k, dtype=torch.int32, device="cuda")
    weights = torch.zeros(rows, layers, top_k, dtype=torch.float32, device="cuda")
    ring = torch.empty(2 * ids.numel(), dtype=torch.int32, pin_memory=True)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ring[: ids.numel()].view(ids.shape).copy_(ids, non_blocking=True)
        ring[ids.numel():].view(torch.float32).view(ids.shape).copy_(weights, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="1,24")
    parser.add_argument("--rows", default="1000,16384", help="routed rows per step: decode, full prefill")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    step_us(1, 8, args.steps, 3)  # first use of the copy kernels
    cases = [{"layers": int(layers), "rows": int(rows),
              "us_per_step": step_us(int(layers), int(rows), args.steps, args.repeats),
              "ring_copy_us": ring_copy_us(int(layers), int(rows), args.repeats)}
             for layers in args.layers.split(",") for rows in args.rows.split(",")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": cases}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']}, torch {result['torch']}")
    for c in cases:
        print(f"{c['layers']:>3} layers, {c['rows']:>6} rows: capture {c['us_per_step']:.1f} us, "
              f"copy to the host {c['ring_copy_us']:.1f} us per step")


if __name__ == "__main__":
    main()
