"""Text-only decoders whose layers follow the Llama layout (`model.model.layers[i].self_attn` calling
`past_key_values.update` and then the attention interface). No visual tokens: every token is text."""

from hae_fx.models.family import ModelFamily

TEXT_DECODER = ModelFamily(
    name="text decoder",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    language_model=lambda model: model.model,
    image_token_id=lambda model: None,
)
