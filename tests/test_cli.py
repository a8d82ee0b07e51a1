"""The `hae-fx` command line, run as users run it (`python -m hae_fx` in a subprocess) on tiny local checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expecttest import assert_expected_inline
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hae_fx.models.llava import tiny_llava

WORDS = ["<pad>", "<s>", "</s>", "<unk>", *[f"w{i}" for i in range(60)], *"the cat sat on a mat".split()]


def hae_fx_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hae_fx", *args], capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer, saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS), bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_generate_streams_tokens_then_one_summary_line(text_model):
    run = hae_fx_cli("generate", "--model", str(text_model), "--prompt", "the cat sat on", "--max-new-tokens", "8",
                     "--policy", "streaming", "--budget", "0.7", "--compiler", "eager")
    assert run.returncode == 0, run.stderr
    streamed, summary = run.stdout.strip().splitlines()[-2:]
    assert all(word in WORDS for word in streamed.split())
    assert summary.startswith("8 tokens in ")
    assert "streaming KV 4.0 KiB vs full" in summary


def test_inspect_reads_the_structure_only(tmp_path):
    tiny_llava(seed=0, text_layers=2).save_pretrained(tmp_path)
    run = hae_fx_cli("inspect", "--model", str(tmp_path), "--context", "1024", "--budget", "0.25")
    assert run.returncode == 0, run.stderr
    assert_expected_inline(run.stdout, """\
LlavaForConditionalGeneration (family generic): policy 'hae', capacity 256 slots
  not compiled yet: the attention sites are found when generate() first runs
  layer  kind          slots  decode attention  prefill tokens
      0  global          256  -                 -
      1  global          256  -                 -
KV bytes per sequence at 1024 tokens (float32): full cache 512.0 KiB, hae at budget 0.25 128.0 KiB (75% less)
""")


@pytest.mark.parametrize(("args", "message"), [
    (["inspect", "--model", "/nonexistent"], "no config.json there"),
    (["inspect", "--model", "{text_model}", "--budget", "1.5"], "--budget is the share of a full cache"),
    (["inspect", "--model", "{text_model}", "--policy", "lru"], "unknown policy 'lru'"),
    (["generate", "--model", "{text_model}", "--prompt", "a", "--image", "/nonexistent.png"], "no such file"),
])
def test_bad_arguments_exit_2_saying_what_to_do(text_model, args, message):
    run = hae_fx_cli(*(arg.format(text_model=text_model) for arg in args))
    assert run.returncode == 2
    assert message in run.stderr


def test_refused_model_exits_1_with_the_hae_error(tmp_path):
    """A layout hae_fx refuses (ALiBi) is reported as its HAEError, exit code 1."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64, alibi=True)
    FalconForCausalLM(config).save_pretrained(tmp_path)
    run = hae_fx_cli("inspect", "--model", str(tmp_path))
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]  # importing torchao may warn first
    assert last.startswith("hae-fx: HAE") and "alibi" in last.lower()


def test_demo_answers_with_both_caches(tmp_path):
    run = subprocess.run([sys.executable, "-m", "hae_fx", "demo", "--compiler", "eager"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr
    answers = [line.split()[0:2] for line in run.stdout.splitlines() if line.strip().startswith(("full [", "hae  ["))]
    assert len(answers) == 6
    assert all(verdict in ("[correct]", "[WRONG]") for _, verdict in answers)
    assert "less than full's" in run.stdout
    assert (tmp_path / "scene.png").stat().st_size > 0 and (tmp_path / "kept_patches.png").stat().st_size > 0
