"""Tiny float32 HF causal LMs from random configs, built identically in every process."""

from __future__ import annotations

import torch

VOCAB = 97


def tiny_model(arch: str = "llama", heads: int = 4, kv_heads: int = 4, attn: str = "sdpa", layers: int = 2,
               seed: int = 0, **extra):
    """Return a freshly initialised tiny model; the same ``seed`` gives the same weights everywhere."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[arch]
    kwargs = dict(vocab_size=VOCAB, hidden_size=16 * heads, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  attn_implementation=attn, tie_word_embeddings=False)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).float()


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)
