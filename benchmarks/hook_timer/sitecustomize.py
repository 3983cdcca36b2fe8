"""Times the route logger's calls on the engine's thread, and pauses the log on request,
in whichever process runs them (benchmarks only; vLLM imports this through PYTHONPATH).

ROUTE_HOOK_TIMES=folder (bench_throughput.py --time-hooks, bench_throughput_ab.py): when
vLLM imports route_logger, its begin_step and end_forward are wrapped with timers, and
every 10 steps the totals are written to ROUTE_HOOK_TIMES/<pid>.json as
{name: [calls, seconds, longest call]}, the names of paused steps ending in " paused"
(the steps after the last multiple of 10 are not counted).

ROUTE_PAUSE_FLAG=path (bench_throughput_ab.py): a step that begins while that file
exists admits no new request to the log, and its end_forward is skipped once no logged
request is open; requests finishing in it still close. The engine then runs as with the
log off but for the capture copies its CUDA graphs hold and an idle writer process. The
benchmark switches only between generations, so no request is both paused and logged,
and the log holds exactly the logged generations' requests.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

MODULE = "vllm.model_executor.layers.fused_moe.route_logger"


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


class _WithoutNewRequests:
    """A scheduler output as the paused logger sees it: the runner keeps the real one."""

    scheduled_new_reqs = ()

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _wrap(module) -> None:
    totals: dict[str, list] = {}
    out = os.path.join(os.environ["ROUTE_HOOK_TIMES"], f"{os.getpid()}.json")
    flag = os.environ.get("ROUTE_PAUSE_FLAG")
    state = {"paused": False}
    begin, end = module.begin_step, module.end_forward

    def timed(name, call, *args):
        t0 = time.perf_counter()
        if call is not None:
            call(*args)
        dt = time.perf_counter() - t0
        total = totals.setdefault(name + (" paused" if state["paused"] else ""), [0, 0.0, 0.0])
        total[0] += 1
        total[1] += dt
        total[2] = max(total[2], dt)
        return total[0]

    def begin_step(scheduler_output):
        state["paused"] = flag is not None and os.path.exists(flag)
        timed("begin_step", begin, _WithoutNewRequests(scheduler_output) if state["paused"] else scheduler_output)

    def end_forward(*args):
        logged = module._ACTIVE is not None and module._ACTIVE.slots.of
        calls = timed("end_forward", end if logged or not state["paused"] else None, *args)
        if calls % 10 == 0:
            with open(out, "w") as f:
                json.dump(totals, f)

    module.begin_step, module.end_forward = begin_step, end_forward


if os.environ.get("ROUTE_HOOK_TIMES"):
    sys.meta_path.insert(0, _Finder())
