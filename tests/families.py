"""Tiny random models of the causal-LM families our users bring, built from transformers configs (no
downloads): hidden 32, 2 layers, the tiny tokenizer's vocabulary, and sliding windows *shorter* than
the test prompts, so that a path which ignores a window is caught."""

from __future__ import annotations

import torch
import transformers as tf

WINDOW = 8  # tokens: shorter than every test prompt

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, pad_token_id=0, eos_token_id=0, bos_token_id=None)
FAMILIES = {
    "llama": (tf.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-tied": (tf.LlamaConfig, dict(tie_word_embeddings=True)),
    "qwen2": (tf.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
                                   layer_types=["sliding_attention", "full_attention"])),
    "qwen2-tied": (tf.Qwen2Config, dict(tie_word_embeddings=True)),  # Qwen2.5-1.5B ties its embeddings
    "qwen3": (tf.Qwen3Config, dict(head_dim=8)),
    "mistral": (tf.MistralConfig, dict(sliding_window=WINDOW)),
    "gemma2": (tf.Gemma2Config, dict(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8)),
    "gemma3": (tf.Gemma3TextConfig, dict(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                         layer_types=["sliding_attention", "full_attention"])),
    "phi3": (tf.Phi3Config, dict(sliding_window=WINDOW)),
    "gpt2": (tf.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": (tf.GPTNeoXConfig, dict(use_parallel_residual=True)),
    "opt": (tf.OPTConfig, dict(ffn_dim=64, word_embed_proj_dim=32, enable_bias=True)),
}
ONLY_COMMON = {"gpt2": (), "gpt_neox": tuple(k for k in COMMON if k != "num_key_value_heads"), "opt": ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                                   "pad_token_id", "eos_token_id", "bos_token_id")}


EAGER_ONLY = {"gemma2"}  # transformers has no sdpa path for it
ATTENTION = {family: ("eager",) if family in EAGER_ONLY else ("sdpa", "eager") for family in FAMILIES}


def family_model(family: str, vocab_size: int, seed: int = 0, attn: str | None = None) -> torch.nn.Module:
    """A tiny random model of ``family`` (a key of :data:`FAMILIES`) with larger output weights, so that its
    next-token distributions are peaked and varied like a real LM's."""
    attn = attn or ATTENTION[family][0]
    config_cls, extra = FAMILIES[family]
    keep = ONLY_COMMON.get(family)
    common = COMMON if keep is None else {k: v for k, v in COMMON.items() if k in keep}
    config = config_cls(vocab_size=vocab_size, **common, **extra)
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
        with torch.no_grad():
            head = model.get_output_embeddings()
            if not getattr(config, "tie_word_embeddings", False):
                head.weight.normal_(0.0, 0.15)
            else:
                model.get_input_embeddings().weight.normal_(0.0, 0.15)
    return model.eval()
