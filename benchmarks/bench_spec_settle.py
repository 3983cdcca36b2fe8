"""The route logger's time on the engine's thread with speculative decoding, without an
engine: N requests in decode, each step 1 + K rows per request, the sampler keeping a
random number of drafts; the step settled at once (CPU: no event to wait for).

    .venv/bin/python benchmarks/bench_spec_settle.py [--requests 1000] [--drafts 3] [--steps 60]

Prints the mean ms per step of begin_step, end_forward (the rows' copies into the ring)
and end_sample (which settles the step: kept rows, positions, the spans to the writer).
The writer process renders what it is sent, on its own core."""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_route_log_writer import make_logger  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--drafts", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    n, k = args.requests, args.drafts
    logger = make_logger(Path(tempfile.mkdtemp()) / "log.jsonl", max_rows=n * (k + 1), speculative=True)
    params = SimpleNamespace(max_tokens=1 << 30, eos_token_id=2, stop_token_ids=[5], min_tokens=0)
    new = [SimpleNamespace(req_id=f"r{i}-0123abcd", external_req_id=f"r{i}", prompt_token_ids=[1] * 4,
                           prompt_embeds=None, num_computed_tokens=0, block_ids=([],), sampling_params=params)
           for i in range(n)]
    ids = [r.req_id for r in new]
    cached = SimpleNamespace(req_ids=ids, resumed_req_ids=set(), new_block_ids=[None] * n)
    rng = np.random.default_rng(0)
    pos, times = np.zeros(n, np.int64), np.zeros(3)
    for step in range(args.steps):
        rows = 4 if step == 0 else k + 1
        drafts = {} if step == 0 else {r: [0] * k for r in ids}
        t0 = time.perf_counter()
        logger.begin_step(SimpleNamespace(scheduled_new_reqs=new if step == 0 else [], scheduled_cached_reqs=cached,
                                          finished_req_ids=set(), scheduled_spec_decode_tokens=drafts))
        t1 = time.perf_counter()
        logger.end_forward(ids, np.arange(n + 1) * rows, pos.copy(), torch.zeros(n * rows, dtype=torch.int32))
        t2 = time.perf_counter()
        sampled = torch.from_numpy(rng.integers(1, k + 2, n)) if step else torch.ones(n, dtype=torch.int64)
        logger.end_sample(torch.full((n, k + 1), 9), sampled)
        t3 = time.perf_counter()
        pos += sampled.numpy() if step else rows
        if step >= 10:
            times += (t1 - t0, t2 - t1, t3 - t2)
    logger.close()
    b, f, s = times / (args.steps - 10) * 1e3
    print(f"{n} requests, {k} drafts: ms per step: begin_step {b:.3f}, end_forward {f:.3f}, end_sample (settle) {s:.3f}")


if __name__ == "__main__":
    main()
