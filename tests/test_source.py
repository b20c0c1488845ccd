"""The model analysis reads classes' source once per file (lightning_ulysses/models/source.py): the
text must be what ``inspect.getsource`` gives."""

from __future__ import annotations

import inspect

import pytest

from lightning_ulysses.models.source import source_of


class _Outer:
    @staticmethod
    def method() -> int:
        return 1

    class Inner:  # a nested class: found by its qualified name
        value = 2


def test_source_of_equals_inspect():
    from transformers.models.gemma3 import modeling_gemma3 as gemma3
    from transformers.models.llama import modeling_llama as llama

    objects = [llama.LlamaAttention, llama.LlamaForCausalLM, llama.LlamaForCausalLM.forward, gemma3.Gemma3Model,
               gemma3.Gemma3ForConditionalGeneration, _Outer, _Outer.Inner, _Outer.method, llama]
    for obj in objects:
        assert source_of(obj) == inspect.getsource(obj), obj


def test_source_of_has_no_source_for_builtins_and_runtime_classes():
    made = type("Made", (), {})
    assert source_of(len) == ""
    with pytest.raises((OSError, TypeError)):
        inspect.getsource(made)
    assert source_of(made) == ""
