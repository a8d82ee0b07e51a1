"""Independent eager oracle of the `hae` policy, written from `docs/hae.md` (DAP at prefill, DDES at decode).

It shares no code with hae_fx. Plain Python sets, dicts and lists decide which logical positions the sequence
keeps, which of them wait in the recycle bin, and what every token scores. HF's own eager model with a
`DynamicCache` computes the logits and the attention probabilities: the cache holds every position (keys after
RoPE at their true positions), and an explicit 4-D additive mask lets each new token attend only to the kept
ones, which is exactly what an evicting cache must compute.

- Prefill runs the prompt once. A forward hook on layer `dap_layer`'s attention reads its probabilities and
  takes the DAP decision right there; with `prune_hidden`, forward pre-hooks on the later decoder layers swap
  their mask for one over the kept tokens, so those layers compute as if the evicted tokens were gone.
- Decode runs one token at a time: DDES maintenance (decay, restore, visual-first eviction into the bin,
  batch freeing), then placement of the new token, then the forward pass, whose attention feeds the scores.

Ties (equal scores) are broken by position, lowest first, wherever the specification ranks tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class HAEOracleRun:
    """What one greedy generation under the `hae` policy produced.

    `kept[s]` / `binned[s]` are the sorted positions held in the cache (active and bin) / in the bin, after
    prefill for `s = 0` and, for `s >= 1`, after decode step `s`'s maintenance and the placement of its token
    (the set that token attends over). `prefill_scores` maps each position kept at prefill to its DAP score
    `S0`; `dap_evicted` lists the positions the dual test and the `max_visual_keep` cap evicted, before the
    capacity rule.
    """

    tokens: list[int]
    kept: list[list[int]]
    binned: list[list[int]]
    logits: torch.Tensor
    prefill_scores: dict[int, float]
    dap_evicted: list[int]


@dataclass
class DAPPlan:
    """The prefill decision: `active` and `binned` positions (disjoint), `scores` (S0 of every prompt token)."""

    active: set[int]
    binned: set[int]
    scores: dict[int, float]
    dap_evicted: list[int]

    @property
    def kept(self) -> list[int]:
        return sorted(self.active | self.binned)


# --------------------------------------------------------------------------------------------------- DAP


def prefill_protected(prompt_len: int, sinks: int, window: int) -> set[int]:
    """Positions DAP never evicts: the first `sinks` and the last `max(window, 1)` prompt positions."""
    return {j for j in range(prompt_len) if j < sinks or j >= prompt_len - max(window, 1)}


def observation_queries(visual: list[bool], observation_window: int) -> list[int]:
    """`Q`: the text tokens after the last visual token; when there is no visual token, the last
    `observation_window` prompt tokens (every prompt token for 0)."""
    visual_positions = [j for j, is_visual in enumerate(visual) if is_visual]
    if not visual_positions:
        first = max(0, len(visual) - observation_window) if observation_window else 0
        return list(range(first, len(visual)))
    return list(range(visual_positions[-1] + 1, len(visual)))


def dap_plan(mean_attention: torch.Tensor, visual: list[bool], *, capacity: int, bin_size: int, sinks: int,
             window: int, r: float, alpha: float, max_visual_keep: int | None, observation_window: int,
             pool_kernel: int) -> DAPPlan:
    """DAP steps 1-5 of docs/hae.md on one sequence.

    `mean_attention` is `Ā` of layer `dap_layer`, `[T, T]` (query, key), already averaged over query heads.
    """
    prompt_len = len(visual)
    assert mean_attention.shape == (prompt_len, prompt_len)
    queries = observation_queries(visual, observation_window)
    rows = mean_attention[queries]  # [|Q|, T]
    s0 = rows.sum(dim=0).tolist() if queries else [0.0] * prompt_len
    peak = rows.max(dim=0).values.tolist() if queries else [0.0] * prompt_len
    protected = prefill_protected(prompt_len, sinks, window)
    visual_positions = [j for j in range(prompt_len) if visual[j]]

    evicted: set[int] = set()
    if visual_positions and queries:  # the dual test
        visual_total = sum(s0[v] for v in visual_positions)
        for j in visual_positions:
            share = s0[j] / visual_total if visual_total > 0 else 0.0
            if j not in protected and share < r and peak[j] < alpha:
                evicted.add(j)
    if max_visual_keep is not None:  # the cap on unprotected visual survivors
        survivors = [j for j in visual_positions if j not in protected and j not in evicted]
        ranked = sorted(survivors, key=lambda j: (-s0[j], j))
        evicted.update(ranked[max_visual_keep:])

    # The capacity rule: protected first, then text, then visual, S0 highest first within each; keep capacity - 1.
    # Without visual tokens a token ranks by the best S0 within pool_kernel // 2 positions of it.
    reach = pool_kernel // 2 if not visual_positions else 0
    rank_score = [max(s0[max(0, j - reach): j + reach + 1]) for j in range(prompt_len)]
    survivors = [j for j in range(prompt_len) if j not in evicted]
    ranked = sorted(survivors, key=lambda j: (j not in protected, visual[j], -rank_score[j], j))
    kept = ranked[:capacity - 1]
    budget = capacity - bin_size
    return DAPPlan(active=set(kept[:budget]), binned=set(kept[budget:]), scores=dict(enumerate(s0)),
                   dap_evicted=sorted(evicted))


# -------------------------------------------------------------------------------------------------- DDES


@dataclass
class DDESState:
    """The per-sequence decode state: scores, which positions are active or binned, which are visual."""

    budget: int
    bin_size: int
    sinks: int
    window: int
    visual_first: float
    decay: float
    scores: dict[int, float]
    active: set[int]
    binned: set[int]
    visual: set[int] = field(default_factory=set)

    @property
    def kept(self) -> list[int]:
        return sorted(self.active | self.binned)

    def protected(self, position: int, seen: int) -> bool:
        return position < self.sinks or position >= seen - self.window

    def candidates(self, seen: int) -> list[int]:
        return [j for j in self.active if not self.protected(j, seen)]

    def victim(self, candidates: list[int]) -> int:
        """HTV: the lowest visual candidate while visual candidates score below `visual_first` x the text mean,
        otherwise the lowest candidate."""
        visual = [j for j in candidates if j in self.visual]
        text = [j for j in candidates if j not in self.visual]
        if visual:
            text_mean = sum(self.scores[j] for j in text) / len(text) if text else 0.0
            if not text or min(self.scores[j] for j in visual) < self.visual_first * text_mean:
                return self.lowest(visual)
        return self.lowest(candidates)

    def lowest(self, pool: list[int]) -> int:
        return min(pool, key=lambda j: (self.scores[j], j))

    def maintain(self, seen: int) -> None:
        """DDES steps 1-5, before the token at position `seen` is placed."""
        if self.decay > 0:
            for j in self.scores:
                self.scores[j] *= 1.0 - self.decay
        candidates = self.candidates(seen)
        if self.binned and candidates:
            best = max(self.binned, key=lambda j: (self.scores[j], -j))
            if self.scores[best] > min(self.scores[j] for j in candidates):
                self.binned.remove(best)
                self.active.add(best)
        evictions = 0
        while len(self.active) > self.budget:
            candidates = self.candidates(seen)
            assert candidates, "more than B active tokens and none evictable"
            victim = self.victim(candidates)
            self.active.remove(victim)
            self.binned.add(victim)
            evictions += 1
        assert evictions <= 2, "DDES evicts at most twice per step"
        if len(self.binned) >= self.bin_size:
            for j in self.binned:
                del self.scores[j]
            self.binned.clear()

    def place(self, position: int) -> None:
        """DDES step 6: the new token is active, text, and scores 0."""
        self.active.add(position)
        self.scores[position] = 0.0

    def add_attention(self, increments: list[float]) -> None:
        """Add `Ā[new token, j]` (already averaged over the chosen layers) to every kept position `j`."""
        for j in self.kept:
            self.scores[j] += increments[j]


# ------------------------------------------------------------------------------------------------- model


def _mean_heads(weights: torch.Tensor) -> torch.Tensor:
    """`[1, H, q, k]` attention probabilities -> `[q, k]`, the mean over query heads."""
    assert weights.dim() == 4 and weights.shape[0] == 1
    return weights[0].float().mean(dim=0)


def prune_hidden_mask(kept: list[int], prompt_len: int, dtype: torch.dtype) -> torch.Tensor:
    """`[1, 1, T, T]` additive mask: query `i` sees key `j` iff (`j` kept and `j <= i`) or `j == i`."""
    allowed = torch.zeros(prompt_len, dtype=torch.bool)
    allowed[kept] = True
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
    see = (causal & allowed[None, :]) | torch.eye(prompt_len, dtype=torch.bool)
    mask = torch.zeros(prompt_len, prompt_len, dtype=dtype).masked_fill(~see, float("-inf"))
    return mask[None, None]


def decode_mask(kept: list[int], position: int, dtype: torch.dtype) -> torch.Tensor:
    """`[1, 1, 1, position + 1]` additive mask: 0 on the kept positions (the new token's included)."""
    mask = torch.full((1, 1, 1, position + 1), float("-inf"), dtype=dtype)
    mask[..., kept] = 0.0
    return mask


def _prefill(model, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor], cache: DynamicCache,
             decide: Callable[[torch.Tensor], DAPPlan], *, dap_layer: int, prune_hidden: bool,
             ) -> tuple[torch.Tensor, DAPPlan]:
    """One forward of the prompt (`image_inputs`: pixels and whatever else the family's vision tower reads). Returns
    the last token's logits and the DAP plan taken at `dap_layer`."""
    layers = model.get_decoder().layers
    prompt_len = input_ids.shape[1]
    state: dict[str, object] = {}

    def read_dap_layer(module, args, output) -> None:
        state["plan"] = decide(_mean_heads(output[1]))

    def mask_later_layer(module, args, kwargs):
        plan = state["plan"]
        old = kwargs["attention_mask"]
        assert old is not None and old.shape == (1, 1, prompt_len, prompt_len)
        kwargs["attention_mask"] = prune_hidden_mask(plan.kept, prompt_len, old.dtype)
        return args, kwargs

    handles = [layers[dap_layer].self_attn.register_forward_hook(read_dap_layer)]
    if prune_hidden:
        handles += [layer.register_forward_pre_hook(mask_later_layer, with_kwargs=True)
                    for layer in layers[dap_layer + 1:]]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, **image_inputs, past_key_values=cache, use_cache=True,
                        output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[0, -1], state["plan"]


def _decode_forward(model, token: int, position: int, kept: list[int], cache: DynamicCache
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One decode step over the kept positions (global layers; sliding-window layers see their window). Returns the
    logits and each layer's `[position + 1]` `Ā` row."""
    mask = decode_mask(kept, position, model.dtype)
    window = _sliding_window(model)
    if window is not None:
        recent = list(range(max(position - window + 1, 0), position + 1))
        mask = {"full_attention": mask, "sliding_attention": decode_mask(recent, position, model.dtype)}
    with torch.no_grad():
        # no position_ids: the cache holds every earlier token, so the model numbers this one itself, with its own
        # convention (PaliGemma's positions start at 1)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, attention_mask=mask, use_cache=True,
                    output_attentions=True)
    rows = [_mean_heads(weights)[-1] for weights in out.attentions]
    return out.logits[0, -1], rows


def _sliding_window(model) -> int | None:
    """The window of the model's sliding layers when its config marks some layers sliding (`layer_types`)."""
    text = model.config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None) or []
    return text.sliding_window if "sliding_attention" in layer_types else None


def _global_layers(model) -> list[int]:
    """Layers whose attention feeds the scores: the full-attention ones (every layer when the config has no types)."""
    text = model.config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        return list(range(text.num_hidden_layers))
    return [index for index, kind in enumerate(layer_types) if kind == "full_attention"]


def _score_increments(rows: list[torch.Tensor], score_source: str, dap_layer: int,
                      global_layers: list[int]) -> list[float]:
    if score_source == "layers_mean":
        return torch.stack([rows[index] for index in global_layers]).mean(dim=0).tolist()
    if score_source == "dap_layer":
        return rows[dap_layer].tolist()
    raise ValueError(f"unknown score_source {score_source!r}")


# ------------------------------------------------------------------------------------------------- run


def oracle_fields(config) -> dict[str, object]:
    """An `hae` config's fields as `run_hae_oracle`'s parameters. The oracle attends over float K/V (`kv_dtype`:
    tests/test_quantization.py covers it) and its sliding layers always see their whole window, as `full_windows`
    or a window no longer than the capacity keeps them."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in ("policy", "kv_dtype", "full_windows")}


def run_hae_oracle(model, inputs: dict[str, torch.Tensor], *, capacity: int, bin_size: int, sinks: int,
                   window: int, dap_layer: int, r: float, alpha: float, prune_hidden: bool = False,
                   max_visual_keep: int | None = None, score_source: str = "layers_mean",
                   visual_first: float = 1.0, decay: float = 0.0, observation_window: int = 32,
                   pool_kernel: int = 7, dap_global: bool = True, new_tokens: int,
                   turns: tuple[tuple[list[int], int], ...] = ()) -> HAEOracleRun:
    """Greedy generation of one unpadded sequence under the `hae` policy, eagerly (`model`: HF LLaVA, eager).

    The first token comes from the prefill logits, then `new_tokens - 1` decode steps follow. `turns`: follow-up
    turns, each `(new token ids, tokens to generate)`: the previous turn's last generated token and the turn's ids
    are fed one DDES decode step each (DAP runs at the first prompt only); the last of them gives the turn's first
    generated token. `kept`/`binned` are recorded after each generated token's step.
    """
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1, "the oracle runs one sequence at a time"
    if inputs.get("attention_mask") is not None:
        assert bool(inputs["attention_mask"].all()), "the oracle takes unpadded sequences"
    assert score_source in ("layers_mean", "dap_layer"), score_source
    budget = capacity - bin_size
    assert 1 <= bin_size <= budget and budget >= sinks + window + 1, "invalid hae configuration"
    global_layers = _global_layers(model)
    if dap_global and dap_layer not in global_layers:  # a windowed layer's attention stops at its window
        dap_layer = min((j for j in global_layers if j > dap_layer), default=max(global_layers))
    prompt_len = input_ids.shape[1]
    image_token_id = getattr(model.config, "image_token_id", None)
    visual = [image_token_id is not None and token == image_token_id for token in input_ids[0].tolist()]

    def decide(mean_attention: torch.Tensor) -> DAPPlan:
        return dap_plan(mean_attention, visual, capacity=capacity, bin_size=bin_size, sinks=sinks, window=window,
                        r=r, alpha=alpha, max_visual_keep=max_visual_keep, observation_window=observation_window,
                        pool_kernel=pool_kernel)

    cache = DynamicCache()  # every layer keeps every key; the masks say which ones a step may see
    image_inputs = {name: value for name, value in inputs.items() if name not in ("input_ids", "attention_mask")}
    first_logits, plan = _prefill(model, input_ids, image_inputs, cache, decide,
                                  dap_layer=dap_layer, prune_hidden=prune_hidden)
    state = DDESState(budget=budget, bin_size=bin_size, sinks=sinks, window=window, visual_first=visual_first,
                      decay=decay, scores={j: plan.scores[j] for j in plan.kept}, active=set(plan.active),
                      binned=set(plan.binned), visual={j for j in range(prompt_len) if visual[j]})
    prefill_scores = dict(state.scores)
    kept, binned = [state.kept], [sorted(state.binned)]
    logits, tokens = [first_logits], [int(first_logits.argmax())]
    position = prompt_len

    def feed(token: int) -> torch.Tensor:
        """One DDES decode step of `token` at the next position; records the cache it attends over."""
        nonlocal position
        state.maintain(seen=position)
        state.place(position)
        held.append((state.kept, sorted(state.binned)))
        step_logits, rows = _decode_forward(model, token, position, state.kept, cache)
        state.add_attention(_score_increments(rows, score_source, dap_layer, global_layers))
        position += 1
        return step_logits

    held: list[tuple[list[int], list[int]]] = []
    for turn_ids, turn_tokens in ((None, new_tokens), *turns):
        fed = [] if turn_ids is None else [tokens[-1], *turn_ids]
        for index in range(len(fed) + turn_tokens - 1):
            step_logits = feed(fed[index] if index < len(fed) else tokens[-1])
            if index >= len(fed) - 1:  # a generated token: the turn's last fed one, then every decode step
                kept.append(held[-1][0])
                binned.append(held[-1][1])
                logits.append(step_logits)
                tokens.append(int(step_logits.argmax()))
    return HAEOracleRun(tokens=tokens, kept=kept, binned=binned, logits=torch.stack(logits),
                        prefill_scores=prefill_scores, dap_evicted=plan.dap_evicted)
