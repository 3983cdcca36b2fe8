"""Tiny Qwen2-MoE checkpoints with seeded random weights, built with transformers
(the --demo model and the test models)."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM


@dataclass(frozen=True)
class TinyMoE:
    """A shape to build; head_dim 64 because vLLM's CPU attention has no head_dim 16."""

    name: str
    top_k: int
    num_experts: int
    norm_topk_prob: bool
    num_layers: int = 4
    mlp_only_layers: tuple[int, ...] = ()
    vocab_size: int = 1024
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def config(self) -> Qwen2MoeConfig:
        return Qwen2MoeConfig(
            vocab_size=self.vocab_size,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_hidden_layers=self.num_layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            norm_topk_prob=self.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(self.mlp_only_layers),
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            torch_dtype="float32",
            **self.extra,
        )


TOP2 = TinyMoE("top2", top_k=2, num_experts=8, norm_topk_prob=False)
# --demo: Qwen1.5-MoE's tokenizer (vocabulary) and routing style (top-4, no renormalising).
DEMO = TinyMoE("demo", top_k=4, num_experts=16, norm_topk_prob=False, vocab_size=151936, seed=2)
TOP4_NORM = TinyMoE("top4-norm", top_k=4, num_experts=16, norm_topk_prob=True, mlp_only_layers=(1,), seed=1)


def build_moe(spec: TinyMoE, out: Path, tokenizer_dir: Path | None = None) -> Path:
    """Saves the model (fp32) to ``out``; the gates get spread-out weights so that
    top-k choices are rarely near-ties (transformers initialises them to zero)."""
    torch.manual_seed(spec.seed)
    model = Qwen2MoeForCausalLM(spec.config()).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.weight.normal_(std=0.1)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def build_dense(out: Path) -> Path:
    """A Qwen2 model without experts, for the 'model has no MoE layers' error."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, torch_dtype="float32",
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out
