# SPDX-License-Identifier: Apache-2.0
"""Which MoE layers the route log can hook: the model's routers (the layers a user
asked for are checked against them by config.select_layers)."""

from typing import Any

import torch

from vllm.model_executor.layers.fused_moe.route_log.config import ENV_PATH, RouteLogError


def moe_routers(model: torch.nn.Module) -> dict[int, Any]:
    """{decoder-layer index: router} for every MoE layer whose router we can hook."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    routers = {}
    for module in model.modules():
        if not isinstance(module, MoERunner):
            continue
        if module.routed_experts.quant_method.is_monolithic:
            raise RouteLogError(
                f"{ENV_PATH}: layer {module.layer_id} uses a monolithic MoE kernel that "
                "routes inside the kernel; the route log needs a modular one"
            )
        if not isinstance(module.router, BaseRouter):
            raise RouteLogError(
                f"{ENV_PATH}: router {type(module.router).__name__} is not supported"
            )
        routers[module.layer_id] = module.router
    return routers
