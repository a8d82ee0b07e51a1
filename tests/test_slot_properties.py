"""Property tests of the slot invariants, for every registered policy, over random configs, batch sizes, left
paddings, image spans and step counts.

They drive the slot metadata the way an `HAECache` does, on the ops' reference implementations (no model, no
compile, so hundreds of cases run in seconds): `hae::prefill_plan_`'s `plan_prefill` on random prompt attention,
then per decode step the policy's `decode_slot`, the new token's placement, and random attention mass added to the
held slots (what the rewritten attention adds to `score`). After the prefill and after every step, per sequence:

- no position is held twice, and every held position is one the sequence has seen;
- the sinks and the recent window are held;
- a policy's recycle bin stays below its size;
- a free slot is fully cleared: no score, no policy state left behind.
"""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hae_fx.errors import HAEConfigError
from hae_fx.modality import TEXT, VISUAL
from hae_fx.ops.prefill_plan import plan_prefill
from hae_fx.policies import available, policy_for, sweep_config
from hae_fx.slots import SlotBuffers

HEADS, HEAD_DIM = 2, 4


@st.composite
def scenarios(draw):
    batch = draw(st.integers(1, 3))
    width = draw(st.integers(1, 14))
    lengths = [draw(st.integers(1, width)) for _ in range(batch)]
    images = []
    for length in lengths:  # one span of image tokens, or none
        start = draw(st.integers(0, length))
        images.append((start, draw(st.integers(start, length))))
    fields = dict(capacity=draw(st.integers(2, 24)), sinks=draw(st.integers(0, 3)), window=draw(st.integers(0, 4)),
                  bin_size=draw(st.integers(1, 4)))
    return dict(lengths=lengths, width=width, images=images, fields=fields, steps=draw(st.integers(0, 24)),
                seed=draw(st.integers(0, 2**16)))


def _prompt(lengths, width, images):
    """Left-padded logical positions (-1 for padding) and modality tags."""
    token_pos = torch.full((len(lengths), width), -1, dtype=torch.int64)
    modality = torch.full((len(lengths), width), TEXT, dtype=torch.int8)
    for row, (length, (start, end)) in enumerate(zip(lengths, images, strict=True)):
        token_pos[row, width - length:] = torch.arange(length)
        modality[row, width - length + start:width - length + end] = VISUAL
    return token_pos, modality


def _check(policy, slots, seen, sinks, window, when):
    state = slots.state()
    held_rows = slots.slot_pos.tolist()
    assert slots.seen.tolist() == seen, when
    binned = policy.binned(state)
    for row, held in enumerate(held_rows):
        for head in held if policy.head_axis else [held]:  # each KV head's own slots, or the one shared set
            positions = [p for p in head if p >= 0]
            assert len(positions) == len(set(positions)), f"{when}: a position held twice: {sorted(positions)}"
            assert all(p < seen[row] for p in positions), f"{when}: a position not seen yet: {sorted(positions)}"
            must = set(range(min(sinks, seen[row]))) | set(range(max(seen[row] - window, 0), seen[row]))
            assert must <= set(positions), f"{when}: sinks/window {sorted(must - set(positions))} missing"
        if policy.bin_size:
            # a decode step frees a full bin; a prefill may hand over a full one (a composed policy's prefill half
            # keeps `capacity` tokens, and the decode half bins those beyond its budget), which the first step frees
            limit = policy.bin_size + (when == "prefill")
            assert int(binned[row].sum()) < limit, f"{when}: the bin holds more than it may"
    free = slots.slot_pos < 0
    assert bool((slots.score[free] == 0).all()), f"{when}: a free slot keeps a score"
    for name, extra in slots.extras.items():
        assert bool((extra[free] == 0).all()), f"{when}: a free slot keeps {name}"


def _run(policy_name, scenario):
    lengths, width, steps = scenario["lengths"], scenario["width"], scenario["steps"]
    fields = dict(scenario["fields"])
    if policy_name == "full":
        fields["capacity"] = max(fields["capacity"], width + steps + 1)
    try:
        config = sweep_config(policy_name, **fields)
    except HAEConfigError:
        assume(False)
    policy = policy_for(config)
    generator = torch.Generator().manual_seed(scenario["seed"])
    batch = len(lengths)
    token_pos, modality = _prompt(lengths, width, scenario["images"])
    slots = SlotBuffers(config, policy, batch, torch.device("cpu"), kv_heads=HEADS)

    visual_tokens = [end - start for start, end in scenario["images"]]
    kept_len = policy.prefill_kept_len(width, lengths, visual_tokens)
    layers = policy.prefill_layers([0, 1])
    queries = [torch.randn(batch, HEADS, width, HEAD_DIM, generator=generator) for _ in layers]
    keys = [torch.randn(batch, HEADS, width, HEAD_DIM, generator=generator) for _ in layers]
    values = [torch.randn(batch, HEADS, width, HEAD_DIM, generator=generator) for _ in layers]
    plan_prefill(queries, keys, values, [HEAD_DIM ** -0.5] * len(layers), [0] * len(layers), [0] * len(layers),
                 [None] * len(layers), token_pos,
                 modality, **slots.plan_arguments(), kept=torch.empty(0, kept_len), config=config.key())
    _check(policy, slots, list(lengths), config.sinks, config.window, "prefill")

    for step in range(1, steps + 1):
        slot = policy.decode_slot(slots.state())
        slots.step_slot.copy_(slot)
        slots.place([slot], TEXT)
        held = (slots.slot_pos >= 0).float()
        mass = torch.rand(slots.score.shape, generator=generator) * held
        slots.score.add_(mass / mass.sum(dim=-1, keepdim=True).clamp_min(1e-9))
        _check(policy, slots, [n + step for n in lengths], config.sinks, config.window + 1, f"decode step {step}")


@pytest.mark.parametrize("policy_name", available())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(scenario=scenarios())
def test_slot_invariants_hold_for_every_policy(policy_name, scenario):
    _run(policy_name, scenario)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 4), size=st.integers(1, 40), levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_index_reductions_keep_the_arg_reductions_tie_rule(rows, size, levels, seed):
    """`first_index`, `argmin_first` and `argmax_first` (the slot choices' min-reductions over indices) equal
    torch's `argmax`/`argmin`, whose ties go to the first index, on values with many ties, masks with no True, and
    ±inf."""
    from hae_fx.policies.base import argmax_first, argmin_first, first_index

    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (rows, size), generator=generator).to(torch.float32)
    values[0] = torch.where(values[0] == 0, torch.inf, values[0])
    mask = values > levels / 2
    assert torch.equal(first_index(mask), mask.to(torch.int8).argmax(dim=-1))
    assert torch.equal(argmin_first(values), values.argmin(dim=-1))
    assert torch.equal(argmax_first(values), values.argmax(dim=-1))
    assert torch.equal(argmax_first(values.long().clamp(max=9)), values.long().clamp(max=9).argmax(dim=-1))
