"""Train Gemma-VLM on SynthVLM's scene questions: `python -m hae_fx.models.gemma_vlm.train`.

Gemma 3 270M's decoder stays frozen; the vision tower (from SynthVLM's checkpoint), the projector and rank
`--lora-rank` updates of the decoder's projections are trained, with SynthVLM's data stream, loss and schedule
(`synthvlm.train.fit`). The decoder comes from the registry package or, on a machine without it, from a pack
(`--lm-pack`, written by `python -m hae_fx.models.gemma_vlm.lm_pack`): the same float32 weights either way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hae_fx.models.gemma_vlm import lora
from hae_fx.models.gemma_vlm.model import (
    CHECKPOINT_DIR,
    LANGUAGE,
    PROJECTOR,
    VISION,
    apply_trained,
    from_pack,
    from_registry,
    save_trained,
)
from hae_fx.models.synthvlm.train import fit, training_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_parser(__doc__.split("\n\n")[0], CHECKPOINT_DIR)
    parser.add_argument("--lm-pack", type=Path, default=None,
                        help="folder of lm_pack's files (default: the registry's Gemma 3 270M)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.set_defaults(lr=5e-4, warmup=200, steps=6000, eval_every=500)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model, word_ids = from_registry() if args.lm_pack is None else from_pack(args.lm_pack)
    model.requires_grad_(False)
    trainable = lora.add(model.get_submodule(LANGUAGE), args.lora_rank, args.lora_alpha)
    for part in (VISION, PROJECTOR):
        trainable += list(model.get_submodule(part).requires_grad_(True).parameters())
    if args.init is not None:
        apply_trained(model, args.init, merge=False)
    meta = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "word_token_ids": word_ids}
    return fit(model, args, trainable, lambda: save_trained(model, args.out, meta))


if __name__ == "__main__":
    main()
