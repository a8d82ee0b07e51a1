"""`hae_fx.export_guards`: the guards torch.export defers on the prompt length are proven at every length a
package takes, or refused with the length where one fails."""

from __future__ import annotations

import sympy
import torch

from hae_fx import export_guards

LENGTHS = [{"prompt_len": length, "kept_len": min(length, 16)} for length in range(2, 65)]


class BranchesOnLength(torch.nn.Module):
    """A forward whose branch depends on the prompt length: only lengths with `L % 8 != 3` take the traced one."""

    def forward(self, ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] % 8 == 3:
            return ids * 2 + kept.sum()
        return ids + 1 + kept.sum()


def _export(module: torch.nn.Module) -> tuple[torch.export.ExportedProgram, tuple]:
    args = (torch.randn(2, 12), torch.randn(0, 12))
    shapes = ({1: torch.export.Dim("prompt_len", min=2, max=64)}, {1: torch.export.Dim("kept_len", min=1, max=16)})
    program = torch.export.export(module, args, dynamic_shapes=shapes,
                                  prefer_deferred_runtime_asserts_over_guards=True)
    return program, shapes


def test_a_deferred_guard_that_fails_at_one_length_is_found_with_that_length():
    program, shapes = _export(BranchesOnLength())
    symbols = export_guards.dim_symbols(program, shapes)
    assert sorted(symbols.values()) == ["kept_len", "prompt_len"]
    assertions = export_guards.runtime_assertions(program)
    assert assertions, "torch.export kept the branch's guard as a runtime assertion"
    assertion, values = export_guards.first_violation(assertions, symbols, LENGTHS)
    assert values == {"prompt_len": 3}
    assert str(assertion) == "Ne(Mod(" + next(s.name for s, n in symbols.items() if n == "prompt_len") + ", 8), 3)"


def test_guards_true_at_every_length_pass():
    """torch 2.11's guards on LLaVA's prefill on CUDA (docs/gpu.md): true for every length, which its symbolic
    reasoning could not show."""
    length, kept = sympy.Symbol("s53", integer=True, positive=True), sympy.Symbol("s7", integer=True, positive=True)
    symbols = {length: "prompt_len", kept: "kept_len"}
    assertions = [sympy.Eq(sympy.Min(16 * length, 32 * length), 16 * length),
                  length * sympy.Max(1, length - sympy.Mod(length, 8) + 8) > 1, kept <= length]
    assert export_guards.first_violation(assertions, symbols, LENGTHS) is None
    assert export_guards.first_violation([kept < 16], symbols, LENGTHS) == (kept < 16, {"kept_len": 16})


def test_a_guard_on_a_data_dependent_size_is_left_to_runtime():
    length, unbacked = sympy.Symbol("s53", integer=True), sympy.Symbol("u0", integer=True)
    assert export_guards.first_violation([sympy.Eq(unbacked, 2 * length)], {length: "prompt_len"}, LENGTHS) is None
