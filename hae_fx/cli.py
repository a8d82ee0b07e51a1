"""The `hae-fx` command line (also `python -m hae_fx`): generate with an evicting cache from a local checkpoint,
inspect what hae_fx would do to a model before anything runs, run the demo and the benchmarks.

    hae-fx demo [--compiler eager]
    hae-fx inspect --model DIR [--policy hae --budget 0.5 --context 4096]
    hae-fx generate --model DIR --prompt TEXT [--image FILE] [--policy hae --budget 0.5 --device cuda]
    hae-fx bench accuracy|speed [the benchmark's own options]
    hae-fx export --model DIR --out model.pt2 [--policy hae --budget 0.5 --max-prompt-len 512]
    hae-fx run model.pt2 --prompt-ids 1 15043 [--max-new-tokens 32]   (or --prompt TEXT --tokenizer DIR)
    hae-fx run model.pt2 --prompt-ids 1 15043 --top-p 0.9 --temperature 0.7 --seed 0      (sampled)

Everything is offline: `--model` is a local folder as `save_pretrained` writes it. Exit codes: 0 on success, 1
when hae_fx refuses the model or the request (the message says why and what to do), 2 for bad arguments.
Progress goes to stderr through the `hae_fx` logger (compiles are announced; `-q` hides it, `-v` adds debugging
detail, `HAE_FX_LOG=WARNING|INFO|DEBUG` sets the level without a flag).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hae_fx import deploy_runner, logs
from hae_fx.config import PolicyConfig
from hae_fx.errors import HAEError, HAEUnsupportedModelError
from hae_fx.policies import available, sweep_config

log = logging.getLogger("hae_fx")

#: the benchmarks `hae-fx bench` runs: `benchmarks/<name>.py`, installed as `hae_fx.benchmarks.<name>`
BENCHMARKS = ("accuracy", "speed")

EXAMPLES = {
    "demo": """examples:
  hae-fx demo                       # compiles with Inductor first (minutes on a 2-core CPU)
  hae-fx demo --compiler eager      # no compile wait: the rewritten graphs run on the ops' reference code
  hae-fx demo --out pictures/       # scene.png and kept_patches.png go there
""",
    "inspect": """examples:
  hae-fx inspect --model ./llava-1.5-7b-hf --budget 0.5 --context 4096
  hae-fx inspect --model ~/.cache/hae_fx/gemma3-270m --policy streaming --budget 0.25 --context 32768
""",
    "generate": """examples:
  hae-fx generate --model ./llava-1.5-7b-hf --image cat.png --prompt "What is in the picture?" --budget 0.5
  hae-fx generate --model ~/.cache/hae_fx/gemma3-270m --prompt "The capital of France is" --policy streaming
  hae-fx generate --model ~/.cache/hae_fx/gemma3-270m --prompt "Once upon a time" --compiler eager  # no compile wait
""",
    "bench": """examples:
  hae-fx bench accuracy --quick                       # 60 questions, 3 budgets, every policy
  hae-fx bench accuracy --policies full,hae,streaming --budgets 0.59,0.4 --out results/
  hae-fx bench speed --device cpu --quick --out results/
  hae-fx bench speed --batch 8 --out results/         # on a GPU: LLaVA-1.5-7B shapes
  hae-fx bench accuracy --help                        # the benchmark's own options
""",
    "export": """examples:
  hae-fx export --model ~/.cache/hae_fx/gemma3-270m --out gemma.pt2 --policy hae --budget 0.5 --max-prompt-len 512
  hae-fx export --model ./llava-1.5-7b-hf --out llava.pt2 --device cuda --dtype bfloat16 --batch 8
""",
    "run": """examples:
  hae-fx run gemma.pt2 --prompt "The capital of France is" --tokenizer ~/.cache/hae_fx/gemma3-270m
  hae-fx run text.pt2 --prompt-ids 1 44 89 96 4 121 87 26 42 107 --max-new-tokens 12
  hae-fx run text.pt2 --prompt-ids 1 44 89 96 4 121 87 26 42 107 --top-p 0.9 --temperature 0.7 --seed 0
""",
}


class UsageError(Exception):
    """A command-line argument that cannot work (exit code 2)."""


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def policy_config(policy: str, budget: float, context: int) -> PolicyConfig:
    """`policy`'s config holding `budget` of a full cache of `context` tokens, by the benchmarks' sweep rule
    (4 sinks, a window of a quarter of the capacity up to 16, a recycle bin of an eighth)."""
    if policy not in available():
        raise UsageError(f"unknown policy {policy!r}; choose one of {', '.join(available())}")
    if not 0 < budget <= 1:
        raise UsageError(f"--budget is the share of a full cache to keep, in (0, 1]; got {budget}")
    if policy == "full":
        return sweep_config(policy, capacity=context)
    capacity = max(8, round(budget * context))
    return sweep_config(policy, capacity=capacity, sinks=4, window=max(1, min(16, capacity // 4)),
                        bin_size=max(1, capacity // 8))


def kv_bytes(model: torch.nn.Module, capacity: int, dtype: torch.dtype, *, full_windows: bool = False) -> int:
    """K/V bytes per sequence of a cache of `capacity` slots for `model` (windowed layers keep their ring)."""
    from hae_fx.models import family_of

    family = family_of(model)
    kv_heads, head_dim = family.kv_geometry(model)
    slots = sum(kind.cache_slots(capacity, full_windows=full_windows) for kind in family.layer_kinds(model))
    return 2 * slots * kv_heads * head_dim * dtype.itemsize


def _model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    if type(config) not in auto._model_mapping:
        raise HAEUnsupportedModelError(
            f"{config.model_type!r} ({type(config).__name__}) has no {auto.__name__.removeprefix('AutoModelFor')} "
            "class in transformers: hae-fx runs generative decoders (the README's 'Supported models' lists the tested "
            "families); pass a causal-LM or image-text-to-text checkpoint")
    return auto


def _load_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UsageError(f"--model {path}: no config.json there; pass a folder written by save_pretrained")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except ValueError as error:  # a model_type this transformers does not know
        raise HAEUnsupportedModelError(
            f"--model {path}: transformers cannot read its config.json ({str(error).splitlines()[0]}); hae-fx runs "
            "the families transformers implements (the README's 'Supported models'): try a newer transformers if "
            "the family is recent") from None


def run_demo(args: argparse.Namespace) -> None:
    from hae_fx.demo import main as demo

    demo(compiler=args.compiler, out=args.out)


def run_bench(args: argparse.Namespace) -> None:
    """Run `benchmarks/<name>.py`'s `main` with the remaining arguments (its own parser reads them).

    Without `--out`, results go to `bench-results/<name>` in the current folder: the scripts' own default is the
    recorded results next to them, which in an installed package is inside site-packages.
    """
    folder = str(Path(importlib.import_module("hae_fx.benchmarks").__file__).parent)
    if folder not in sys.path:  # the scripts import their siblings by file name (waves, gpu_families), as scripts do
        sys.path.insert(0, folder)
    benchmark = importlib.import_module(f"hae_fx.benchmarks.{args.benchmark}")
    options = args.options
    if not any(option == "--out" or option.startswith("--out=") for option in options):
        options = [*options, "--out", str(Path("bench-results") / args.benchmark)]
    program = sys.argv[0]
    sys.argv[0] = f"hae-fx bench {args.benchmark}"  # the benchmark's usage and error lines name this command
    try:
        benchmark.main(options)
    finally:
        sys.argv[0] = program


def run_inspect(args: argparse.Namespace) -> None:
    import hae_fx

    config = _load_config(args.model)
    with torch.device("meta"):  # the structure only: no weights are read
        model = _model_class(config).from_config(config)
    hae_config = policy_config(args.policy, args.budget, args.context)
    hae_fx.transform(model, hae_config)
    print(hae_fx.inspect(model))
    dtype = config.get_text_config().dtype or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    full, kept = kv_bytes(model, args.context, dtype), kv_bytes(model, hae_config.capacity, dtype,
                                                                   full_windows=hae_config.full_windows)
    print(f"KV bytes per sequence at {args.context} tokens ({str(dtype).removeprefix('torch.')}): full cache "
          f"{_size(full)}, {args.policy} at budget {args.budget} {_size(kept)} ({1 - kept / full:.0%} less)")


def run_generate(args: argparse.Namespace) -> None:
    import hae_fx

    config = _load_config(args.model)
    if args.image is not None and not args.image.is_file():
        raise UsageError(f"--image {args.image}: no such file")
    multimodal = hasattr(config, "vision_config")
    if args.image is not None and not multimodal:
        raise UsageError(f"--image given but {args.model} is a text model ({config.model_type})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    inputs, tokenizer = _prompt_inputs(args, multimodal)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    ranks = tensor_parallel_ranks(args.device)
    if ranks > 1:
        log.info("loading %s, sharded over %d ranks by its tensor-parallel plan", args.model, ranks)
        model = _model_class(config).from_pretrained(args.model, local_files_only=True, dtype=dtype, tp_plan="auto")
    else:
        log.info("loading %s", args.model)
        model = _model_class(config).from_pretrained(args.model, local_files_only=True, dtype=dtype).to(args.device)
    model.eval()
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    hae_config = policy_config(args.policy, args.budget, prompt_len + args.max_new_tokens)
    options = {"hae.compiler": "eager"} if args.compiler == "eager" else None
    hae_fx.transform(model, hae_config, mode="reduce-overhead" if args.device.startswith("cuda") else None,
                     options=options)
    from transformers import TextStreamer

    first_rank = int(os.environ.get("RANK", "0")) == 0  # every rank computes the same tokens; one prints them
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if first_rank else None
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
                         return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    new_tokens = out.sequences.shape[1] - prompt_len
    summary = hae_fx.report(out.past_key_values)
    visual = summary.sequences[0]
    kept = f", visual tokens kept {visual.kept_visual}/{visual.prompt_visual}" if visual.prompt_visual else ""
    per_rank = f" per rank of {ranks}" if ranks > 1 else ""
    if first_rank:
        print(f"{new_tokens} tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} tokens/s, compile included); "
              f"{args.policy} KV {_size(summary.kv_bytes)} vs full {_size(summary.full_kv_bytes)}{per_rank} "
              f"({summary.kv_saving:.0%} less){kept}")
    if ranks > 1:
        torch.distributed.destroy_process_group()  # HF's plan created it


def tensor_parallel_ranks(device: str) -> int:
    """The processes torchrun launched (`WORLD_SIZE`), which `generate` shards the model across with HF's
    tensor-parallel plan (`docs/tensor_parallel.md`); 1 outside torchrun.

    Raises:
        UsageError: a device index under torchrun, where each rank takes its own device (`LOCAL_RANK`).
    """
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: under torchrun each rank takes the GPU of its LOCAL_RANK; pass "
                         "--device cuda (or cpu)")
    return ranks


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _prompt_inputs(args: argparse.Namespace, multimodal: bool):
    from PIL import Image, UnidentifiedImageError
    from transformers import AutoProcessor, AutoTokenizer

    kind = "tokenizer" if args.image is None else "processor"
    try:
        loader = AutoTokenizer if args.image is None else AutoProcessor
        reader = loader.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--model {args.model}: no {kind} there ({str(error).splitlines()[0]}); save it next to the "
                         f"weights with {kind}.save_pretrained(DIR)") from None
    if args.image is None:
        return dict(reader(args.prompt, return_tensors="pt")), reader
    try:
        image = Image.open(args.image).convert("RGB")
    except UnidentifiedImageError:
        raise UsageError(f"--image {args.image}: not an image file PIL can read (PNG, JPEG, ...)") from None
    image_token = getattr(reader, "image_token", "<image>")
    text = args.prompt if image_token in args.prompt else f"{image_token}\n{args.prompt}"
    inputs = reader(text=text, images=image, return_tensors="pt")
    return dict(inputs), reader.tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hae-fx", description=__doc__.split("\n\n")[0],
                                     epilog="".join(EXAMPLES.values()).replace("\nexamples:\n", "\n"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # logging flags work before or after the command (`hae-fx -q demo`, `hae-fx demo -q`)
    logging_flags = argparse.ArgumentParser(add_help=False)
    logging_flags.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                               help="debugging detail (what the passes found in each graph)")
    logging_flags.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                               help=f"warnings and errors only; {logs.LOG_ENV}=WARNING|INFO|DEBUG sets the level "
                                    "without a flag (default INFO: loading and compiles are announced)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help=argparse.SUPPRESS)
    parser.add_argument("-q", "--quiet", action="store_true", default=False, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[logging_flags], epilog=EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    def model_options(sub: argparse.ArgumentParser, context_default: int | None) -> None:
        sub.add_argument("--model", type=Path, required=True, help="a local HF checkpoint folder")
        sub.add_argument("--policy", default="hae", help=f"eviction policy: {', '.join(available())}")
        sub.add_argument("--budget", type=float, default=0.5,
                         help="share of a full cache to keep, in (0, 1] (default 0.5)")
        if context_default is not None:
            sub.add_argument("--context", type=positive_int, default=context_default,
                             help=f"tokens (prompt + generated) the budget is a share of (default {context_default})")

    def compiler_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--compiler", choices=["inductor", "eager"], default="inductor",
                         help="eager: run the rewritten graphs without Inductor (no compile wait; slower steps)")

    demo = command("demo", "the shipped SynthVLM answers questions with a full cache and with hae, side by side")
    compiler_option(demo)
    demo.add_argument("--out", type=Path, default=Path("."),
                      help="folder for scene.png and kept_patches.png (default: the current one)")
    inspect = command("inspect", "a model's layers, their cache slots and the plan, before anything runs")
    model_options(inspect, context_default=4096)
    generate = command("generate", "generate from a prompt (and an image), tokens streamed, then one summary line")
    model_options(generate, context_default=None)
    generate.add_argument("--prompt", required=True,
                          help="the text prompt; with --image, the processor's image token is prepended if missing")
    generate.add_argument("--image", type=Path, help="an image file, for a vision-language model")
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (under torchrun, which shards the "
                          "model by its tensor-parallel plan: cpu or cuda, each rank on its LOCAL_RANK's GPU)")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                          help="weights dtype (default: the checkpoint's)")
    compiler_option(generate)
    bench = command("bench", "run a benchmark (benchmarks/accuracy.py or speed.py): progress, a table, CSV and a plot")
    bench.add_argument("benchmark", choices=BENCHMARKS, help="accuracy: SynthVLM accuracy against KV budget per "
                       "policy; speed: decode ms/token, time to first token and memory per generation path")
    bench.add_argument("options", nargs=argparse.REMAINDER,
                       help="the benchmark's own options, passed on (`hae-fx bench accuracy --help` lists them); "
                            "without --out, results go to bench-results/<benchmark>")
    add_deploy_commands(command)
    return parser


def log_level(args: argparse.Namespace) -> int:
    """`--verbose` DEBUG, `--quiet` WARNING, else `$HAE_FX_LOG`, else INFO (loading and compiles announced)."""
    if args.verbose:
        return logging.DEBUG
    if args.quiet:
        return logging.WARNING
    try:
        return logs.parse_level(os.environ.get(logs.LOG_ENV) or "INFO")
    except ValueError as error:
        raise UsageError(f"{logs.LOG_ENV}: {error}") from None


# -- export and run: AOTInductor packages (hae_fx.export, hae_fx.deploy_runner) ---------------------------------
def add_deploy_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """`hae-fx export` (build one .pt2 package) and `hae-fx run` (generate from one), made by `command` as the
    other commands are (logging flags, examples)."""
    export = command("export", "build one AOTInductor .pt2 package: prefill + decode, eviction compiled in; it "
                     "runs without hae_fx")
    export.add_argument("--model", type=Path, required=True, help="a local HF checkpoint folder")
    export.add_argument("--out", type=Path, required=True, help="the package to write (.pt2)")
    export.add_argument("--policy", default="hae", help=f"eviction policy: {', '.join(available())}")
    export.add_argument("--budget", type=float, default=0.5,
                        help="share of a full cache to keep, in (0, 1] (default 0.5)")
    export.add_argument("--max-prompt-len", type=int, default=512, help="the longest prompt the package takes")
    export.add_argument("--context", type=int,
                        help="tokens (prompt + generated) the budget is a share of (default: max prompt + 256)")
    export.add_argument("--batch", type=int, default=1, help="sequences per generate call (fixed in the package)")
    export.add_argument("--device", default="cpu", help="the device the package is compiled for: cpu, cuda")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: the checkpoint's)")
    run = command("run", "generate from a .pt2 package, greedily or by sampling (loading it runs native code: "
                  "trusted files only)")
    run.add_argument("package", type=Path)
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", type=int, nargs="+", help="the prompt's token ids")
    prompt.add_argument("--prompt", help="the prompt's text (needs --tokenizer)")
    run.add_argument("--tokenizer", type=Path, help="a folder holding the model's tokenizer (for --prompt)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    deploy_runner.add_sampling_arguments(run)


def run_export(args: argparse.Namespace) -> None:
    import hae_fx

    config = _load_config(args.model)
    if args.max_prompt_len < 2:
        raise UsageError(f"--max-prompt-len must be at least 2, got {args.max_prompt_len}")
    context = args.context or args.max_prompt_len + 256
    hae_config = policy_config(args.policy, args.budget, context)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    log.info("loading %s", args.model)
    model = _model_class(config).from_pretrained(args.model, local_files_only=True, dtype=dtype).to(args.device).eval()
    example = _example_inputs(args.model, config, args.batch, args.max_prompt_len)
    example = {name: value.to(args.device) for name, value in example.items()}
    start = time.perf_counter()
    path = hae_fx.export(model, example, args.out, hae_config, max_prompt_len=args.max_prompt_len)
    print(f"wrote {path} ({_size(path.stat().st_size)}) in {time.perf_counter() - start:.0f} s: {args.policy}, "
          f"capacity {hae_config.capacity}, batch {args.batch}, prompts up to {args.max_prompt_len} tokens")


def _example_inputs(model_dir: Path, config, batch: int, max_prompt_len: int) -> dict[str, torch.Tensor]:
    """Inputs to trace the programs with: any text prompt; for a VLM, one image through the model's processor."""
    if not hasattr(config, "vision_config"):
        length = min(8, max_prompt_len)
        return {"input_ids": torch.ones(batch, length, dtype=torch.long)}
    from PIL import Image
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {model_dir} is a vision-language model without a processor there; the export "
                         f"traces the vision tower with one image the processor prepares ({error})") from error
    image = Image.new("RGB", (224, 224))
    text = f"{getattr(processor, 'image_token', '<image>')}\n"
    inputs = processor(text=[text] * batch, images=[image] * batch, return_tensors="pt")
    return {name: inputs[name] for name in ("input_ids", "attention_mask", "pixel_values")}


def run_package(args: argparse.Namespace) -> None:
    import hae_fx

    if args.prompt is not None and args.tokenizer is None:
        raise UsageError("--prompt needs --tokenizer DIR (or pass --prompt-ids)")
    if not args.package.is_file():
        raise UsageError(f"{args.package}: no such file")
    tokenizer = None
    if args.prompt is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        ids = tokenizer(args.prompt)["input_ids"]
    else:
        ids = args.prompt_ids
    runner = hae_fx.load(args.package)
    if runner.metadata["image_input"]:
        raise UsageError(f"{args.package} takes an image with every prompt; run it from Python "
                         f"(hae_fx.load(path).generate(..., {runner.metadata['image_input']}=...))")
    prompt = torch.tensor([ids] * runner.metadata["batch"])
    start = time.perf_counter()
    out = runner.generate(input_ids=prompt, max_new_tokens=args.max_new_tokens,
                          **deploy_runner.sampling_arguments(args))
    seconds = time.perf_counter() - start
    new = out[0, prompt.shape[1]:].tolist()
    print(" ".join(map(str, new)))
    if tokenizer is not None:
        print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"{len(new)} tokens in {seconds:.2f} s ({runner.metadata['policy']}, {runner.metadata['family']})",
          file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(log_level(args))
        {"demo": run_demo, "inspect": run_inspect, "generate": run_generate, "bench": run_bench,
         "export": run_export, "run": run_package}[args.command](args)
    except UsageError as error:
        parser.error(str(error))  # exits with 2
    except HAEError as error:
        print(f"hae-fx: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0
