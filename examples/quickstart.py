"""hae_fx in one page: a tiny LLaVA generates with a full cache, a streaming cache and the hae policy.

Run it with `make demo` (or `python examples/quickstart.py` in an environment with hae_fx installed). The model
has random weights, so the tokens are arbitrary; what matters is that every cache runs through the compiled hae
path, that the evicting caches' memory stays fixed however long generation runs, and what the hae policy kept:
`hae_fx.report` prints it, and `kept_patches.png` shows the image patches Dual-Attention Pruning kept.
"""

import time

import torch

import hae_fx
from hae_fx.models.llava import llava_prompt, tiny_llava
from hae_fx.viz import kept_patches

NEW_TOKENS = 40
CONFIGS = (
    hae_fx.HAEConfig(policy="full", capacity=96),
    hae_fx.HAEConfig(policy="streaming", capacity=24, sinks=4, window=8),
    hae_fx.HAEConfig(policy="hae", capacity=24, bin_size=6, sinks=2, window=4, r=0.04, alpha=0.1,
                     prune_hidden=True),
)


def main() -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 32, 32)  # one 32x32 RGB image: 16 visual tokens
    for config in CONFIGS:
        # initializer_range=0.2 gives the random model uneven attention, so DAP has something to choose
        model = hae_fx.transform(tiny_llava(seed=0, initializer_range=0.2), config)
        input_ids = torch.tensor([llava_prompt(model.config, prefix=[1, 17, 42], suffix=[7, 8, 9, 10])])
        inputs = dict(input_ids=input_ids, pixel_values=image, max_new_tokens=NEW_TOKENS, do_sample=False,
                      return_dict_in_generate=True)

        start = time.perf_counter()
        model.generate(**inputs)  # first call compiles the prefill and decode graphs
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**inputs)
        seconds = time.perf_counter() - start

        cache = out.past_key_values
        tokens = out.sequences[0, input_ids.shape[1]:].tolist()
        print(f"policy={config.policy:<9} capacity={config.capacity:<3} prompt={input_ids.shape[1]} tokens "
              f"(16 visual)")
        print(f"  tokens      {tokens}")
        print(f"  speed       {NEW_TOKENS / seconds:.0f} tokens/s "
              f"(first call, with compilation: {compile_seconds:.1f} s)")
        print(f"  KV memory   {cache.kv_nbytes} bytes K/V, {cache.nbytes} bytes with slot metadata")
        if config.policy == "hae":
            print("\n".join(f"  {line}" for line in str(hae_fx.report(cache)).splitlines()))
            kept_patches(image[0], cache, "kept_patches.png")
            print("  kept_patches.png: the image with the patches DAP evicted dimmed")


if __name__ == "__main__":
    main()
