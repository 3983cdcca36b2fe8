"""Records what the model runner hands the route logger, step by step, so that a CPU
test can replay a real GPU run (tests/test_spec_decode_trace.py). Tests only: on
PYTHONPATH with ROUTE_TRACE=file.jsonl, vLLM's import of route_logger wraps its
begin_step, end_forward and end_sample; each call appends one JSON line of host
values (the device tensors are read with a sync, which only this recorder does)."""

import importlib.abc
import importlib.machinery
import json
import os
import sys

MODULE = "vllm.model_executor.layers.fused_moe.route_logger"


def _host(x, n=None):
    values = x.cpu().tolist() if hasattr(x, "cpu") else [int(v) for v in x]
    return values if n is None else values[:n]


def _wrap(module):
    out = open(os.environ["ROUTE_TRACE"], "a", buffering=1)
    begin, forward, sample = module.begin_step, module.end_forward, module.end_sample

    def begin_step(so):
        cached = so.scheduled_cached_reqs
        out.write(json.dumps({"call": "begin_step", "new": [{
            "req_id": r.req_id, "external_req_id": getattr(r, "external_req_id", None),
            "prompt_token_ids": r.prompt_token_ids, "num_computed_tokens": r.num_computed_tokens,
            "block_ids": [list(b) for b in r.block_ids],
            "max_tokens": r.sampling_params.max_tokens, "eos_token_id": r.sampling_params.eos_token_id,
            "stop_token_ids": r.sampling_params.stop_token_ids} for r in so.scheduled_new_reqs],
            "cached": {"req_ids": list(cached.req_ids), "resumed": sorted(cached.resumed_req_ids),
                       "new_block_ids": [None if b is None else [list(g) for g in b] for b in cached.new_block_ids]},
            "finished": sorted(so.finished_req_ids),
            "drafts": {k: len(v) for k, v in so.scheduled_spec_decode_tokens.items()}}) + "\n")
        begin(so)

    def end_forward(req_ids, query_start_loc, num_computed_tokens, input_ids=None):
        n = len(req_ids)
        rows = int(query_start_loc[n])
        out.write(json.dumps({"call": "end_forward", "req_ids": list(req_ids),
                              "query_start_loc": _host(query_start_loc, n + 1),
                              "num_computed_tokens": _host(num_computed_tokens, n),
                              "input_ids": None if input_ids is None else _host(input_ids, rows)}) + "\n")
        forward(req_ids, query_start_loc, num_computed_tokens, input_ids)

    def end_sample(sampled, num_sampled=None):
        out.write(json.dumps({"call": "end_sample", "sampled": _host(sampled),
                              "num_sampled": None if num_sampled is None else _host(num_sampled)}) + "\n")
        sample(sampled, num_sampled)

    module.begin_step, module.end_forward, module.end_sample = begin_step, end_forward, end_sample


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


if os.environ.get("ROUTE_TRACE"):
    sys.meta_path.insert(0, _Finder())
