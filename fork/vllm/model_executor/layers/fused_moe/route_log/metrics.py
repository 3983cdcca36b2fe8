# SPDX-License-Identifier: Apache-2.0
"""Live expert load on vLLM's /metrics (VLLM_LOG_MOE_METRICS), with or without a log
file, through prometheus_client's multiprocess mode: the machinery vLLM itself uses
with several API servers.

Each writer process (one per pipeline stage and data-parallel rank; writer/load.py)
counts the route records it writes and publishes them as multiprocess values, files in
a directory that /metrics reads and sums. With several API servers that directory is
vLLM's own PROMETHEUS_MULTIPROC_DIR, read by every API server; with one, the front end
makes a directory and registers a MultiProcessCollector for it (``metrics_directory``).
Nothing is added to the engine's process.

    vllm:moe_expert_tokens_total{model_name, layer, expert}  tokens routed to the expert
        (per-expert series: layers x experts of them; "layer" keeps the two below only)
    vllm:moe_routed_tokens_total{model_name, layer}           tokens routed at the layer
    vllm:moe_load_imbalance{model_name, layer}                max / mean expert load over
        the last WINDOW_S seconds (1.0: even; NaN: no tokens then); with several
        data-parallel writers, the largest of theirs

Counted as the log counts them: positions computed by a forward (not those served from
the prefix cache, which load no expert), each once.
"""

import atexit
import os
import shutil
import tempfile

from .front_end import remove_orphans

EXPERT_TOKENS = "vllm:moe_expert_tokens"
ROUTED_TOKENS = "vllm:moe_routed_tokens"
LOAD_IMBALANCE = "vllm:moe_load_imbalance"
WINDOW_S = 60.0
GRANULARITIES = ("expert", "layer")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DIR_PREFIX = "vllm-moe-metrics-"  # then the front end's pid

_COLLECTOR = None  # this front end's collector of its own directory


def metrics_directory() -> str:
    """Front end: where the writers publish. vLLM's multiprocess directory when it has
    one (several API servers read it); else one of this process's own, read by a
    collector on the default registry (/metrics of one API server or an LLM's process),
    removed at exit."""
    global _COLLECTOR
    if os.environ.get(MULTIPROC_ENV):
        return os.environ[MULTIPROC_ENV]
    from prometheus_client import REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    remove_orphans(DIR_PREFIX)
    directory = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
    atexit.register(shutil.rmtree, directory, True)
    if _COLLECTOR is not None:  # another engine configured in this process
        REGISTRY.unregister(_COLLECTOR)
    _COLLECTOR = MultiProcessCollector(REGISTRY, path=directory)
    return directory
