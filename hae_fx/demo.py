"""`hae-fx demo`: the trained SynthVLM answers questions about a scene with a full KV cache and with `hae`.

Run it with `make demo`, `hae-fx demo` or `python examples/quickstart.py`. SynthVLM is a
small LLaVA shipped with hae_fx and trained on grid-of-shapes scenes (`hae_fx.models.synthvlm`); each image is 144
visual tokens. The `hae` cache holds 59% of what a full cache needs for the longest answer, whatever the prompt or
generation length. The demo writes `scene.png` (the image the model sees) and `kept_patches.png` (the patches
Dual-Attention Pruning kept at prefill, the others dimmed).
"""

import time

import torch

import hae_fx
from hae_fx.models.synthvlm import data
from hae_fx.models.synthvlm import model as synthvlm
from hae_fx.models.synthvlm.scenes import render
from hae_fx.viz import kept_patches

HELD_OUT_SCENE = 5
KINDS = ("count", "locate", "describe")
FULL_SLOTS = 256  # a full cache sized for the longest prompt (156) plus the longest answer (85)
HAE_SLOTS = 140  # 59% of a description's full cache (152 + 85 slots)


def main(compiler: str = "inductor") -> None:
    """Run the demo; `compiler="eager"` runs the rewritten graphs without Inductor (no compile wait)."""
    torch.manual_seed(0)
    tokenizer = synthvlm.load()[1]
    questions = [data.example_for(data.HELD_OUT, HELD_OUT_SCENE, kind) for kind in KINDS]
    render(questions[0].scene).save("scene.png")
    print("scene.png: a 4x4 grid of shapes, 96x96 px, 144 visual tokens")

    configs = {
        "full": hae_fx.HAEConfig(policy="full", capacity=FULL_SLOTS),
        "hae": hae_fx.HAEConfig(policy="hae", capacity=HAE_SLOTS, bin_size=HAE_SLOTS // 8, window=16),
    }
    options = {"hae.compiler": "eager"} if compiler == "eager" else None
    models = {name: hae_fx.transform(synthvlm.load()[0], config, options=options) for name, config in configs.items()}
    if compiler == "inductor":
        print("The first answers compile the prefill and decode graphs (minutes on a 2-core CPU); later calls reuse "
              "them.")
    kv_full = None
    for example in questions:
        inputs = data.prompt_batch(tokenizer, [example])
        print(f"\nQ: {example.question}\n   expected: {example.answer}")
        for name, model in models.items():
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=data.max_answer_tokens([example.kind]),
                                 return_dict_in_generate=True)
            seconds = time.perf_counter() - start
            answer = tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
            cache = out.past_key_values
            verdict = "correct" if answer == example.answer else "WRONG"
            summary = hae_fx.report(cache)
            if name == "full":
                kv_full = cache.kv_nbytes
            note = f", {1 - cache.kv_nbytes / kv_full:.0%} less than full's" if name != "full" else ""
            print(f"   {name:<4} [{verdict}] {answer}\n        KV {cache.kv_nbytes / 1024:.0f} KiB{note}; "
                  f"{seconds:.1f} s")
        if example.kind == "describe":  # the last cache and summary are hae's
            # the report's own KV line counts against a full cache of the tokens seen; the lines above count
            # against the full cache the demo ran, one baseline for the whole demo
            print("\n".join(f"   {line}" for line in str(summary).splitlines() if "KV bytes" not in line))
            kept_patches(render(example.scene), cache, "kept_patches.png")
            print("   kept_patches.png: the patches the hae cache kept after prefill (evicted ones dimmed)")


if __name__ == "__main__":
    main()
