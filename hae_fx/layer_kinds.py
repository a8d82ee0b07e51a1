"""Which tokens each decoder layer's attention may see: all earlier ones, a sliding window, or a chunk.

HF decoders say it in their config: transformers 5.x lists `layer_types` (`full_attention`,
`sliding_attention`, `chunked_attention`) with the window in `sliding_window` and the chunk in
`attention_chunk_size`; older layouts (Mistral, Phi-3, Starcoder2) set `sliding_window` for every layer, and
Qwen2-style configs switch it off with `use_sliding_window=False`.

A windowed layer never needs more than its window of keys, so `HAECache` gives it a ring of slots instead of the
evicting slots of the global layers (`hae_fx.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hae_fx.errors import HAEUnsupportedModelError

FULL, SLIDING, CHUNKED = "full", "sliding", "chunked"

_LAYER_TYPES = {"full_attention": FULL, "sliding_attention": SLIDING, "chunked_attention": CHUNKED}


@dataclass(frozen=True)
class LayerKind:
    """One layer's attention span.

    Attributes:
        kind: `FULL` (every earlier token), `SLIDING` (the last `span` tokens, the query included) or `CHUNKED`
            (tokens of the query's chunk of `span` positions, up to the query).
        span: the window or chunk length; None for `FULL`.
    """

    kind: str
    span: int | None = None

    @property
    def windowed(self) -> bool:
        return self.kind != FULL

    def cache_slots(self, capacity: int, *, full_windows: bool = False) -> int:
        """KV slots an `HAECache` of `capacity` gives a layer of this kind: a windowed layer never needs more than
        its span, and keeps all of it with `full_windows` (`PolicyConfig.full_windows`) however small `capacity`."""
        if not self.windowed:
            return capacity
        return self.span if full_windows else min(self.span, capacity)

    def __str__(self) -> str:
        return self.kind if self.span is None else f"{self.kind} {self.span}"


def layer_kinds(text_config) -> list[LayerKind]:
    """Per decoder layer, its `LayerKind`, read from an HF text config.

    Raises:
        HAEUnsupportedModelError: a layer type hae_fx does not know (its mask would be dropped silently).
    """
    layers = text_config.num_hidden_layers
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None)
    if types is None:
        use_window = getattr(text_config, "use_sliding_window", True)
        kind = LayerKind(SLIDING, window) if window is not None and use_window else LayerKind(FULL)
        return [kind] * layers
    kinds = []
    for index, layer_type in enumerate(types[:layers]):
        kind = _LAYER_TYPES.get(layer_type)
        if kind is None:
            raise HAEUnsupportedModelError(
                f"decoder layer {index} has layer type {layer_type!r}; hae_fx handles {sorted(_LAYER_TYPES)} "
                "(other layer types, e.g. linear or recurrent attention, keep no KV cache hae_fx can bound)"
            )
        span = {FULL: None, SLIDING: window, CHUNKED: getattr(text_config, "attention_chunk_size", None)}[kind]
        if kind != FULL and span is None:
            raise HAEUnsupportedModelError(
                f"decoder layer {index} is {layer_type!r} but the config gives no "
                f"{'sliding_window' if kind == SLIDING else 'attention_chunk_size'}"
            )
        kinds.append(LayerKind(kind, span))
    return kinds
