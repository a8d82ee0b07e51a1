"""The tensor-parallel cases of tests/test_tensor_parallel.py, and the script each rank runs.

Launched as users launch a sharded model, from the repository root:
`PYTHONPATH=. torchrun --nproc-per-node 2 tests/tensor_parallel_worker.py MODELS OUT` (the test runs
`python -m torch.distributed.run`, on CPU with gloo). Each rank loads the saved tiny models with `tp_plan="auto"`,
runs every case and writes what it saw to `OUT/rank{N}.json`. The test runs the same cases in one process, on the
same checkpoints loaded whole, and compares.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import hae_fx
from hae_fx.errors import HAEError
from hae_fx.policies import sweep_config

NEW_TOKENS = 10
#: a follow-up turn's prompt, appended to the first turn's sequences
FOLLOW_UP = [7, 8, 9, 10, 11]


@dataclass(frozen=True)
class Case:
    """One generate call: the saved model it loads (`model`, a folder under the models root), the config each rank
    transforms it with (`config_for(rank)`), its inputs, and the compiler of its graphs (`hae.compiler`)."""

    model: str
    config_for: Callable[[int], hae_fx.PolicyConfig]
    inputs: Callable[[torch.nn.Module], dict[str, torch.Tensor]]
    compiler: str = "eager"
    follow_up: bool = False  # then a second turn: FOLLOW_UP more tokens on the returned cache


def text_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(5))}


def llava_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from tests.conftest import llava_inputs as batch_inputs

    return batch_inputs(model, 2, seed=3)


def same(config: hae_fx.PolicyConfig) -> Callable[[int], hae_fx.PolicyConfig]:
    return lambda rank: config


def config(name: str, capacity: int, **fields: object) -> hae_fx.PolicyConfig:
    """Policy `name` at `capacity` with 2 sinks, a window of 4 and (where it has one) a recycle bin of capacity / 4."""
    return sweep_config(name, capacity=capacity, sinks=2, window=4, bin_size=capacity // 4, **fields)


def hae(capacity: int) -> hae_fx.PolicyConfig:
    return config("hae", capacity)


def policy(name: str, capacity: int, **fields: object) -> Callable[[int], hae_fx.PolicyConfig]:
    """`config(name, capacity, **fields)` on every rank."""
    return same(config(name, capacity, **fields))


CASES: dict[str, Case] = {
    "llama-full": Case("llama", same(hae_fx.HAEConfig(policy="full", capacity=32)), text_inputs),
    "llama-hae": Case("llama", same(hae(12)), text_inputs),
    "llama-hae-inductor": Case("llama", same(hae(12)), text_inputs, compiler="inductor"),
    "llama-snapkv": Case("llama", policy("snapkv", 12), text_inputs),
    "llama-madakv": Case("llama", policy("madakv", 12), text_inputs),
    "llava-full": Case("llava", same(hae_fx.HAEConfig(policy="full", capacity=64)), llava_inputs),
    "llava-hae": Case("llava", same(hae(16)), llava_inputs),
    # the core's other paths: prompt merging, a slot group (and prefill plan) per layer
    "llava-lookm": Case("llava", policy("lookm", 16), llava_inputs),
    "llama-pyramidkv": Case("llama", policy("pyramidkv", 12), text_inputs),
    # the other policies, 8-bit slots, and a follow-up turn on the returned cache
    "llama-streaming": Case("llama", policy("streaming", 12), text_inputs),
    "llama-h2o": Case("llama", policy("h2o", 12), text_inputs),
    "llama-tova": Case("llama", policy("tova", 12), text_inputs),
    "llama-random": Case("llama", policy("random", 12, seed=3), text_inputs),
    "llama-composed": Case("llama", policy("composed", 12), text_inputs),
    "llava-fastv": Case("llava", policy("fastv", 16, layer=1), llava_inputs),  # layer 1 computes on kept tokens
    "llama-hae-int8": Case("llama", policy("hae", 12, kv_dtype="int8"), text_inputs),
    "llama-hae-follow-up": Case("llama", same(hae(12)), text_inputs, follow_up=True),
    # refusals: one KV head for two ranks; ranks transformed with different configs
    "mqa-hae": Case("mqa", same(hae(12)), text_inputs),
    "llama-mixed": Case("llama", lambda rank: hae(12 + 4 * rank), text_inputs),
}


def load(model_dir: Path, tp: bool) -> torch.nn.Module:
    """The saved model, sharded by HF's plan across the launched ranks when `tp`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=torch.float32, **({"tp_plan": "auto"} if tp else {})).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run_case(models_root: Path, name: str, rank: int, tp: bool) -> dict[str, object]:
    """Generate one case; returns its tokens, every slot group's `slot_pos` and the cache's K/V bytes, or the
    message of the `HAEError` it raised."""
    case = CASES[name]
    torch._dynamo.reset()  # each case compiles its own graphs, as in a fresh process
    model = load(models_root / case.model, tp)
    hae_fx.transform(model, case.config_for(rank), options={"hae.compiler": case.compiler})
    try:
        out = model.generate(**case.inputs(model), max_new_tokens=NEW_TOKENS, do_sample=False,
                             return_dict_in_generate=True)
        if case.follow_up:
            history = torch.cat([out.sequences, torch.tensor([FOLLOW_UP] * out.sequences.shape[0])], dim=1)
            out = model.generate(input_ids=history, past_key_values=out.past_key_values, max_new_tokens=NEW_TOKENS,
                                 do_sample=False, return_dict_in_generate=True)
    except HAEError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    cache = out.past_key_values
    return {"tokens": out.sequences.tolist(),
            "slot_pos": [group.core["slot_pos"].tolist() for group in cache.slots.groups],
            "kv_nbytes": cache.kv_nbytes}


def main(models_root: str, out_dir: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    results = {name: run_case(Path(models_root), name, rank, tp=True) for name in CASES}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
