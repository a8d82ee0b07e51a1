"""The `hae-fx` command line, run as users run it (`python -m hae_fx` in a subprocess) on tiny local checkpoints.

Each command and each exit code runs in a subprocess at least once; the other argument checks call `main()` in
this process (the same parser and the same handlers, without a second's worth of imports per case).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from expecttest import assert_expected_inline
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hae_fx import cli, logs
from hae_fx.models.llava import tiny_llava
from hae_fx.viz import FIGURE_PIXELS

WORDS = ["<pad>", "<s>", "</s>", "<unk>", *[f"w{i}" for i in range(60)], *"the cat sat on a mat".split()]


def hae_fx_cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hae_fx", *args], capture_output=True, text=True, timeout=900,
                          check=False, cwd=cwd, env={**os.environ, **env})


@pytest.fixture
def hae_fx_main(capsys):
    """`hae_fx.cli.main(argv)` in this process: returns (exit code, stdout, stderr); the `hae_fx` logger is left as
    it was (the command line attaches its own handler)."""
    saved = (logs.logger.handlers[:], logs.logger.level, logs.logger.propagate)

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(args))
        except SystemExit as exit:
            code = exit.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    logs.logger.handlers[:], logs.logger.level, logs.logger.propagate = saved


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    return save_text_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


def save_text_checkpoint(folder: Path) -> Path:
    """A tiny Llama (4 query, 2 KV heads) and a word-level tokenizer of `WORDS`, saved as a checkpoint folder."""
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
    # progress is on by default: loading and every compile are announced before they start
    announced = [line for line in run.stderr.splitlines() if line.startswith("[hae_fx] ")]
    assert announced[0] == f"[hae_fx] loading {text_model}"
    assert "[hae_fx] hae: compiling the prefill graph (once for every prompt length, compiler eager)..." in announced
    assert "[hae_fx] hae: compiling the decode graph (once, replayed every step, compiler eager)..." in announced


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


def test_missing_checkpoint_exits_2_saying_what_to_do():
    run = hae_fx_cli("inspect", "--model", "/nonexistent")
    assert run.returncode == 2
    assert run.stderr.endswith("hae-fx: error: --model /nonexistent: no config.json there; pass a folder written by "
                               "save_pretrained\n")


@pytest.mark.parametrize(("args", "message"), [
    (["inspect", "--model", "{text_model}", "--budget", "1.5"], "--budget is the share of a full cache to keep, in"),
    (["inspect", "--model", "{text_model}", "--budget", "0"], "--budget is the share of a full cache to keep, in"),
    (["inspect", "--model", "{text_model}", "--policy", "lru"], "unknown policy 'lru'; choose one of full,"),
    (["inspect", "--model", "{text_model}", "--context", "0"], "--context: must be at least 1, got 0"),
    (["generate", "--model", "{text_model}", "--prompt", "a", "--image", "/nonexistent.png"], "no such file"),
    (["generate", "--model", "{text_model}", "--prompt", "a", "--max-new-tokens", "-3"], "must be at least 1"),
    (["generate", "--model", "{llava}", "--prompt", "a"], "no tokenizer there"),
    (["bench", "latency"], "argument benchmark: invalid choice: 'latency'"),
    (["bench", "accuracy", "--budgets", "half"], "hae-fx bench accuracy: error: argument --budgets"),
])
def test_bad_arguments_exit_2_saying_what_to_do(hae_fx_main, text_model, tmp_path, args, message):
    if "{llava}" in args:
        tiny_llava(seed=0, text_layers=1).save_pretrained(tmp_path)  # weights and config, no tokenizer
    code, _, err = hae_fx_main(*(arg.format(text_model=text_model, llava=tmp_path) for arg in args))
    assert code == 2, err
    assert message in err


def test_bad_log_level_exits_2(hae_fx_main, monkeypatch):
    monkeypatch.setenv(logs.LOG_ENV, "LOUD")
    code, _, err = hae_fx_main("inspect", "--model", "/nonexistent")
    assert code == 2
    assert "HAE_FX_LOG: unknown log level 'LOUD'; use one of DEBUG, INFO, WARNING, ERROR" in err


@pytest.mark.parametrize(("flags", "env", "level"), [
    ([], None, "INFO"), (["-q"], None, "WARNING"), (["-v"], None, "DEBUG"), ([], "debug", "DEBUG"),
    ([], "WARNING", "WARNING"), (["--verbose"], "WARNING", "DEBUG"),
])
def test_log_level_from_flags_then_environment(monkeypatch, flags, env, level):
    if env is None:
        monkeypatch.delenv(logs.LOG_ENV, raising=False)
    else:
        monkeypatch.setenv(logs.LOG_ENV, env)
    args = cli.build_parser().parse_args(["demo", *flags])
    assert cli.log_level(args) == logs.parse_level(level)


def test_help_with_examples_in_a_subprocess():
    run = hae_fx_cli("--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: hae-fx [-h] COMMAND ...")
    for command in ("demo", "inspect", "generate", "bench"):
        assert f"\n  hae-fx {command} " in run.stdout


@pytest.mark.parametrize("command", ["demo", "inspect", "generate", "bench"])
def test_every_command_has_help_with_examples(hae_fx_main, command):
    code, out, _ = hae_fx_main(command, "--help")
    assert code == 0
    assert out.startswith(f"usage: hae-fx {command} [-h] [-v] [-q]")
    examples = [line for line in out.split("examples:\n", 1)[1].splitlines() if line]
    assert examples and all(line.startswith(f"  hae-fx {command} ") for line in examples)


def test_unknown_family_exits_1_saying_what_to_do(hae_fx_main, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    code, _, err = hae_fx_main("inspect", "--model", str(tmp_path))
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("hae-fx: HAEUnsupportedModelError: --model ")
    assert "try a newer transformers if the family is recent" in last


def test_family_without_a_generative_class_exits_1(hae_fx_main, tmp_path):
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(tmp_path)
    code, _, err = hae_fx_main("inspect", "--model", str(tmp_path))
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "hae-fx: HAEUnsupportedModelError: 'clip' (CLIPConfig) has no ImageTextToText class in transformers: hae-fx "
        "runs generative decoders (the README's 'Supported models' lists the tested families); pass a causal-LM or "
        "image-text-to-text checkpoint")


def test_refused_model_exits_1_with_the_hae_error(tmp_path):
    """A layout hae_fx refuses (ALiBi) is reported as its HAEError, exit code 1."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64, alibi=True)
    FalconForCausalLM(config).save_pretrained(tmp_path)
    run = hae_fx_cli("inspect", "--model", str(tmp_path))
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]  # importing torchao may warn first
    assert last.startswith("hae-fx: HAE") and "alibi" in last.lower()


def test_demo_marks_wrong_answers_against_one_baseline(tmp_path):
    run = hae_fx_cli("demo", "--compiler", "eager", "--out", str(tmp_path / "pictures"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    answers = [(index, line.split()) for index, line in enumerate(lines) if line.startswith(("   full ", "   hae "))]
    assert [words[0] for _, words in answers] == ["full", "hae"] * 3
    assert all(words[-1] in ("[correct]", "[WRONG]") for _, words in answers)
    assert [words[-1] for _, words in answers if words[0] == "full"] == ["[correct]"] * 3
    # the one baseline, stated once: the full cache the demo ran
    assert [line for line in lines if "KiB" in line] == [
        "KV cache, fixed for any prompt or answer: full 256 slots = 512 KiB (the baseline: the longest prompt plus "
        "the longest answer); hae 140 slots = 280 KiB, 45% less"]
    # a wrong description says what it invented or missed
    for index, words in answers:
        if words[-1] == "[WRONG]" and "column" in words:
            assert lines[index + 1].strip().startswith(("invented: row", "missed: row"))
    assert "[hae_fx] hae: compiling the decode graph" in run.stderr
    assert lines[-1].startswith("speed (eager reference ops, no Inductor): full ")
    pictures = tmp_path / "pictures"
    assert Image.open(pictures / "scene.png").size == (96, 96)
    assert Image.open(pictures / "kept_patches.png").size == FIGURE_PIXELS


def test_bench_speed_runs_the_installed_benchmark_with_its_options(tmp_path):
    run = hae_fx_cli("bench", "speed", "--device", "cpu", "--quick", "--batch", "1", "--configs", "hf_eager",
                     "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "speed_tiny_llava.csv") as handle:
        assert [row["config"] for row in csv.DictReader(handle)] == ["hf_eager"]
    assert "| config | batch |" in run.stdout
    assert "speed: 100%" in run.stderr  # the progress bar over the configurations
    assert (tmp_path / "speed_tiny_llava.png").stat().st_size > 0


def test_bench_accuracy_passes_its_options_on(hae_fx_main, tmp_path):
    code, out, err = hae_fx_main("bench", "accuracy", "--questions", "3", "--budgets", "0.59", "--policies", "hae",
                                 "--batch-size", "3", "--out", str(tmp_path))
    assert code == 0, err[-3000:]
    with open(tmp_path / "accuracy.csv") as handle:
        assert [(row["policy"], row["budget"]) for row in csv.DictReader(handle)] == [("hae", "0.59")]
    assert "| policy | budget |" in out
    assert "accuracy: 100%" in err  # the progress bar over the runs
    assert Image.open(tmp_path / "accuracy.png").size == (1210, 495)  # one panel per task


@pytest.mark.parametrize(("benchmark", "usage"), [("accuracy", "[-h] [--model {synthvlm,gemma-vlm,gemma3-270m}]"),
                                                   ("speed", "[-h] [--model {llava7b}]")])
def test_bench_help_is_the_benchmarks_own(hae_fx_main, benchmark, usage):
    code, out, _ = hae_fx_main("bench", benchmark, "--help")
    assert code == 0
    assert out.startswith(f"usage: hae-fx bench {benchmark} {usage}")


def test_bench_results_default_to_the_current_folder(hae_fx_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = hae_fx_main("bench", "speed", "--device", "cpu", "--quick", "--batch", "1", "--configs",
                               "hf_eager", "--new-tokens", "2")
    assert code == 0, err[-3000:]
    assert (tmp_path / "bench-results" / "speed" / "speed_tiny_llava.csv").is_file()
