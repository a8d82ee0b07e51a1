"""Shape assertions of an exported program, proven for every prompt length a package takes.

`torch.export` with a dynamic dimension must show that every guard the model's code adds on that dimension holds
in the whole declared range. Where its symbolic reasoning cannot, it refuses, even when the guard is true for every
length: torch 2.11 on CUDA cannot simplify `Eq(Min(16*L, 32*L), 16*L)` or `L*Max(1, L - L % 8 + 8) > 1` (a fake
kernel's contiguity checks of an attention mask padded to a multiple of 8), which torch 2.13 proves. So `hae_fx.export`
asks torch.export to defer such guards to runtime assertions in the graph
(`prefer_deferred_runtime_asserts_over_guards`), and then proves or refuses each here, by evaluating it at every
value the runner can pass: a package takes a known, finite set of prompt lengths. An assertion that fails at one of
them is a real specialisation (a branch on the length, say) and the export is refused, naming it and the length.
Assertions on data-dependent sizes (unbacked symbols, such as a mask's count of image tokens) stay runtime checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import sympy
import torch


def dim_symbols(program: torch.export.ExportedProgram, dynamic_shapes: tuple) -> dict[sympy.Symbol, str]:
    """The name of the `torch.export.Dim` (of `dynamic_shapes`, as passed to torch.export: a `{dim index: Dim}`
    dict or None per input tensor) behind each symbol of the exported graph's input sizes."""
    specs = torch.utils._pytree.tree_leaves(dynamic_shapes, is_leaf=lambda spec: spec is None or isinstance(spec, dict))
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    user = [node for node, spec in zip(placeholders, program.graph_signature.input_specs, strict=True)
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    symbols: dict[sympy.Symbol, str] = {}
    for node, spec in zip(user, specs, strict=True):
        for index, dim in (spec or {}).items():
            size = node.meta["val"].shape[index]
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                symbols[size.node.expr] = dim.__name__
    return symbols


def runtime_assertions(program: torch.export.ExportedProgram) -> list[sympy.Basic]:
    """The conditions of the graph's `_assert_scalar` nodes, the guards torch.export deferred."""
    found = []
    for node in program.graph.nodes:
        if node.target is torch.ops.aten._assert_scalar.default:
            condition = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else node.args[0]
            if isinstance(condition, torch.SymBool):
                found.append(condition.node.expr)
    return found


def first_violation(assertions: Iterable[sympy.Basic], symbols: Mapping[sympy.Symbol, str],
                    admissible: Iterable[Mapping[str, int]]) -> tuple[sympy.Basic, dict[str, int]] | None:
    """`(assertion, values)` for the first assertion false at an admissible assignment of the dims `symbols` names
    (`dim_symbols`), or None when each holds at every one. An assertion over other symbols too (data-dependent
    sizes) is left to runtime."""
    checked = [assertion for assertion in assertions
               if assertion.free_symbols and assertion.free_symbols <= set(symbols)]
    for values in admissible:
        substitution: dict[Any, int] = {symbol: values[name] for symbol, name in symbols.items()}
        for assertion in checked:
            # one that does not reduce to true or false at these values stays a runtime check
            if assertion.xreplace(substitution) is sympy.false:
                return assertion, {symbols[symbol]: substitution[symbol] for symbol in assertion.free_symbols}
    return None
