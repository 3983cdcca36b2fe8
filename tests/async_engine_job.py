"""Runs one AsyncLLM engine (the engine behind `vllm serve`) for a test.

    python tests/async_engine_job.py SPEC.json OUT.json

SPEC: {"model": dir, "engine": {AsyncEngineArgs kwargs}, "requests": [request, ...],
"abort_after": {id: n}}, a request as in engine_job.py. All requests are sent at once;
a request named in "abort_after" is aborted once n tokens have come back. OUT:
{"outputs": [{"id", "prompt_token_ids", "samples", "aborted"}]}, the samples holding
the tokens each request got back.
"""

import asyncio
import json
import sys

from engine_job import SHUTDOWN_S


async def one(engine, req: dict, abort_after: int | None) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(**req["sampling"], output_kind=RequestOutputKind.CUMULATIVE)
    prompt = TokensPrompt(prompt_token_ids=req["prompt_token_ids"])
    samples: dict[int, list[int]] = {}  # the n samples of a request may come in apart
    async for out in engine.generate(prompt, params, request_id=req["id"]):
        samples.update({c.index: list(c.token_ids) for c in out.outputs})
        if abort_after is not None and len(samples[0]) >= abort_after:
            await engine.abort(req["id"])
            break
    return {
        "id": out.request_id,
        "prompt_token_ids": list(out.prompt_token_ids),
        "samples": [samples[i] for i in sorted(samples)],
        "aborted": abort_after is not None,
    }


async def run(spec: dict) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=spec["model"], **spec["engine"]))
    try:
        aborts = spec.get("abort_after", {})
        outputs = await asyncio.gather(
            *(one(engine, req, aborts.get(req["id"])) for req in spec["requests"])
        )
    finally:
        engine.shutdown(timeout=SHUTDOWN_S)  # see engine_job.py
    return {"outputs": sorted(outputs, key=lambda o: o["id"])}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = asyncio.run(run(json.load(f)))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
