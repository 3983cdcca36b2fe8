import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments.tiny_moe import TOP2, TOP4_NORM, build_dense, build_moe

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ROUTE_ENV = ("VLLM_LOG_MOE", "VLLM_LOG_MOE_LAYERS", "VLLM_LOG_MOE_BUFFER_MB", "VLLM_LOG_MOE_FORMAT",
             "VLLM_LOG_MOE_METRICS")


@pytest.fixture(autouse=True)
def _no_route_env(monkeypatch):
    """Tests start with the route log off, whatever the calling shell has set."""
    for name in ROUTE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "top2": build_moe(TOP2, root / "top2"),
        "top4": build_moe(TOP4_NORM, root / "top4"),
        "dense": build_dense(root / "dense"),
    }


@dataclass
class EngineRun:
    returncode: int
    result: dict | None  # engine_job.py's output
    output: str  # stdout and stderr (vLLM logs to stdout)
    log: Path | None
    workdir: Path

    def assert_log_closed(self, end: dict) -> None:
        """The final 'end', unless vLLM killed the engine core at shutdown: on a loaded
        2-core machine the engine core sometimes does not answer SIGTERM within 120 s
        (CI once; here 1 run in 3 under load, with logging on and with it off alike), and
        vLLM then kills its process tree; the writer's provisional 'end' stands."""
        if "force killing remaining process EngineCore" in self.output:
            assert end["final"] is False, "a killed engine cannot have closed its log"
        else:
            assert end["final"] is True, self.output[-3000:]


def run_engine(
    tmp: Path, spec: dict, env: dict[str, str] | None = None, timeout=900, job="engine_job.py",
    during=None,
) -> EngineRun:
    """One engine in a fresh process (and session); ``env`` adds e.g. VLLM_LOG_MOE for
    that process; ``job``: engine_job.py (LLMEngine) or async_engine_job.py (AsyncLLM);
    ``during(proc)`` runs while the engine does (to kill it, say)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "spec.json").write_text(json.dumps(spec))
    full_env = {k: v for k, v in os.environ.items() if k not in ROUTE_ENV}
    full_env.update(env or {}, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    out, output = tmp / "out.json", tmp / "output.txt"
    with open(output, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / job), str(tmp / "spec.json"), str(out)],
            env=full_env, cwd=tmp, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            if during is not None:
                during(proc)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log = Path(env["VLLM_LOG_MOE"]) if env and "VLLM_LOG_MOE" in env else None
    result = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else None
    return EngineRun(proc.returncode, result, output.read_text(), log, tmp)


def wait_until(condition, timeout: float, what: str) -> None:
    """Polls a condition of a running engine (its log's size, a server's health)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (an engine's front end, engine core and workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def vllm_release() -> str:
    """The installed vLLM's release (0.32.0 by default; 0.31.0 with setup.sh --version)."""
    return importlib.metadata.version("vllm").split("+")[0]


def engine_kwargs(**overrides) -> dict:
    """CPU-friendly defaults: fp32 for exact comparisons, small memory, chunked prefill."""
    kwargs = dict(
        dtype="float32", gpu_memory_utilization=0.3, max_model_len=256,
        max_num_batched_tokens=32, max_num_seqs=4, seed=1234, skip_tokenizer_init=True,
    )
    kwargs.update(overrides)
    return kwargs
