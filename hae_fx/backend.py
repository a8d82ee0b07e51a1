"""The `hae` torch.compile backend: rewrite attention over `HAECache` slots, then hand the graph to Inductor.

Registered through the `torch_dynamo_backends` entry point, so `torch.compile(model, backend="hae")` works
after a plain `import torch`. This module must not register the name itself (the entry point does; a second
registration fails with "duplicate name").

Options (besides Inductor's own config keys):
    `"hae.compiler"`: `"inductor"` (default) or `"eager"`, which runs the rewritten graph with the ops'
    reference implementations: the eager-reference path that tests compare Inductor's output against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from hae_fx import ops  # noqa: F401  (registers the ops and their decompositions before any compile)
from hae_fx.passes import cache_roles_from_example_inputs, rewrite_attention

log = logging.getLogger("hae_fx")

COMPILER_OPTION = "hae.compiler"
COMPILERS = ("inductor", "eager")


def hae_backend(gm: fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """Compile `gm`: rewrite its attention over HAECache slots into hae ops, then run Inductor.

    Args:
        gm: the Dynamo graph.
        example_inputs: its inputs (real tensors; cache tensors are recognised by identity tags).
        mode: torch.compile mode, mapped to Inductor options here since custom backends receive it raw.
        options: Inductor config patches, plus `"hae.compiler"` (see the module docstring).
    """
    inductor_options = dict(options or {})
    compiler = inductor_options.pop(COMPILER_OPTION, "inductor")
    if compiler not in COMPILERS:
        raise ValueError(f"options[{COMPILER_OPTION!r}] must be one of {COMPILERS}, got {compiler!r}")

    roles = cache_roles_from_example_inputs(gm.graph, example_inputs)
    if roles:
        report = rewrite_attention(gm, roles)
        log.debug("hae: %s", report)
    else:
        log.info("hae: this graph reads no HAECache, compiling it unchanged; use "
                 "hae_fx.transform(model, hae_fx.HAEConfig(...)) to generate with an evicting cache")

    if compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode and mode != "default" else {}
    patches.update(inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches)

