"""Times the route logger's calls on the engine's thread, and pauses the log in alternate
blocks of steps, in whichever process runs them (benchmarks only; vLLM imports this
through PYTHONPATH).

ROUTE_HOOK_TIMES=folder (bench_throughput.py --time-hooks, bench_throughput_ab.py): when
vLLM imports route_logger, its begin_step and end_forward are wrapped with timers, and
every 10 steps the totals are written to ROUTE_HOOK_TIMES/<pid>.json as
{name: [calls, seconds, longest call, CPU seconds of the calling thread]} (seconds
beyond the CPU's: the thread waited, for the GIL or in a system call), the names of
paused steps ending in " paused" (the steps after the last multiple of 10 are not
counted).

ROUTE_PAUSE_STEPS=B (bench_throughput_ab.py): steps alternate between B logged and B
paused ones. A paused step's end_forward is skipped: none of its rows are copied to the
host or logged. Its begin_step runs as ever, so requests are admitted and closed (the
log then holds the requests with the positions of logged steps only; the next logged
step finds the skipped positions, which are reported as not logged). Each step appends
(time.perf_counter() at begin_step, tokens scheduled, paused) to
ROUTE_HOOK_TIMES/<pid>.steps as struct STEP, unbuffered, so that a process ended by
multiprocessing (no atexit) leaves every step it began.
"""

import importlib.abc
import importlib.machinery
import json
import os
import struct
import sys
import time

MODULE = "vllm.model_executor.layers.fused_moe.route_logger"
STEP = struct.Struct("<dqB")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _wrap(module)

        spec.loader.exec_module = exec_module
        return spec


def _wrap(module) -> None:
    totals: dict[str, list] = {}
    folder = os.environ["ROUTE_HOOK_TIMES"]
    every = int(os.environ.get("ROUTE_PAUSE_STEPS", 0))
    trace = os.open(os.path.join(folder, f"{os.getpid()}.steps"), os.O_WRONLY | os.O_CREAT | os.O_APPEND) \
        if every else None
    state = {"paused": False, "steps": 0}
    begin, end = module.begin_step, module.end_forward

    def timed(name, call, *args):
        t0, c0 = time.perf_counter(), time.thread_time()
        if call is not None:
            call(*args)
        dt = time.perf_counter() - t0
        total = totals.setdefault(name + (" paused" if state["paused"] else ""), [0, 0.0, 0.0, 0.0])
        total[0] += 1
        total[1] += dt
        total[2] = max(total[2], dt)
        total[3] += time.thread_time() - c0
        return total[0]

    def begin_step(scheduler_output):
        state["paused"] = bool(every) and state["steps"] // every % 2 == 1
        state["steps"] += 1
        if trace is not None:
            os.write(trace, STEP.pack(time.perf_counter(), scheduler_output.total_num_scheduled_tokens,
                                      state["paused"]))
        timed("begin_step", begin, scheduler_output)

    def end_forward(*args):
        calls = timed("end_forward", None if state["paused"] else end, *args)
        if calls % 10 == 0:
            with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
                json.dump(totals, f)

    module.begin_step, module.end_forward = begin_step, end_forward


if os.environ.get("ROUTE_HOOK_TIMES"):
    sys.meta_path.insert(0, _Finder())
