"""Runs one vLLM engine for a test, in its own process (own VLLM_LOG_MOE* environment).

    python tests/engine_job.py SPEC.json OUT.json

SPEC: {"model": dir, "engine": {LLM kwargs}, "waves": [[request, ...], ...]}, a request
being {"id": str, "prompt_token_ids": [...], "sampling": {SamplingParams kwargs}}.
Each wave after the first is added once the engine has run "wave_gap_steps" (default
2) more steps, so requests join a running batch, or once it is idle. OUT: {"outputs": [{"id", "prompt_token_ids", "samples": [...]}],
"workers": what each worker reports about its route logger}; each output also carries
vLLM's own "routed_experts" when the engine was started with enable_return_routed_experts.
"""

import json
import os
import sys


def worker_route_state(worker) -> dict:
    try:
        from vllm.model_executor.layers.fused_moe import route_logger
    except ImportError:
        return {"fork": False}  # stock vLLM, for comparisons
    from vllm.model_executor.layers.fused_moe.layer import MoERunner

    model = worker.model_runner.get_model()
    hooked = [
        m.router.route_log_fn is not None for m in model.modules() if isinstance(m, MoERunner)
    ]
    return {"active": route_logger._ACTIVE is not None, "routers": len(hooked), "hooked": sum(hooked)}


SHUTDOWN_S = 120


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    llm = LLM(model=spec["model"], **spec["engine"])
    engine = llm.llm_engine
    finished = {}
    waves = list(spec["waves"])
    steps_since_wave = 0
    while waves or engine.has_unfinished_requests():
        if waves and (steps_since_wave >= spec.get("wave_gap_steps", 2) or not engine.has_unfinished_requests()):
            for req in waves.pop(0):
                engine.add_request(
                    req["id"],
                    TokensPrompt(prompt_token_ids=req["prompt_token_ids"]),
                    # FINAL_ONLY, as LLM.generate: one output with all n samples.
                    SamplingParams(**req["sampling"], output_kind=RequestOutputKind.FINAL_ONLY),
                )
            steps_since_wave = 0
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        steps_since_wave += 1
    workers = llm.collective_rpc(worker_route_state)
    # A clean shutdown, with time for it: left to garbage collection, vLLM gives the
    # engine 5 s and then kills its process tree, and on a loaded 2-core machine the
    # engine core once took longer (the log then ends with its provisional 'end').
    engine.engine_core.shutdown(timeout=SHUTDOWN_S)
    outputs = [
        {
            "id": rid,
            "prompt_token_ids": list(out.prompt_token_ids),
            "samples": [list(c.token_ids) for c in sorted(out.outputs, key=lambda c: c.index)],
            "stop_reasons": [c.stop_reason for c in sorted(out.outputs, key=lambda c: c.index)],
            # vLLM's own capture (enable_return_routed_experts), per sample:
            # [positions, layers, top_k]; on CompletionOutput in 0.26.
            "routed_experts": [
                None if getattr(c, "routed_experts", None) is None else c.routed_experts.tolist()
                for c in sorted(out.outputs, key=lambda c: c.index)
            ],
        }
        for rid, out in sorted(finished.items())
    ]
    result = {"outputs": outputs, "workers": workers}
    if "VLLM_LOG_MOE_METRICS" in os.environ:  # what /metrics would show, after the writer's last step
        from prometheus_client import REGISTRY, generate_latest

        result["metrics"] = generate_latest(REGISTRY).decode()
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
