"""Tensor parallelism on HF's `tp_plan`: two CPU ranks (gloo) against one process, on the same checkpoints.

The ranks run tests/tensor_parallel_worker.py under `torch.distributed.run` (torchrun), as users launch a sharded
model; each loads the tiny models with `tp_plan="auto"`, so each rank's attention computes half the heads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hae_fx
from hae_fx.cache import HAECache
from hae_fx.errors import HAETensorParallelError
from hae_fx.tensor_parallel import TensorParallel, local_kv_heads
from tests.tensor_parallel_worker import CASES, run_case

REPO = Path(__file__).resolve().parents[1]
RANKS = 2
#: policies with one index set for every head
SHARED_SLOTS = ("llama-hae", "llama-snapkv", "llava-hae", "llava-lookm", "llama-pyramidkv", "llama-streaming",
                "llama-h2o", "llama-tova", "llama-random", "llama-composed", "llava-fastv", "llama-hae-int8",
                "llama-hae-follow-up")


def save_models(root: Path) -> None:
    """The tiny checkpoints the cases load: a Llama with 4 query and 2 KV heads, the same with 1 KV head (which 2
    ranks cannot split), and a LLaVA on a Llama decoder with 2 KV heads. Weights spread wide enough (0.2) that
    attention, and so eviction, has real choices."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hae_fx.models.llava import tiny_llava

    for name, kv_heads in (("llama", 2), ("mqa", 1)):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=kv_heads, vocab_size=128, attn_implementation="sdpa",
                             initializer_range=0.2)
        LlamaForCausalLM(config).save_pretrained(root / name)
    tiny_llava(seed=0, initializer_range=0.2).save_pretrained(root / "llava")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tp_models")
    save_models(root)
    return root


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory) -> list[dict[str, dict]]:
    """What each rank saw in every case (tokens, slot_pos, K/V bytes, or the error's message)."""
    out = tmp_path_factory.mktemp("tp_out")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(REPO / "tests" / "tensor_parallel_worker.py"), str(models), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(RANKS)]


@pytest.fixture(scope="module")
def single(models) -> dict[str, dict]:
    """The same cases in this one process, the checkpoints loaded whole."""
    return {name: run_case(models, name, rank=0, tp=False) for name in CASES
            if name not in ("mqa-hae", "llama-mixed", "llama-hae-inductor")}


@pytest.mark.parametrize("name", ["llama-full", "llava-full"])
def test_full_tokens_equal_single_process_and_memory_halves(ranks, single, name):
    for rank in ranks:
        assert rank[name]["tokens"] == single[name]["tokens"]
        assert rank[name]["kv_nbytes"] * RANKS == single[name]["kv_nbytes"]


@pytest.mark.parametrize("name", SHARED_SLOTS)
def test_ranks_keep_the_single_process_slots(ranks, single, name):
    """Every rank keeps the same slots, the ones one process keeps, and generates its tokens."""
    assert ranks[0][name]["slot_pos"] == ranks[1][name]["slot_pos"]
    for rank in ranks:
        assert rank[name]["slot_pos"] == single[name]["slot_pos"]
        assert rank[name]["tokens"] == single[name]["tokens"]
        assert rank[name]["kv_nbytes"] * RANKS == single[name]["kv_nbytes"]
    held = [position for group in single[name]["slot_pos"] for row in group for position in row]
    assert max(held) >= 20, "decode's tokens (positions 20.., after every prompt) must take slots"


def test_inductor_graphs_keep_the_single_process_slots(ranks, single):
    """The all-reduces compiled by Inductor (the default compiler) into the prefill and decode graphs: each rank
    keeps the slots, and makes the tokens, of one process on the eager-reference path."""
    for rank in ranks:
        assert rank["llama-hae-inductor"]["slot_pos"] == single["llama-hae"]["slot_pos"]
        assert rank["llama-hae-inductor"]["tokens"] == single["llama-hae"]["tokens"]


def test_per_head_policy_keeps_each_heads_slots_on_its_rank(ranks, single):
    """MadaKV decides per KV head: rank r's `[B, Hkv / 2, C]` slots are heads r*Hkv/2.. of the single process's."""
    whole = torch.tensor(single["llama-madakv"]["slot_pos"][0])  # [B, Hkv, C] of the first (only) layer group
    share = whole.shape[1] // RANKS
    for index, rank in enumerate(ranks):
        assert torch.equal(torch.tensor(rank["llama-madakv"]["slot_pos"][0]),
                           whole[:, index * share:(index + 1) * share])
        assert rank["llama-madakv"]["tokens"] == single["llama-madakv"]["tokens"]


def test_degree_that_does_not_divide_kv_heads_is_refused(ranks):
    for rank in ranks:
        assert rank["mqa-hae"]["error"].startswith("HAETensorParallelError")
        assert "1 KV heads" in rank["mqa-hae"]["error"] and "degree of 2" in rank["mqa-hae"]["error"]


def test_ranks_with_different_configs_are_refused(ranks):
    for rank in ranks:
        assert rank["llama-mixed"]["error"].startswith("HAETensorParallelError")
        assert '"capacity": 12' in rank["llama-mixed"]["error"] and '"capacity": 16' in rank["llama-mixed"]["error"]


def test_local_kv_heads():
    tp = TensorParallel(degree=2, rank=1, group_name="0")
    assert local_kv_heads(4, tp, "M") == 2
    assert local_kv_heads(3, None, "M") == 3
    with pytest.raises(HAETensorParallelError, match="3 KV heads"):
        local_kv_heads(3, tp, "M")


def _cache(config: hae_fx.PolicyConfig, tp: TensorParallel | None) -> HAECache:
    return HAECache(config, num_layers=2, batch=1, kv_heads=1, head_dim=16, dtype=torch.float32, device="cpu",
                    tensor_parallel=tp)


def test_value_reading_policy_is_refused_under_tensor_parallelism():
    tp = TensorParallel(degree=2, rank=0, group_name="0")
    with pytest.raises(HAETensorParallelError, match="value vectors"):
        _cache(hae_fx.HAEConfig(policy="ahakv", capacity=48), tp)
    _cache(hae_fx.HAEConfig(policy="ahakv", capacity=48), None)


def test_cache_built_for_another_degree_is_refused():
    """A one-process model given a cache built for two ranks: refused before any work."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    policy = hae_fx.HAEConfig(policy="full", capacity=32)
    hae_fx.transform(model, policy, options={"hae.compiler": "eager"})
    cache = _cache(policy, TensorParallel(degree=2, rank=0, group_name="0"))
    with pytest.raises(HAETensorParallelError, match="degree 2 .* one process"):
        model.generate(torch.tensor([[1, 2, 3]]), past_key_values=cache, max_new_tokens=2, do_sample=False)


def test_cli_generate_under_torchrun_streams_the_one_process_tokens(tmp_path):
    """`torchrun --nproc-per-node 2 -m hae_fx generate ...`: the model is sharded by its plan, one rank streams the
    tokens one process streams (`hae` evicts: 14 slots for 29 tokens) and one summary line, with half the K/V bytes
    per rank."""
    from tests.test_cli import save_text_checkpoint

    model = save_text_checkpoint(tmp_path / "model")
    generate = ["-m", "hae_fx", "generate", "--model", str(model), "--prompt", "the cat sat on a mat " * 2,
                "--max-new-tokens", "16", "--policy", "hae", "--budget", "0.5", "--compiler", "eager", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, *launcher, *generate], env=env, capture_output=True, text=True,
                           timeout=300)
            for launcher in ([], ["-m", "torch.distributed.run", f"--nproc-per-node={RANKS}",
                                  "--master-addr=127.0.0.1", f"--master-port={free_port()}"])]
    assert all(run.returncode == 0 for run in runs), [run.stderr[-3000:] for run in runs]
    (single_tokens, single_summary), (tp_tokens, tp_summary) = [run.stdout.strip().splitlines()[-2:] for run in runs]
    assert tp_tokens == single_tokens and len(single_tokens.split()) > 8
    assert runs[1].stdout.count(" tokens in ") == 1  # one rank prints
    assert "hae KV 7.0 KiB vs full 13.5 KiB" in single_summary
    assert "hae KV 3.5 KiB vs full 6.8 KiB per rank of 2" in tp_summary
