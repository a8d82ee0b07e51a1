"""`hae_fx.inspect(model)`: what hae_fx found in a transformed model and what it will do, layer by layer.

Like `torch._dynamo.explain`, it reports rather than runs: each decoder layer's attention kind (global, sliding
window, chunked) and the KV slots it keeps, the policy's plan, and, once the model has generated, the attention
sites the passes rewrote in each compiled graph and where the prefill decision was placed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hae_fx.backend import GraphRecord
from hae_fx.config import PolicyConfig
from hae_fx.errors import HAEError
from hae_fx.models import family_of
from hae_fx.policies import policy_for


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: its attention kind, the slots its cache keeps, and the attention forms rewritten in the
    decode graph (empty until the model has generated)."""

    index: int
    kind: str
    slots: int
    decode_sites: tuple[str, ...]
    prefill_tokens: int | None


@dataclass(frozen=True)
class ModelInspection:
    """What `inspect` reports.

    Attributes:
        model: the model's class name; family: the `ModelFamily` that read it.
        config: the policy config it was transformed with.
        layers: one `LayerPlan` per decoder layer.
        graphs: the `GraphRecord`s of the compiled prefill and decode graphs so far.
    """

    model: str
    family: str
    config: PolicyConfig
    layers: tuple[LayerPlan, ...]
    graphs: dict[str, list[GraphRecord]]

    def __str__(self) -> str:
        config = self.config
        lines = [f"{self.model} (family {self.family}): policy {config.policy!r}, capacity {config.capacity} slots"]
        if not self.graphs["decode"]:
            lines.append("  not compiled yet: the attention sites are found when generate() first runs")
        lines.append("  layer  kind          slots  decode attention  prefill tokens")
        for layer in self.layers:
            sites = ", ".join(layer.decode_sites) or "-"
            tokens = "-" if layer.prefill_tokens is None else str(layer.prefill_tokens)
            lines.append(f"  {layer.index:>5}  {layer.kind:<12}  {layer.slots:>5}  {sites:<16}  {tokens}")
        for phase in ("prefill", "decode"):
            for number, record in enumerate(self.graphs[phase]):
                lines.append(f"  {phase} graph {number}: {record.report}")
                if record.dap is not None:
                    lines.append(f"    {record.dap}")
        return "\n".join(lines)


def inspect(model: torch.nn.Module) -> ModelInspection:
    """Describe a model transformed by `hae_fx.transform`.

    Raises:
        HAEError: `model` was not transformed.
    """
    config = getattr(model, "hae_config", None)
    if config is None:
        raise HAEError("hae_fx.inspect describes a transformed model; call hae_fx.transform(model, config) first")
    family = family_of(model)
    graphs = model.hae_graphs
    decode_forms: dict[int, list[str]] = {}
    if graphs["decode"] and graphs["decode"][-1].report is not None:
        report = graphs["decode"][-1].report
        for layer, form in zip(report.layers, report.forms, strict=True):
            decode_forms.setdefault(layer, []).append(form)
    prefill_tokens = graphs["prefill"][-1].tokens_per_layer if graphs["prefill"] else {}
    kinds = family.layer_kinds(model)
    global_layers = [index for index, kind in enumerate(kinds) if not kind.windowed]
    own = dict(zip(global_layers, policy_for(config).layer_capacities(global_layers) or [], strict=False))
    layers = tuple(
        LayerPlan(index=index, kind="global" if not kind.windowed else str(kind),
                  slots=kind.cache_slots(own.get(index, config.capacity), full_windows=config.full_windows),
                  decode_sites=tuple(decode_forms.get(index, ())), prefill_tokens=prefill_tokens.get(index))
        for index, kind in enumerate(kinds)
    )
    return ModelInspection(model=type(model).__name__, family=family.name, config=config, layers=layers,
                           graphs=graphs)
