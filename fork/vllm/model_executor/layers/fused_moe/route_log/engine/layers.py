# SPDX-License-Identifier: Apache-2.0
"""Which MoE layers the route log hooks: the model's routers, and the layers a user
asked for checked against them (per pipeline stage)."""

from typing import Any

import torch

from vllm.model_executor.layers.fused_moe.route_log.config import ENV_LAYERS, ENV_PATH, LAYERS_HELP, RouteLogError


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


def select_layers(
    wanted: tuple[int, ...] | None, moe_layers: list[int], stage: range | None = None
) -> list[int]:
    """The wanted layers, checked against ``moe_layers``. With pipeline parallelism
    ``stage`` is this stage's decoder layers and ``moe_layers`` its MoE layers; the
    wanted layers of other stages are theirs to log."""
    if not moe_layers and stage is None:
        raise RouteLogError(f"{ENV_PATH} is set but the model has no MoE layers")
    if wanted is None:
        return moe_layers
    here = [layer for layer in wanted if stage is None or layer in stage]
    missing = [layer for layer in here if layer not in moe_layers]
    if missing:
        of_stage = "" if stage is None else f" of pipeline stage {stage.start}-{stage.stop - 1}"
        raise RouteLogError(
            f"{ENV_LAYERS}: layer(s) {missing} are not MoE layers; valid MoE layers"
            f"{of_stage}: {_ranges(moe_layers)}; accepted: {LAYERS_HELP}"
        )
    return here


def _ranges(values: list[int]) -> str:
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
