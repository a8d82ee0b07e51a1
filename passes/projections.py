"""Projection fusion: linears that read one input through adjacent rows of one weight storage become one matmul.

Matches, in a Dynamo graph: two or more `linear(x, W_i, b_i)` calls on the same `x` whose weights are graph inputs
(parameters) that lie back to back in one storage, `[W_1; W_2; ...]` (and their biases likewise, or none has one):
what `hae_fx.packing.pack_projections` makes of a layer's q/k/v and gate/up projections. Each run becomes

    W = as_strided(W_1, (sum rows, in), (in, 1))     # the packed rows, a view: no copy
    y = linear(x, W, b)
    y_1, y_2, ... = split(y, rows, dim=-1)           # each then made contiguous, as its linear's output was

so decode reads the same weight bytes in one GEMM instead of several (fewer kernels, and a wider matrix for the GEMM
library to choose a kernel for than each projection's). Each output column is the same dot product as before, over
the same weights.

Left alone: weights that are tensor subclasses (torchao's quantized weights run their own matmul; a log line says
so), weights or biases that are not graph inputs, and weights that do not tile one storage.

Inductor's `freezing` has a related pattern (`freezing_patterns.addmm_patterns_init`): it concatenates constant
weights of `mm`s that share an input, but only for frozen graphs, and the concatenation is a new constant per graph,
so the weights' bytes would be held twice (and once more per compiled graph, prefill and decode) unless
`freezing_discard_parameters` drops the eager parameters. Its pre-grad `batch_linear_lhs` fusion concatenates the
weights with `torch.cat` on every call. Packing the storage once instead costs no memory and no copy.

The fused graph reads the later weights through the first one's storage, so it is only right while the parameters
stay packed. Dynamo does not guard on that (a parameter replaced by another of the same shape reuses the graph);
`LayoutCheck` is the guard, run on each call.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hae_fx.errors import HAEWeightLayoutError
from hae_fx.packing import rows_follow

log = logging.getLogger("hae_fx")

#: `nn.Linear`'s forward as Dynamo records it (`F.linear` is `torch._C._nn.linear`)
LINEARS = (torch._C._nn.linear,)


def _python_pointers_equal(tensors: list[torch.Tensor], pointers: list[int], positions: list[int]) -> bool:
    return all(tensors[i].data_ptr() == pointers[i] for i in positions)


#: whether `tensors[i].data_ptr() == pointers[i]` at every `i` of `positions`
_pointers_equal = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", _python_pointers_equal)


@dataclass(frozen=True)
class FusedProjections:
    """One matmul that replaced the linears of `weights`, over the rows of `inputs` (graph input positions of the
    weights, then of the biases), back to back in one storage."""

    weights: tuple[str, ...]
    rows: tuple[int, ...]
    inputs: tuple[int, ...]
    bias: bool

    def __str__(self) -> str:
        return f"{len(self.weights)} linears -> one matmul of {sum(self.rows)} rows"


@dataclass(frozen=True)
class _Linear:
    node: fx.Node
    input: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    weight_value: torch.Tensor
    bias_value: torch.Tensor | None


def fuse_projections(gm: fx.GraphModule, example_inputs: list[Any]) -> list[FusedProjections]:
    """Fuse every run of linears on one input whose weights tile one storage (in place); returns what was fused."""
    graph = gm.graph
    inputs = {node: index for index, node in enumerate(n for n in graph.nodes if n.op == "placeholder")}
    by_input: dict[fx.Node, list[_Linear]] = {}
    subclassed = 0
    for node in graph.nodes:
        linear = _read_linear(node, inputs, example_inputs)
        if isinstance(linear, str):
            subclassed += 1
        elif linear is not None:
            by_input.setdefault(linear.input, []).append(linear)
    if subclassed:
        log.info("hae: %d linear(s) with tensor-subclass weights (e.g. torchao-quantized) keep their own matmuls",
                 subclassed)
    fused = []
    order = {node: position for position, node in enumerate(graph.nodes)}
    for linears in by_input.values():
        for run in _runs(linears):
            fused.append(_fuse(graph, run, inputs, order))
    if fused:
        graph.lint()
        gm.recompile()
    return fused


def _read_linear(node: fx.Node, inputs: dict[fx.Node, int], example_inputs: list[Any]) -> _Linear | str | None:
    if node.op != "call_function" or node.target not in LINEARS:
        return None
    arguments = dict(zip(("input", "weight", "bias"), node.args, strict=False)) | dict(node.kwargs)
    x, weight, bias = arguments.get("input"), arguments.get("weight"), arguments.get("bias")
    if weight not in inputs or (bias is not None and bias not in inputs):
        return None
    weight_value = example_inputs[inputs[weight]]
    bias_value = None if bias is None else example_inputs[inputs[bias]]
    if any(type(value) not in (torch.Tensor, torch.nn.Parameter) for value in (weight_value, bias_value)
           if value is not None):
        return "subclass"
    if weight_value.dim() != 2:
        return None
    return _Linear(node, x, weight, bias, weight_value, bias_value)


def _runs(linears: list[_Linear]) -> list[list[_Linear]]:
    """Maximal runs (two or more) of linears whose weights, and biases, lie back to back in one storage."""
    def place(linear: _Linear) -> tuple:
        weight = linear.weight_value
        return weight.untyped_storage().data_ptr(), weight.storage_offset()

    runs: list[list[_Linear]] = []
    for linear in sorted(linears, key=place):
        if runs and _follows(runs[-1], linear):
            runs[-1].append(linear)
        else:
            runs.append([linear])
    return [run for run in runs if len(run) > 1]


def _follows(run: list[_Linear], linear: _Linear) -> bool:
    last, weight = run[-1].weight_value, linear.weight_value
    if weight.dtype != last.dtype or weight.shape[1:] != last.shape[1:]:
        return False
    if (linear.bias is None) != (run[-1].bias is None):
        return False
    if not rows_follow([member.weight_value for member in run] + [linear.weight_value]):
        return False
    return linear.bias is None or rows_follow([member.bias_value for member in run] + [linear.bias_value])


def _fuse(graph: fx.Graph, run: list[_Linear], inputs: dict[fx.Node, int], order: dict[fx.Node, int]
          ) -> FusedProjections:
    rows = [member.weight_value.shape[0] for member in run]
    width = run[0].weight_value.shape[1]
    first = min((member.node for member in run), key=order.__getitem__)
    with graph.inserting_before(first):
        weight = graph.call_function(torch.as_strided, (run[0].weight, (sum(rows), width), (width, 1)))
        bias = None
        if run[0].bias is not None:
            bias = graph.call_function(torch.as_strided, (run[0].bias, (sum(rows),), (1,)))
        output = graph.call_function(LINEARS[0], (run[0].input, weight, bias))
        parts = graph.call_function(torch.split, (output, rows), {"dim": -1})
        for index, member in enumerate(run):
            part = graph.call_function(operator.getitem, (parts, index))
            contiguous = graph.call_method("contiguous", (part,))
            contiguous.meta.update(member.node.meta)
            member.node.replace_all_uses_with(contiguous)
    for node in (weight, output):
        node.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
    for member in run:
        graph.erase_node(member.node)
    members = [member.weight for member in run] + [member.bias for member in run if member.bias is not None]
    return FusedProjections(weights=tuple(member.weight.name for member in run), rows=tuple(rows),
                            inputs=tuple(inputs[node] for node in members), bias=bias is not None)


class LayoutCheck:
    """The guard a graph with fused projections needs: the parameters its fused groups read must be the tensors it
    was compiled with, at the same addresses (packed). `check(args)` compares the data pointers of those inputs in
    one C++ call where torch has it (CUDA builds: the check CUDA graph trees run on their static inputs)."""

    def __init__(self, fused: list[FusedProjections], example_inputs: list[Any]) -> None:
        self.groups = fused
        self.indices = sorted({index for group in fused for index in group.inputs})
        self.pointers = [example_inputs[index].data_ptr() for index in self.indices]
        self.positions = list(range(len(self.indices)))

    def check(self, args: list[Any] | tuple[Any, ...]) -> None:
        """Raise `HAEWeightLayoutError` if a fused group's parameter in `args` is not where it was at compile time."""
        tensors = [args[index] for index in self.indices]
        if not _pointers_equal(tensors, self.pointers, self.positions):
            moved = [index for index, pointer in zip(self.indices, self.pointers, strict=True)
                     if args[index].data_ptr() != pointer]
            group = next(group for group in self.groups if set(group.inputs) & set(moved))
            raise HAEWeightLayoutError(
                f"the compiled graph runs {', '.join(group.weights)} as one matmul over their packed storage, "
                "but a parameter was replaced (or moved) since: call torch._dynamo.reset() and compile again "
                "(with hae_fx.transform: transform a fresh model), or pass fuse_projections=False"
            )
