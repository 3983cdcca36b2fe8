# SPDX-License-Identifier: Apache-2.0
"""The route log's header line: what was logged, by which engine, and what is not."""

import time
from typing import Any

import torch

from vllm.model_executor.layers.fused_moe.route_log.format import SCHEMA_VERSION, WEIGHT_DECIMALS

COVERAGE = (
    "One route record per (request, position, logged layer), for every position fed "
    "to the model. Positions served from the prefix cache skip the forward: their "
    "records carry \"cached\": true and hold the routing that the forward which "
    "computed their KV-cache block produced, kept by block in the writer process; "
    "where that is not known (see block_store) a 'gap' record names the positions. "
    "The last generated token is never fed back, so it has none, unless the front end "
    "cut the response at a stop string while the engine ran on: 'request_end' then has "
    "returned_tokens, the generated tokens the caller got, and positions from prompt_len "
    "+ returned_tokens on are tokens the caller never received. "
    "Speculative decoding: the target model's rows of draft tokens are logged only "
    "where the request kept the draft (accepted by verification, within max_tokens, "
    "before a stop token); 'request_end' counts accepted_draft_positions and "
    "rejected_draft_positions; a draft model's own layers are never logged. "
    "'request_end' closes a request (finished false: still running at shutdown). "
    "Requests no caller sent (vLLM's warm-up) are not logged; 'end' counts them. "
    "An 'end' with final false was written when no request was open and the engine's "
    "processes were then stopped without closing the log: complete up to ended_at."
)


def block_store_settings(vllm_config) -> dict | None:
    """The writer's store of routing by KV block (writer/store.py): its block size,
    or why positions the cache serves cannot be replayed. None without prefix caching."""
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        return {"gap_reason": "a KV connector (kv_transfer_config) may load cached blocks "
                              "that this engine's forward never computed"}
    if not vllm_config.cache_config.enable_prefix_caching:
        return None
    if vllm_config.model_config.get_num_experts() >= 1 << 15:
        return {"gap_reason": "the block store keeps int16 expert ids; this model has more"}
    return {"block_size": vllm_config.cache_config.block_size}


def route_log_meta(vllm_config, routers: dict[int, Any], layers: list[int], parallel: dict,
                   block_store: dict | None) -> dict:
    import vllm

    model = vllm_config.model_config
    router = routers[layers[0]] if layers else None
    return {
        "type": "meta",
        "schema": SCHEMA_VERSION,
        "model_id": model.model,
        # The name the server answers to (--served-model-name; vLLM's default: model_id).
        "served_model_name": _first(model.served_model_name) or model.model,
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "device": _device_name(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "load_format": str(vllm_config.load_config.load_format),
        "seed": model.seed,
        "layers_logged": layers,
        "moe_layers": sorted(routers),
        "num_layers": model.get_total_num_hidden_layers(),
        "num_experts": router.global_num_experts if router else model.get_num_experts(),
        "top_k": router.top_k if router else None,
        "renormalize": getattr(router, "renormalize", None),
        "prefix_caching": bool(vllm_config.cache_config.enable_prefix_caching),
        "enforce_eager": bool(model.enforce_eager),
        "cudagraph_mode": str(vllm_config.compilation_config.cudagraph_mode),
        "model_runner": "v2" if getattr(vllm_config, "use_v2_model_runner", False) else "v1",
        "async_scheduling": bool(vllm_config.scheduler_config.async_scheduling),
        "parallel": parallel,
        "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
        "weight_decimals": WEIGHT_DECIMALS,
        "block_store": _describe(block_store, router.top_k if router else 0),
        "coverage": COVERAGE,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"cpu: {names[0]}" if names else "cpu"
    except OSError:
        return "cpu"


def _describe(block_store: dict | None, top_k: int) -> dict:
    if block_store is None:
        return {"on": False, "why": "prefix caching is off: every position runs the forward"}
    if "gap_reason" in block_store:
        return {"on": False, "why": block_store["gap_reason"] + "; cached positions get 'gap' records"}
    return {"on": True, "block_size": block_store["block_size"],
            "bytes_per_position_and_layer": 6 * top_k,
            "bound": "one entry per KV-cache position the engine has used; freed with the writer"}


def _first(name) -> str | None:
    return name[0] if isinstance(name, list) and name else name
