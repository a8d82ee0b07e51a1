"""Which placeholders of a graph are `HAECache` tensors.

Dynamo hands the backend the real tensors behind each placeholder (`example_inputs`, in placeholder order);
an `HAECache` tags each tensor it allocates with its role, so recognising them needs no naming convention.
"""

from __future__ import annotations

import torch
from torch import fx

from hae_fx.cache import CacheRole, role_of


def cache_roles_from_export(program: torch.export.ExportedProgram) -> dict[fx.Node, CacheRole]:
    """Map each placeholder of an exported program that lifts an `HAECache` tensor (registered on the exported
    module as a buffer) to that tensor's role."""
    lifted = {**program.graph_signature.inputs_to_buffers, **program.graph_signature.inputs_to_lifted_tensor_constants}
    tensors = {**program.state_dict, **program.constants}
    roles: dict[fx.Node, CacheRole] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in lifted:
            role = role_of(tensors.get(lifted[node.name]))
            if role is not None:
                roles[node] = role
    return roles


def cache_roles_from_example_inputs(graph: fx.Graph, example_inputs: list[object]) -> dict[fx.Node, CacheRole]:
    """Map each placeholder whose example input is an `HAECache` tensor to that tensor's role."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    roles: dict[fx.Node, CacheRole] = {}
    for node, value in zip(placeholders, example_inputs, strict=False):
        role = role_of(value) if isinstance(value, torch.Tensor) else None
        if role is not None:
            roles[node] = role
    return roles
