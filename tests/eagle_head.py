"""A tiny MoE target and an EAGLE head that guesses it well, both with real weights,
for speculative decoding with Model Runner V2 (EAGLE is one of its speculators).

The target's attention and expert outputs are scaled down, so its next token is
mostly a function of the current one, argmax(lm_head . embed(t)); the head's fc
passes the token's embedding through and its decoder layer adds nothing, so it
guesses exactly that function (sharing the target's embedding and lm_head). Where
the target's layers tip the argmax, the guess is rejected: both kinds occur."""

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, Qwen2MoeForCausalLM

from experiments.tiny_moe import TOP2, build_moe

TARGET_SCALE = 0.3  # of the attention and expert outputs: sets how often guesses fail


def build_target(out: Path, scale: float = TARGET_SCALE) -> Path:
    build_moe(TOP2, out)
    model = Qwen2MoeForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                param.mul_(scale)
    model.save_pretrained(out)
    return out


def build_eagle_head(target: Path, out: Path) -> Path:
    """An EagleLlamaForCausalLM checkpoint (one decoder layer) for ``target``'s sizes;
    no embed_tokens or lm_head: vLLM shares the target's."""
    config = TOP2.config()
    hidden, inter, heads, head_dim = config.hidden_size, config.intermediate_size, 2, 64
    torch.manual_seed(7)
    weights = {
        "fc.weight": torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1),
        "layers.0.self_attn.q_proj.weight": torch.randn(heads * head_dim, hidden) * 0.02,
        "layers.0.self_attn.k_proj.weight": torch.randn(heads * head_dim, hidden) * 0.02,
        "layers.0.self_attn.v_proj.weight": torch.randn(heads * head_dim, hidden) * 0.02,
        "layers.0.self_attn.o_proj.weight": torch.zeros(hidden, heads * head_dim),
        "layers.0.mlp.gate_proj.weight": torch.randn(inter, hidden) * 0.02,
        "layers.0.mlp.up_proj.weight": torch.randn(inter, hidden) * 0.02,
        "layers.0.mlp.down_proj.weight": torch.zeros(hidden, inter),
        "layers.0.post_attention_layernorm.weight": torch.ones(hidden),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors")
    LlamaConfig(vocab_size=config.vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
                max_position_embeddings=config.max_position_embeddings, torch_dtype="float32",
                architectures=["LlamaForCausalLM"]).save_pretrained(out)
    return out
