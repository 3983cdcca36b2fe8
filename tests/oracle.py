"""Independent routing oracle: Hugging Face transformers runs the same weights; we take
each MoE block's input hidden states and gate weight and route ourselves in float64
(softmax, top-k, renormalised when the config says so)."""

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForCausalLM

TIE_GAP = 1e-5  # k-th vs (k+1)-th probability closer than this: either choice is right


@dataclass
class OracleRoute:
    ids: np.ndarray  # [num_positions, top_k], by descending weight
    weights: np.ndarray  # [num_positions, top_k]
    tie: np.ndarray  # [num_positions] bool: the top-k set is not well defined


class RoutingOracle:
    def __init__(self, model_dir, tie_gap: float = TIE_GAP):
        self.tie_gap = tie_gap
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = self.model.config
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.moe_blocks = {
            i: layer.mlp
            for i, layer in enumerate(self.model.model.layers)
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "weight")
        }

    @torch.no_grad()
    def routes(self, token_ids: list[int]) -> dict[int, OracleRoute]:
        """{layer: routes of positions 0..len(token_ids)-1} for one sequence."""
        inputs: dict[int, torch.Tensor] = {}
        hooks = [
            block.register_forward_pre_hook(
                lambda _m, args, layer=layer: inputs.__setitem__(layer, args[0])
            )
            for layer, block in self.moe_blocks.items()
        ]
        try:
            self.model(torch.tensor([token_ids]))
        finally:
            for hook in hooks:
                hook.remove()
        return {layer: self._route(inputs[layer], block.gate.weight) for layer, block in self.moe_blocks.items()}

    def _route(self, hidden: torch.Tensor, gate: torch.Tensor) -> OracleRoute:
        logits = hidden.reshape(-1, gate.shape[1]).double() @ gate.double().T
        probs = torch.softmax(logits, dim=-1).numpy()
        order = np.argsort(-probs, axis=1, kind="stable")
        top = np.take_along_axis(probs, order[:, : self.top_k + 1], axis=1)
        weights = top[:, : self.top_k]
        if self.normalize:
            weights = weights / weights.sum(axis=1, keepdims=True)
        tie = (top[:, self.top_k - 1] - top[:, self.top_k]) < self.tie_gap
        return OracleRoute(order[:, : self.top_k], weights, tie)
