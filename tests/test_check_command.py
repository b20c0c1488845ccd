"""``python -m lightning_ulysses.check``: verdict, errors and exit status for a supported and a refused model.

The subprocess cases are the command as users run it (few of them: each pays the import of torch,
transformers and Lightning); the config-file cases call :func:`lightning_ulysses.check.main` in
this process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ulysses.check import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, main, resolve, run_parity
from lightning_ulysses.support.configs import build_tiny
from lightning_ulysses.support.parity import RTOL
from tests.distributed import _DIST_ENV

ROOT = Path(__file__).resolve().parents[1]


def _check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "lightning_ulysses.check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_supported_model_type_is_supported_and_exact_when_run():
    done = _check("llama")
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert done.stdout.startswith("supported: LlamaForCausalLM (llama) at sp=2"), done.stdout

    done = _check("llama", "--run", "--sp", "2")
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert done.stdout.startswith("exact: LlamaForCausalLM (llama) at sp=2"), done.stdout
    errors = dict(re.findall(r"(\w+) (\d\.\de[+-]\d+)", done.stdout.split("max relative errors:", 1)[1]))
    # every quantity the parity check compares is reported, each within the tolerance
    assert set(errors) == {"logits", "loss", "grads", "grad_ratio"}, done.stdout
    assert all(float(v) <= RTOL for v in errors.values()), errors


@pytest.mark.timeout(300)
def test_refused_model_type_names_the_reason():
    done = _check("gptj", "--run")  # refused by the analysis: nothing is run
    assert done.returncode == EXIT_REFUSED, done.stdout + done.stderr
    assert done.stdout.startswith("refused: GPTJForCausalLM does not dispatch its attention through transformers' "
                                  "AttentionInterface"), done.stdout
    assert "exact" not in done.stdout


def _llama_config(tmp_path: Path, **overrides) -> Path:
    """A full-width (7B-like) Llama config.json with grouped-query attention (32 query, 8 KV heads); 4
    layers rather than 32, which changes nothing the analysis decides and keeps the meta build quick."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 4, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096, **overrides}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_config_file_and_directory_are_analysed_at_full_size(tmp_path, capsys):
    path = _llama_config(tmp_path)
    assert main([str(path)]) == EXIT_OK
    assert main([str(tmp_path)]) == EXIT_OK  # the directory's config.json
    assert capsys.readouterr().out.count("supported: LlamaForCausalLM (llama) at sp=2") == 2
    # the real head counts decide the split, as the strategies make it: 32 query heads do not divide
    # over 3 ranks, so sp=3 runs as a ring of 3 (pure Ulysses would be refused)
    assert main([str(path), "--sp", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("supported: LlamaForCausalLM (llama) at sp=3 as ulysses 1 x ring 3"), out


def test_run_beyond_the_head_count_compares_under_a_ring(tmp_path, capsys):
    """--run splits the tiny build as the strategies would split it (the largest Ulysses degree its heads
    allow, the rest a ring) and compares it under Ulysses x ring: sp=3 is a ring of 3."""
    path = _llama_config(tmp_path, num_attention_heads=32, num_key_value_heads=8)
    assert main([str(path), "--sp", "3", "--run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("exact: LlamaForCausalLM (llama) at sp=3 as ulysses 1 x ring 3"), out
    errors = dict(re.findall(r"(\w+) (\d\.\de[+-]\d+)", out.split("max relative errors:", 1)[1]))
    assert set(errors) == {"logits", "loss", "grads", "grad_ratio"} and all(float(v) <= RTOL for v in errors.values())


def test_tiny_build_of_a_config_keeps_its_head_layout(tmp_path):
    for heads, kv in ((32, 8), (32, 32), (16, 1)):
        base = json.loads(_llama_config(tmp_path, num_attention_heads=heads, num_key_value_heads=kv).read_text())
        config = build_tiny("llama", "LlamaForCausalLM", base=base).config
        if kv == 1:  # multi-query stays multi-query
            assert config.num_key_value_heads == 1 and config.num_attention_heads > 1
        else:  # multi-head stays multi-head, a GQA group keeps its size
            assert config.num_attention_heads // config.num_key_value_heads == heads // kv
            assert config.num_key_value_heads > 1
        assert config.num_hidden_layers == 2 and config.hidden_size == 64


def test_vision_language_config_runs_with_an_image_batch(tmp_path, capsys):
    """A Qwen2-VL-2B-like config.json (sub-configs without model_type, as checkpoints write them): the
    tiny build keeps a vision tower, and --run compares a text batch and an image batch under SP."""
    config = {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
              "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
              "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645,
              "text_config": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 4,
                              "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}},
              "vision_config": {"depth": 4, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
                                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main([str(tmp_path), "--run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("exact: Qwen2VLForConditionalGeneration (qwen2_vl) at sp=2"), out
    errors = dict(re.findall(r"(\w+) (\d\.\de[+-]\d+)", out.split("max relative errors:", 1)[1]))
    assert set(errors) == {"logits", "loss", "grads", "grad_ratio"} and all(float(v) <= RTOL for v in errors.values())
    verdict = run_parity(resolve(str(tmp_path)), 2)  # what the line summarises: both batches were compared
    assert {k.split("/")[0] for k in verdict.details} == {"text", "images"}, sorted(verdict.details)


def test_unusable_targets_are_errors(tmp_path, capsys):
    assert main(["no_such_model_type"]) == EXIT_ERROR
    assert main([str(tmp_path)]) == EXIT_ERROR  # a directory without config.json
    assert main([str(tmp_path / "missing" / "config.json")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "not in the installed transformers" in err and "without a config.json" in err and "no such file" in err
