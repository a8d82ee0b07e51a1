"""`hae-fx demo`: the trained SynthVLM answers questions about a scene with a full KV cache and with `hae`.

Run it with `make demo`, `hae-fx demo` or `python examples/quickstart.py`. SynthVLM is a small LLaVA shipped with
hae_fx and trained on grid-of-shapes scenes (`hae_fx.models.synthvlm`); each image is 144 visual tokens. Both
caches are fixed at transform time: the full one is sized for the longest prompt plus the longest answer, the
`hae` one holds 55% of it whatever the prompt or generation length. One baseline throughout: the KV savings are
against that full cache. Wrong answers are marked, and a wrong description says which shapes it invented or
missed. The demo writes `scene.png` (the image the model sees) and `kept_patches.png` (the patches `hae` kept
after prefill and at the end of its description, the cells it got wrong outlined).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hae_fx
from hae_fx.models.synthvlm import data
from hae_fx.models.synthvlm import model as synthvlm
from hae_fx.models.synthvlm.evaluate import described_objects
from hae_fx.models.synthvlm.scenes import DEFAULT_IMAGE_SIZE, Scene, render
from hae_fx.viz import kept_patches_figure

HELD_OUT_SCENE = 5
KINDS = ("count", "locate", "describe")
FULL_SLOTS = 256  # a full cache sized for the longest prompt (156) plus the longest answer (85)
HAE_SLOTS = 140  # 59% of a description's full cache (152 + 85 slots)


def main(compiler: str = "inductor", out: str | Path = ".") -> None:
    """Run the demo, writing its pictures under `out`; `compiler="eager"` runs the rewritten graphs without
    Inductor (no compile wait)."""
    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = synthvlm.load()
    questions = [data.example_for(data.HELD_OUT, HELD_OUT_SCENE, kind) for kind in KINDS]
    scene = questions[0].scene
    render(scene).save(out / "scene.png")
    print(f"{out / 'scene.png'}: a {scene.grid_size}x{scene.grid_size} grid of shapes, {DEFAULT_IMAGE_SIZE}x"
          f"{DEFAULT_IMAGE_SIZE} px, 144 visual tokens")

    configs = {
        "full": hae_fx.HAEConfig(policy="full", capacity=FULL_SLOTS),
        "hae": hae_fx.HAEConfig(policy="hae", capacity=HAE_SLOTS, bin_size=HAE_SLOTS // 8, window=16),
    }
    options = {"hae.compiler": "eager"} if compiler == "eager" else None
    models = {name: hae_fx.transform(copy.deepcopy(base), config, options=options) for name, config in configs.items()}
    kv = _compile(models, tokenizer, questions[0], compiler)
    print(f"KV cache, fixed for any prompt or answer: full {FULL_SLOTS} slots = {kv['full'] / 1024:.0f} KiB (the "
          f"baseline: the longest prompt plus the longest answer); hae {HAE_SLOTS} slots = {kv['hae'] / 1024:.0f} "
          f"KiB, {1 - kv['hae'] / kv['full']:.0%} less")

    tokens, seconds = dict.fromkeys(models, 0), dict.fromkeys(models, 0.0)
    progress = tqdm(total=len(questions) * len(models), desc="answering", unit="answer", disable=None)
    for example in questions:
        inputs = data.prompt_batch(tokenizer, [example])
        progress.write(f"\nQ: {example.question}\n   expected  {example.answer}")
        for name, model in models.items():
            progress.set_postfix_str(f"{name}: {example.kind}")
            start = time.perf_counter()
            result = model.generate(**inputs, max_new_tokens=data.max_answer_tokens([example.kind]),
                                    return_dict_in_generate=True)
            seconds[name] += time.perf_counter() - start
            new = result.sequences[0, inputs["input_ids"].shape[1]:].tolist()
            tokens[name] += len(new)
            answer = tokenizer.decode(new)
            verdict = "correct" if answer == example.answer else "WRONG"
            progress.write(f"   {name:<9} {answer}  [{verdict}]")
            if verdict == "WRONG" and example.kind == "describe":
                progress.write(f"             {_description_errors(example.scene, answer)}")
            progress.update()
            if name == "hae" and example.kind == "describe":
                described, cache = answer, result.past_key_values
    progress.close()
    print("\n   " + "\n   ".join(line for line in str(hae_fx.report(cache)).splitlines() if "KV bytes" not in line))
    picture = out / "kept_patches.png"
    wrong = sorted({cell for cell, _, _ in _objects(scene) ^ described_objects(described)})
    kept_patches_figure(render(scene), cache, picture, marks=[_cell_box(scene, cell) for cell in wrong],
                        marks_label="a cell hae's description got wrong",
                        title="SynthVLM's hae cache: which of the 144 image patches it kept")
    print(f"{picture}: the patches hae kept after prefill and at the end of the description (evicted ones dimmed"
          f"{', wrong cells outlined' if wrong else ''})")
    what = "compile excluded" if compiler == "inductor" else "eager reference ops, no Inductor"
    print("speed (" + what + "): " + ", ".join(f"{name} {tokens[name] / seconds[name]:.0f} tokens/s"
                                               for name in models))


def _compile(models: dict[str, torch.nn.Module], tokenizer, example: data.Example, compiler: str) -> dict[str, int]:
    """Compile each model's prefill and decode graphs with a two-token answer (so the answers after it are timed
    without compile); returns each cache's KV bytes."""
    kv = {}
    inputs = data.prompt_batch(tokenizer, [example])
    stage = "compiling" if compiler == "inductor" else "tracing"
    if compiler == "inductor":
        tqdm.write("Compiling the prefill and decode graphs of both models: minutes on a 2-core CPU "
                   "(`hae-fx demo --compiler eager` skips Inductor).")
    for name, model in tqdm(models.items(), desc=stage, unit="model", disable=None):
        kv[name] = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True).past_key_values.kv_nbytes
    return kv


def _objects(scene: Scene) -> set[tuple[tuple[int, int], str, str]]:
    """`(cell, colour, shape)` of every object, as `described_objects` reads them from a description."""
    return {(cell, colour, shape) for cell, (colour, shape) in scene.objects.items()}


def _description_errors(scene: Scene, answer: str) -> str:
    """What a description got wrong: the shapes it invented (not in the scene) and those it missed."""
    truth, said = _objects(scene), described_objects(answer)

    def clauses(objects) -> str:
        return ", ".join(f"row {r + 1} column {c + 1} {colour} {shape}" for (r, c), colour, shape in sorted(objects))

    parts = [f"invented: {clauses(said - truth)}" if said - truth else "",
             f"missed: {clauses(truth - said)}" if truth - said else ""]
    return "; ".join(part for part in parts if part) or "the right shapes, not in reading order"


def _cell_box(scene: Scene, cell: tuple[int, int],
              image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[float, float, float, float]:
    """The pixel box `(x0, y0, x1, y1)` of a scene cell in its rendered image."""
    side = image_size / scene.grid_size
    row, col = cell
    return col * side, row * side, (col + 1) * side, (row + 1) * side
