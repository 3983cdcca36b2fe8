"""Times the route logger's calls on the engine's thread, in whichever process runs them.

bench_throughput.py --time-hooks puts this folder on the engine's PYTHONPATH and sets
ROUTE_HOOK_TIMES to a folder; when vLLM imports route_logger, its begin_step and
end_forward are wrapped with timers, and every 10 steps the totals are written to
ROUTE_HOOK_TIMES/<pid>.json as {name: [calls, seconds, longest call]} (the
steps after the last multiple of 10 are not counted).
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


def _wrap(module) -> None:
    totals = {"begin_step": [0, 0.0, 0.0], "end_forward": [0, 0.0, 0.0]}
    out = os.path.join(os.environ["ROUTE_HOOK_TIMES"], f"{os.getpid()}.json")
    for name, total in totals.items():
        call = getattr(module, name)

        def timed(*args, call=call, total=total, name=name):
            t0 = time.perf_counter()
            call(*args)
            dt = time.perf_counter() - t0
            total[0] += 1
            total[1] += dt
            total[2] = max(total[2], dt)
            if name == "end_forward" and total[0] % 10 == 0:
                with open(out, "w") as f:
                    json.dump(totals, f)

        setattr(module, name, timed)


if os.environ.get("ROUTE_HOOK_TIMES"):
    sys.meta_path.insert(0, _Finder())
