"""`hae::refuse`: an `HAEError` found by code Dynamo traces, carried by the graph so it reaches the caller as itself.

Dynamo does not raise an exception that traced code raises: it records it as an observed exception, and with no
handler in the frame, `torch.compile(..., fullgraph=True)` fails with `Unsupported: Observed exception`, the
message buried in its debug context (without `fullgraph`, Dynamo breaks the graph there and reruns the frame
eagerly). That holds under `hae_fx.transform`'s compile and under the caller's own `torch.compile(backend="hae")`
alike, so hae_fx code that Dynamo traces (the cache's writes) refuses through `refuse(error, stand_in)` instead:

- run eagerly, it raises `error`;
- traced, it returns `hae::refuse(stand_in, ...)`, a tensor shaped as `stand_in` that lets the trace finish, and
  the refusal is a node of the graph. The hae backend finds it and compiles the graph into a function that raises
  the error before anything runs (`hae_fx.backend`); any other backend runs the op, whose implementation raises it.
"""

from __future__ import annotations

import torch
from torch import fx

from hae_fx import errors
from hae_fx.errors import HAEError


@torch.library.custom_op("hae::refuse", mutates_args=())
def refuse_op(stand_in: torch.Tensor, error: str, message: str) -> torch.Tensor:
    """Raises the `hae_fx.errors` class named `error` with `message`; never returns."""
    raise rebuilt_error(error, message)


@refuse_op.register_fake
def _(stand_in: torch.Tensor, error: str, message: str) -> torch.Tensor:
    return torch.empty(stand_in.shape, dtype=stand_in.dtype, device=stand_in.device)


def refuse(error: HAEError, stand_in: torch.Tensor) -> torch.Tensor:
    """Raise `error`, or while compiling, return `stand_in` through `hae::refuse` (the graph then raises it)."""
    if not torch.compiler.is_compiling():
        raise error
    return torch.ops.hae.refuse(stand_in, type(error).__name__, str(error))


def rebuilt_error(name: str, message: str) -> HAEError:
    """The `HAEError` a `hae::refuse` node carries."""
    error_class = getattr(errors, name, None)
    if not (isinstance(error_class, type) and issubclass(error_class, HAEError)):
        error_class = HAEError
    return error_class(message)


def graph_refusal(graph: fx.Graph) -> HAEError | None:
    """The error of the first `hae::refuse` node in `graph`, if any."""
    for node in graph.find_nodes(op="call_function", target=torch.ops.hae.refuse.default):
        return rebuilt_error(node.args[1], node.args[2])
    return None
