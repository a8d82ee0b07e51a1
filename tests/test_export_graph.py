"""The passes apply unchanged to a `torch.export` graph (aten-level SDPA, cache tensors lifted as buffers)."""

import torch
import torch.nn.functional as F

from hae_fx.cache import CacheRole
from hae_fx.ops.slot_attention import attend_slots
from hae_fx.passes import cache_roles_from_export, rewrite_attention


class DecodeStep(torch.nn.Module):
    """One GQA decode step over role-tagged slot buffers, attention written with HF's repeat_kv + SDPA."""

    def __init__(self):
        super().__init__()
        buffers = {"keys": torch.randn(1, 2, 8, 16), "values": torch.randn(1, 2, 8, 16),
                   "slot_pos": torch.tensor([[0, 1, 2, 3, 4, -1, -1, -1]]), "score": torch.zeros(1, 8)}
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
            tensor._hae_role = CacheRole(name, 0 if name in ("keys", "values") else None)

    def forward(self, q, k, v, slot):
        torch.ops.hae.slot_write_(self.keys, self.values, k, v, slot, None, None)
        self.slot_pos.index_put_((torch.tensor([0]), slot[:, 0]), torch.tensor(5))
        keys = self.keys[:, :, None].expand(1, 2, 2, 8, 16).reshape(1, 4, 8, 16)
        values = self.values[:, :, None].expand(1, 2, 2, 8, 16).reshape(1, 4, 8, 16)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=torch.ones(1, 1, 1, 8, dtype=torch.bool))


def test_rewrite_applies_to_an_exported_program():
    module = DecodeStep()
    args = (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.tensor([[5]]))
    program = torch.export.export(module, args)
    roles = cache_roles_from_export(program)
    assert sorted(role.kind for role in roles.values()) == ["keys", "score", "slot_pos", "values"]

    report = rewrite_attention(program.graph_module, roles)
    assert report.layers == (0,) and report.forms == ("sdpa",)
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert torch.ops.hae.slot_attention.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets

    out = program.module()(*args)
    fresh = DecodeStep()
    fresh.load_state_dict(module.state_dict())
    fresh.keys[0, :, 5], fresh.values[0, :, 5] = args[1][0, :, 0], args[2][0, :, 0]
    slot_pos = torch.tensor([[0, 1, 2, 3, 4, 5, -1, -1]])
    expected, weight = attend_slots(args[0], fresh.keys, fresh.values, slot_pos, 16**-0.5)
    torch.testing.assert_close(out, expected)
