"""Import the heavy, lazily-loaded modules once in the parent so fork-started workers inherit them
(otherwise every worker re-imports transformers' model files, several seconds each on 2 cores)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch  # noqa: E402,F401
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402,F401
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers import masking_utils, modeling_utils  # noqa: E402,F401
from transformers.integrations import sdpa_attention  # noqa: E402,F401

# Touch the lazily-built pieces the first model construction triggers.
LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2))
torch.set_num_threads(max(1, torch.get_num_threads()))
