"""The hae ops: reference semantics, fake-tensor strides (opcheck), and fusion through their decompositions."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import hae_fx  # noqa: F401  (registers the ops)
from hae_fx.ops.slot_attention import attend_slots


def _cache(batch=2, kv_heads=2, capacity=8, head_dim=16):
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim)
    v_cache = torch.randn(batch, kv_heads, capacity, head_dim)
    slot_pos = torch.tensor([[0, 1, 2, -1, 4, 5, -1, 7], [3, -1, -1, 0, 1, 2, 6, 5]])[:batch, :capacity]
    return k_cache, v_cache, slot_pos


def _permuted(shape):
    """A tensor of `shape` laid out as [B, T, H, D] (what a projection + transpose produces)."""
    b, h, t, d = shape
    return torch.randn(b, t, h, d).transpose(1, 2)


def test_slot_write_puts_each_token_in_its_slot():
    k_cache, v_cache, _ = _cache()
    k = torch.randn(2, 2, 3, 16)
    v = torch.randn(2, 2, 3, 16)
    slot = torch.tensor([[5, 0, 7], [1, 2, 6]])
    torch.ops.hae.slot_write_(k_cache, v_cache, k, v, slot, None, None)
    for b in range(2):
        for t in range(3):
            assert torch.equal(k_cache[b, :, slot[b, t]], k[b, :, t])
            assert torch.equal(v_cache[b, :, slot[b, t]], v[b, :, t])


def test_slot_attention_equals_masked_sdpa_with_grouped_heads():
    k_cache, v_cache, slot_pos = _cache()
    q = torch.randn(2, 4, 1, 16)
    out, slot_weight = torch.ops.hae.slot_attention(q, k_cache, v_cache, slot_pos, 0.25)
    mask = (slot_pos >= 0)[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k_cache.repeat_interleave(2, dim=1), v_cache.repeat_interleave(2, dim=1), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    probs = torch.softmax((q @ k_cache.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~mask, -1e30), -1)
    torch.testing.assert_close(slot_weight, probs.mean(1).sum(1))
    assert torch.all(slot_weight[slot_pos < 0] == 0)
    torch.testing.assert_close(slot_weight.sum(-1), torch.ones(2))


def test_per_head_slots_mask_each_kv_head_by_its_own_positions():
    """`slot_pos [B, Hkv, C]` (a policy with a head axis): each KV head's query heads attend over that head's valid
    slots only, and the weights are per KV head (mean over its query heads)."""
    k_cache, v_cache, _ = _cache()
    slot_pos = torch.tensor([[[0, 1, 2, -1, 4, 5, -1, 7], [-1, 3, 2, 1, -1, -1, 0, 6]],
                             [[3, -1, -1, 0, 1, 2, 6, 5], [0, 1, 2, 3, 4, 5, 6, -1]]])
    q = torch.randn(2, 4, 1, 16)  # a decode step
    out, slot_weight = torch.ops.hae.slot_attention(q, k_cache, v_cache, slot_pos, 0.25)
    mask = (slot_pos >= 0).repeat_interleave(2, dim=1)[:, :, None, :]  # query head h reads KV head h // 2
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k_cache.repeat_interleave(2, dim=1), v_cache.repeat_interleave(2, dim=1), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    probs = torch.softmax((q @ k_cache.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~mask, -1e30), -1)
    torch.testing.assert_close(slot_weight, probs.unflatten(1, (2, 2)).mean(2).sum(2))
    assert slot_weight.shape == slot_pos.shape and torch.all(slot_weight[slot_pos < 0] == 0)
    torch.library.opcheck(torch.ops.hae.slot_attention.default, (q, k_cache, v_cache, slot_pos, 0.25))


def test_per_head_writes_put_each_heads_token_in_its_slot():
    k_cache, v_cache, _ = _cache()
    k, v = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16)
    slot = torch.tensor([[[5, 0, 7], [1, 2, 6]], [[3, 4, 1], [7, 6, 5]]])  # [B, Hkv, T]
    torch.ops.hae.slot_write_(k_cache, v_cache, k, v, slot, None, None)
    for b, h, t in ((b, h, t) for b in range(2) for h in range(2) for t in range(3)):
        assert torch.equal(k_cache[b, h, slot[b, h, t]], k[b, h, t])
        assert torch.equal(v_cache[b, h, slot[b, h, t]], v[b, h, t])
    keep = torch.tensor([[[2, 0, 1], [1, 2, 0]], [[0, 1, 2], [2, 1, 0]]])  # prompt index per head and slot
    torch.ops.hae.prefill_write_(k_cache, v_cache, k, v, keep, torch.empty(0, 2), None, None)
    for b, h, i in ((b, h, i) for b in range(2) for h in range(2) for i in range(2)):
        assert torch.equal(k_cache[b, h, i], k[b, h, keep[b, h, i]])
        assert torch.equal(v_cache[b, h, i], v[b, h, keep[b, h, i]])


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck_slot_attention(layout):
    k_cache, v_cache, slot_pos = _cache()
    make = torch.randn if layout == "contiguous" else _permuted
    q = make((2, 4, 3, 16))
    torch.library.opcheck(torch.ops.hae.slot_attention.default, (q, k_cache, v_cache, slot_pos, 0.25))


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck_slot_write(layout):
    k_cache, v_cache, _ = _cache()
    make = torch.randn if layout == "contiguous" else _permuted
    k, v = make((2, 2, 3, 16)), make((2, 2, 3, 16))
    slot = torch.tensor([[5, 0, 7], [1, 2, 6]])
    torch.library.opcheck(torch.ops.hae.slot_write_.default, (k_cache, v_cache, k, v, slot, None, None))


def test_inductor_decomposes_both_ops_into_generated_code():
    """No opaque call to a hae op survives in Inductor's output: the decompositions were used and fused."""
    k_cache, v_cache, slot_pos = _cache()

    def step(q, k, v, slot):
        torch.ops.hae.slot_write_(k_cache, v_cache, k, v, slot, None, None)
        return torch.ops.hae.slot_attention(q, k_cache, v_cache, slot_pos, 0.25)[0]

    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    slot = torch.tensor([[3], [1]])
    expected_cache = k_cache.clone()
    expected_cache[0, :, 3], expected_cache[1, :, 1] = k[0, :, 0], k[1, :, 0]
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    out, (code, *_) = run_and_get_code(compiled, q, k, v, slot)
    assert "torch.ops.hae" not in code
    torch.testing.assert_close(k_cache, expected_cache)
    expected_out, _ = attend_slots(q, k_cache, v_cache, slot_pos, 0.25)
    torch.testing.assert_close(out, expected_out)


@pytest.mark.parametrize("window, chunk", [(0, 0), (3, 0), (0, 4)])
def test_plan_attention_applies_the_layers_window_or_chunk(window, chunk):
    """The prefill plan reads the attention its layer computes: per query, a softmax over the keys that layer lets
    it see (left padding excluded, positions counted over real tokens)."""
    from hae_fx.ops.prefill_plan import mean_attention

    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 9, 8, generator=generator), torch.randn(1, 2, 9, 8, generator=generator)
    token_pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5, 6]])
    got = mean_attention(query, key, token_pos, 0.5, window, chunk)
    for i in range(2, 9):
        q_pos = i - 2
        seen = [j for j in range(2, 9) if j - 2 <= q_pos and (not window or q_pos - (j - 2) < window)
                and (not chunk or q_pos // chunk == (j - 2) // chunk)]
        logits = torch.einsum("hd,hkd->hk", query[0, :, i], key[0].repeat_interleave(2, 0)[:, seen]) * 0.5
        expected = torch.zeros(9)
        expected[seen] = logits.softmax(-1).mean(0)
        torch.testing.assert_close(got[0, i], expected)


def test_mutated_arguments_have_no_default():
    """torch 2.11's in-place-version kernel of a custom op indexes its mutated arguments by position after the
    dispatcher dropped defaulted trailing ones: a mutated argument with a default raised IndexError in every
    compiled prefill on that version. Every hae op that writes in place takes its mutated arguments explicitly."""
    ops = [getattr(torch.ops.hae, name) for name in dir(torch.ops.hae) if not name.startswith("_")]
    mutating = [op.default for op in ops if hasattr(op, "default") and op.default._schema.is_mutable]
    assert len(mutating) >= 4
    for op in mutating:
        for argument in op._schema.arguments:
            if argument.alias_info is not None and argument.alias_info.is_write:
                assert not argument.has_default_value(), f"{op}: mutated argument {argument.name} has a default"
