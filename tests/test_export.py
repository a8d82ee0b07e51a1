"""Exported packages (`hae_fx.export` / `hae_fx.load`): the tokens of the `transform()` path, from one `.pt2`, in a
process that never imports hae_fx, from `hae-fx export` / `hae-fx run`, and from the C++ example (text, and
pixels from a raw file); sampled tokens equal to HF's `generate(do_sample=True)` with the same seed; and every
refusal of a package that must not run.

AOTInductor compiles take about a minute per package on 2 cores, so each package is built once per module: tiny
LLaVA (its vision tower inside the package) for `full`, `streaming` and `hae`, and a windowed text model
(mistral with a sliding window: its layers keep rings) through the command line for `hae`; Aya Vision and Janus
for `full`, and four text families of tests/families.py for `hae` (one package each); Llama 4 is refused before any
compile. The reference is the `transform()` path on a fresh copy of the same model (the
eager-reference compiler: the rewritten graphs run without Inductor).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import hae_fx
from hae_fx import deploy_runner
from hae_fx.cli import policy_config
from hae_fx.export import cache_tensors
from hae_fx.models.llava import image_features, llava_prompt, tiny_llava
from hae_fx.policies import sweep_config
from tests.conftest import llava_inputs
from tests.families import BY_NAME, FAMILIES

NEW_TOKENS = 16
MAX_PROMPT = 48
#: evicting policies keep fewer slots than the 27-token prompts: the prefill evicts, and decode evicts every step
CONFIGS = {
    "full": sweep_config("full", capacity=MAX_PROMPT + NEW_TOKENS),
    "streaming": sweep_config("streaming", capacity=24, sinks=2, window=4),
    "hae": hae_fx.HAEConfig(capacity=24, bin_size=4, sinks=2, window=4),
}
EAGER = {"hae.compiler": "eager"}
REPO = Path(__file__).resolve().parents[1]


def _longer_llava_inputs(model) -> dict[str, torch.Tensor]:
    """A batch of 2 left-padded prompts longer than `llava_inputs`' (35 and 31 tokens): the same package must
    take both lengths."""
    prompts = [llava_prompt(model.config, prefix=[1, *range(3, 13)], suffix=list(range(20, 29))),
               llava_prompt(model.config, prefix=[1, *range(40, 46)], suffix=list(range(50, 59)))]
    width = max(map(len, prompts))
    generator = torch.Generator().manual_seed(3)
    return {"input_ids": torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
            "pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}


@pytest.fixture(scope="module")
def llava_prompts() -> list[dict[str, torch.Tensor]]:
    model = tiny_llava(seed=0)
    return [llava_inputs(model, 2), _longer_llava_inputs(model)]


@pytest.fixture(scope="module")
def llava_package(tmp_path_factory, llava_prompts):
    """`llava_package(policy)`: `(package path, transform()'s tokens for each prompt)`, each built once."""
    built: dict[str, tuple[Path, list[torch.Tensor]]] = {}

    def build(policy: str) -> tuple[Path, list[torch.Tensor]]:
        if policy not in built:
            config = CONFIGS[policy]
            path = hae_fx.export(tiny_llava(seed=0), llava_prompts[0],
                                 tmp_path_factory.mktemp(policy) / "llava.pt2", config, max_prompt_len=MAX_PROMPT)
            reference = hae_fx.transform(tiny_llava(seed=0), config, options=EAGER)
            built[policy] = path, [reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
                                   for inputs in llava_prompts]
        return built[policy]

    return build


def _seen(runner) -> torch.Tensor:
    names = [spec["name"] for spec in runner.metadata["cache"]]
    return runner.cache[names.index("seen")]


@pytest.mark.parametrize("policy", list(CONFIGS))
def test_llava_package_generates_transform_tokens(policy, llava_package, llava_prompts):
    path, expected = llava_package(policy)
    runner = hae_fx.load(path, expect_config=CONFIGS[policy])
    assert runner.metadata["image_input"] and runner.metadata["family"] == "llava"
    for inputs, tokens in zip(llava_prompts, expected, strict=True):
        out = runner.generate(**inputs, max_new_tokens=NEW_TOKENS)
        assert out.shape == tokens.shape
        assert torch.equal(out, tokens)
    if policy != "full":  # every sequence saw more tokens than the cache holds: eviction ran
        assert int(_seen(runner).min()) > CONFIGS[policy].capacity


def test_package_metadata_and_one_copy_of_the_weights(llava_package):
    path, _ = llava_package("hae")
    meta = deploy_runner.read_metadata(path)
    assert meta["torch_version"] == torch.__version__ and meta["hae_fx_version"]
    assert json.loads(meta["config"]) == json.loads(CONFIGS["hae"].key())
    assert (meta["max_prompt_len"], meta["vocab_size"], meta["batch"]) == (MAX_PROMPT, 256, 2)
    assert meta["kept_len_max"] == CONFIGS["hae"].capacity - 1  # hae keeps a slot free for the first decode token
    with zipfile.ZipFile(path) as archive:
        records = [name for name in archive.namelist() if "/data/weights/" in name]
    shared = set(meta["weights"]["prefill"]) & set(meta["weights"]["decode"])
    assert shared  # the decoder's weights are both programs'; the vision tower's only prefill's
    assert len(records) == len(set(meta["weights"]["prefill"]) | set(meta["weights"]["decode"]))
    for fqn in shared:
        assert meta["weights"]["prefill"][fqn][0] == meta["weights"]["decode"][fqn][0]


_FRESH_PROCESS = textwrap.dedent("""
    import importlib.abc, sys

    class NoHaeFx(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hae_fx":
                raise ImportError(f"{name} imported by a process that must run without hae_fx")
            return None

    sys.meta_path.insert(0, NoHaeFx())
    runner_dir, package, inputs, out = sys.argv[1:]
    sys.path.insert(0, runner_dir)
    import torch
    import deploy_runner

    runner = deploy_runner.Runner(package)
    tokens = runner.generate(**torch.load(inputs), max_new_tokens=NEW_TOKENS)
    hae_ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("hae::")]
    modules = [name for name in sys.modules if name.split(".")[0] == "hae_fx"]
    torch.save({"tokens": tokens, "hae_ops": hae_ops, "modules": modules}, out)
""").replace("NEW_TOKENS", str(NEW_TOKENS))


def test_fresh_process_without_hae_fx(llava_package, llava_prompts, tmp_path):
    """The copied runner loads the package with torch alone (`python -I`, and any import of hae_fx raises): the
    hae ops were compiled into the package, never looked up."""
    path, expected = llava_package("hae")
    shutil.copy(deploy_runner.__file__, tmp_path / "deploy_runner.py")
    (tmp_path / "fresh.py").write_text(_FRESH_PROCESS)
    torch.save(llava_prompts[1], tmp_path / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-I", str(tmp_path / "fresh.py"), str(tmp_path), str(path),
                    str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")], check=True, env=env, timeout=300)
    result = torch.load(tmp_path / "out.pt")
    assert result["modules"] == [] and result["hae_ops"] == []
    assert torch.equal(result["tokens"], expected[1])


def test_package_taking_image_features(llava_package, llava_prompts, tmp_path):
    """For a tower that stays outside the package: the prefill takes the projected features in place of pixels,
    and the tokens are those of the pixel path."""
    _, expected = llava_package("hae")
    model = tiny_llava(seed=0)
    features = [image_features(model, inputs["pixel_values"]) for inputs in llava_prompts]
    text = [{name: inputs[name] for name in ("input_ids", "attention_mask")} for inputs in llava_prompts]
    path = hae_fx.export(model, {**text[0], "image_features": features[0]}, tmp_path / "features.pt2",
                         CONFIGS["hae"], max_prompt_len=MAX_PROMPT)
    runner = hae_fx.load(path)
    assert runner.metadata["image_input"] == "image_features"
    for inputs, image, tokens in zip(text, features, expected, strict=True):
        assert torch.equal(runner.generate(**inputs, image_features=image, max_new_tokens=NEW_TOKENS), tokens)
    with pytest.raises(hae_fx.HAECapacityError, match="takes image_features"):
        runner.generate(**llava_prompts[0], max_new_tokens=NEW_TOKENS)


def _rewrite_metadata(source: Path, target: Path, **changes: object) -> None:
    """Copy a package with some metadata fields changed (every other record as it was)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as copy:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith(deploy_runner.METADATA):
                data = json.dumps({**json.loads(data), **changes}).encode()
            copy.writestr(info, data)


def test_load_refuses_damaged_foreign_and_unexpected_packages(llava_package, llava_prompts, tmp_path):
    path, _ = llava_package("hae")
    data = path.read_bytes()

    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(hae_fx.HAEPackageTruncatedError, match="truncated"):
        hae_fx.load(truncated)
    refused = subprocess.run([sys.executable, "-m", "hae_fx", "run", str(truncated), "--prompt-ids", "1", "2"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "HAEPackageTruncatedError" in refused.stderr.splitlines()[-1]

    corrupted = tmp_path / "corrupted.pt2"
    flipped = bytearray(data)
    with zipfile.ZipFile(path) as archive:  # one byte inside the largest record's data
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    middle = largest.header_offset + 30 + len(largest.filename) + len(largest.extra) + largest.file_size // 2
    flipped[middle] ^= 0xFF
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(hae_fx.HAEPackageCorruptError, match="corrupted"):
        hae_fx.load(corrupted)

    other_torch = tmp_path / "other_torch.pt2"
    _rewrite_metadata(path, other_torch, torch_version="2.0.0")
    with pytest.raises(hae_fx.HAEPackageVersionError, match="compiled by torch 2.0.0"):
        hae_fx.load(other_torch)
    other_format = tmp_path / "other_format.pt2"
    _rewrite_metadata(path, other_format, format=deploy_runner.FORMAT_VERSION + 1)
    with pytest.raises(hae_fx.HAEPackageVersionError, match="package format"):
        hae_fx.load(other_format)

    with pytest.raises(hae_fx.HAEPackageConfigError, match="built for the eviction config"):
        hae_fx.load(path, expect_config=CONFIGS["hae"].replace(capacity=32))

    runner = hae_fx.load(path)
    inputs = llava_prompts[0]
    with pytest.raises(hae_fx.HAECapacityError, match="batch=2"):
        runner.generate(**{name: value[:1] for name, value in inputs.items()})
    too_long = {**inputs, "input_ids": torch.ones(2, MAX_PROMPT + 1, dtype=torch.long)}
    with pytest.raises(hae_fx.HAECapacityError, match="the package takes 2 to 48"):
        runner.generate(**too_long)
    with pytest.raises(hae_fx.HAECapacityError, match="takes pixel_values"):
        runner.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_export_refuses_configs_a_package_cannot_run(tmp_path):
    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, 1)
    with pytest.raises(hae_fx.HAEConfigError, match="max_visual_keep"):
        hae_fx.export(model, inputs, tmp_path / "m.pt2", hae_fx.HAEConfig(capacity=24, bin_size=4, sinks=2,
                                                                         window=4, max_visual_keep=4))
    with pytest.raises(hae_fx.HAEConfigError, match="prune_hidden"):
        hae_fx.export(model, inputs, tmp_path / "m.pt2", CONFIGS["hae"].replace(prune_hidden=True))
    with pytest.raises(hae_fx.HAEConfigError, match="max_prompt_len"):
        hae_fx.export(model, inputs, tmp_path / "m.pt2", CONFIGS["hae"], max_prompt_len=8)
    with pytest.raises(hae_fx.HAEUnsupportedModelError, match="image_sizes"):
        hae_fx.export(model, {**inputs, "image_sizes": torch.tensor([[32, 32]])}, tmp_path / "m.pt2", CONFIGS["hae"])


# -- other VLM families whose prompts are ids, a mask and pixels ---------------------------------------------------
@pytest.mark.parametrize("name", ["aya-vision", "janus"])
def test_vlm_family_package_generates_transform_tokens(name, tmp_path):
    """Aya Vision (its SigLIP tower and pixel-shuffle projector in the package; Cohere2's sliding layers keep
    rings) and Janus: with `full`, the package's tokens for a left-padded batch of 2 equal the `transform()`
    path's and HF's own."""
    family = BY_NAME[name]
    inputs = family.inputs(batch=2)
    config = CONFIGS["full"]
    path = hae_fx.export(family.build(), inputs, tmp_path / f"{name}.pt2", config, max_prompt_len=MAX_PROMPT)
    expected = hae_fx.transform(family.build(), config, options=EAGER).generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(expected, family.build().generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False))
    runner = hae_fx.load(path, expect_config=config)
    assert runner.metadata["image_input"] == "pixel_values"
    assert torch.equal(runner.generate(**inputs, max_new_tokens=NEW_TOKENS), expected)


# -- text decoders of tests/families.py whose layouts differ where export could break -----------------------------
#: gemma3-text: per-layer-type masks (sliding and full), six sliding layers keeping rings to one global, the
#: embedding scale, q/k norms; gpt2: no rotary, learned positions read from `position_ids` (wrong positions of the
#: left-padded row change its tokens), Conv1D and one fused qkv; gpt-neox: parallel attention and MLP, rotary on a
#: quarter of each head (partial), fused qkv; falcon-multi-query: one KV head for every query head; llama4-chunked:
#: chunked attention and mixture-of-experts layers, whose routing adds a guard on the prompt length that torch.export
#: defers and hae_fx.export proves at every length (`hae_fx.export_guards`)
TEXT_FAMILIES = ["gemma3-text", "gpt2", "gpt-neox", "falcon-multi-query", "llama4-chunked"]


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_text_family_package_generates_transform_tokens(name, tmp_path):
    """With `hae` (decode evicts: 12 + 16 tokens through 24 slots), the package's tokens for a left-padded batch of
    2 equal the `transform()` path's, its cache ends in the same state (the same positions in every slot and ring,
    the same keys, values and scores), and the tokens before the cache fills are HF's own."""
    family = BY_NAME[name]
    inputs = family.inputs(batch=2)
    config = CONFIGS["hae"]
    path = hae_fx.export(family.build(), inputs, tmp_path / f"{name}.pt2", config, max_prompt_len=MAX_PROMPT)
    model = hae_fx.transform(family.build(), config, options=EAGER)
    cache = hae_fx.HAECache.for_model(model, config, batch=2)
    expected = model.generate(**inputs, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    runner = hae_fx.load(path, expect_config=config)
    assert not runner.metadata["image_input"]
    assert torch.equal(runner.generate(**inputs, max_new_tokens=NEW_TOKENS), expected)
    assert int(_seen(runner).min()) > config.capacity  # eviction ran
    for tensor, value in zip(cache_tensors(cache), runner.cache, strict=True):
        torch.testing.assert_close(value, tensor.get(), atol=1e-4, rtol=1e-4, msg=tensor.name)
    unevicted = 8  # new tokens while every row's prompt and tokens fit in the slots
    hf = family.build().generate(**inputs, max_new_tokens=unevicted, do_sample=False)
    assert torch.equal(expected[:, : hf.shape[1]], hf)


def test_export_refuses_a_model_that_specializes_the_prompt_length(tmp_path):
    """A forward that branches on the prompt length traces one branch: the guard torch.export defers fails at a
    length the package would take (3, with L % 8 == 3), so export refuses by name before any compile."""
    family = BY_NAME["mistral-window"]
    model = family.build()
    forward = model.forward

    def branching(*args, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[1] % 8 == 3:
            input_ids = input_ids.flip(1)
        return forward(*args, input_ids=input_ids, **kwargs)

    model.forward = branching
    with pytest.raises(hae_fx.HAEUnsupportedModelError,
                       match=r"mistral's prefill program does not trace with a dynamic prompt length: torch.export "
                             r"specializes it \(the guard Ne\(Mod\(s\d+, 8\), 3\) fails at prompt_len=3\)"):
        hae_fx.export(model, family.inputs(batch=2), tmp_path / "branching.pt2", CONFIGS["hae"],
                      max_prompt_len=MAX_PROMPT)


def test_a_failure_inside_torch_export_names_the_model_program_and_torch(tmp_path, monkeypatch):
    """torch.export's own errors (torch 2.11's tracer fails on LLaVA's prefill: docs/gpu.md) come out as an
    HAEUnsupportedModelError naming the model, the program and the torch version, with torch's error chained."""
    def failing_export(*args, **kwargs):
        raise RuntimeError("Piecewise((1, Eq(u2, 1)), (0, True)) is not tracked with proxy\nWhile executing ...")

    monkeypatch.setattr(torch.export, "export", failing_export)
    family = BY_NAME["mistral-window"]
    with pytest.raises(hae_fx.HAEUnsupportedModelError,
                       match=rf"torch {re.escape(torch.__version__)}'s torch.export failed on mistral's prefill "
                             r"program \(RuntimeError: Piecewise.*not tracked with proxy\)") as raised:
        hae_fx.export(family.build(), family.inputs(batch=2), tmp_path / "m.pt2", CONFIGS["hae"],
                      max_prompt_len=MAX_PROMPT)
    assert isinstance(raised.value.__cause__, RuntimeError)


# -- a text model through the command line, and the C++ runner ---------------------------------------------------
TEXT_FAMILY = next(family for family in FAMILIES if family.name == "mistral-window")
TEXT_CONTEXT = 40  # `--budget 0.5 --context 40`: 20 slots for prompts of 12 tokens and 16 new ones


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hae_fx", *args], capture_output=True, text=True, env=env,
                          timeout=600, check=True)


@pytest.fixture(scope="module")
def text_package(tmp_path_factory):
    """`(package, transformed reference model)` for the windowed text family, exported by `hae-fx export`."""
    folder = tmp_path_factory.mktemp("text")
    TEXT_FAMILY.build().save_pretrained(folder / "model")
    _cli("export", "--model", str(folder / "model"), "--out", str(folder / "text.pt2"), "--policy", "hae",
         "--budget", "0.5", "--context", str(TEXT_CONTEXT), "--max-prompt-len", "32", "--batch", "2")
    reference = hae_fx.transform(TEXT_FAMILY.build(), policy_config("hae", 0.5, TEXT_CONTEXT), options=EAGER)
    return folder / "text.pt2", reference


def test_text_package_from_the_cli_generates_transform_tokens(text_package):
    path, reference = text_package
    inputs = TEXT_FAMILY.inputs(batch=2)  # left-padded
    expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    runner = hae_fx.load(path, expect_config=policy_config("hae", 0.5, TEXT_CONTEXT))
    assert not runner.metadata["image_input"] and runner.metadata["family"] == "mistral"
    assert torch.equal(runner.generate(**inputs, max_new_tokens=NEW_TOKENS), expected)
    assert int(_seen(runner).min()) > json.loads(runner.metadata["config"])["capacity"]  # eviction ran


def _unpadded_prompt() -> list[int]:
    inputs = TEXT_FAMILY.inputs(batch=2)
    return inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()


def test_hae_fx_run_prints_the_tokens(text_package):
    path, reference = text_package
    ids = _unpadded_prompt()
    expected = reference.generate(input_ids=torch.tensor([ids] * 2), max_new_tokens=NEW_TOKENS, do_sample=False)
    result = _cli("run", str(path), "--prompt-ids", *map(str, ids), "--max-new-tokens", str(NEW_TOKENS))
    assert result.stdout.split() == [str(token) for token in expected[0, len(ids):].tolist()]


@pytest.fixture(scope="module")
def cpp_runner(tmp_path_factory) -> Path:
    """examples/deploy_cpp's `hae_deploy`, built with CMake against the torch wheel's libtorch."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build examples/deploy_cpp")
    build = tmp_path_factory.mktemp("deploy_cpp")
    prefix = __import__("torch.utils").utils.cmake_prefix_path
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(REPO / "examples" / "deploy_cpp"), "-B", str(build), *generator,
                    f"-DCMAKE_PREFIX_PATH={prefix}"], check=True, capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, timeout=600)
    return build / "hae_deploy"


def _run_cpp(program: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *args], capture_output=True, text=True, check=check, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _cpp_tokens(program: Path, *args: str) -> list[list[int]]:
    """The new tokens `hae_deploy` prints, one row per sequence."""
    return [[int(token) for token in line.split()] for line in _run_cpp(program, *args).stdout.splitlines()]


def test_cpp_runner_builds_and_prints_the_tokens(text_package, cpp_runner):
    """examples/deploy_cpp generates the `transform()` path's greedy tokens."""
    path, reference = text_package
    ids = _unpadded_prompt()
    expected = reference.generate(input_ids=torch.tensor([ids] * 2), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert _cpp_tokens(cpp_runner, str(path), str(NEW_TOKENS), *map(str, ids)) == expected[:, len(ids):].tolist()


def test_cpp_runner_samples(text_package, cpp_runner):
    """C++ draws cannot be torch's, so: the same seed gives the same tokens, `--top-k 1` is greedy, and every
    sampled token lies in the top-k of the logits the package gives for the sampled sequence so far (replayed
    through the Python runner's programs)."""
    path, _ = text_package
    ids = [str(token) for token in _unpadded_prompt()]
    top_k = 5
    sampled = _cpp_tokens(cpp_runner, "--top-k", str(top_k), "--seed", "11", str(path), str(NEW_TOKENS), *ids)
    assert _cpp_tokens(cpp_runner, "--seed", "11", "--top-k", str(top_k), str(path), str(NEW_TOKENS), *ids) == sampled
    greedy = _cpp_tokens(cpp_runner, str(path), str(NEW_TOKENS), *ids)
    assert sampled != greedy
    assert _cpp_tokens(cpp_runner, "--top-k", "1", "--temperature", "0.5", "--seed", "2", str(path),
                       str(NEW_TOKENS), *ids) == greedy
    runner = hae_fx.load(path)
    tokens = torch.tensor(sampled)
    logits, position = runner.prefill(torch.tensor([list(map(int, ids))] * 2))
    for step in range(tokens.shape[1]):
        allowed = logits.topk(top_k).indices
        assert bool((allowed == tokens[:, step, None]).any(-1).all()), step
        position = position + 1
        logits = runner.decode(tokens[:, step], position)
    refused = _run_cpp(cpp_runner, "--top-p", "1.5", str(path), "4", *ids, check=False)
    assert refused.returncode == 2 and "--top-p must be in (0, 1]" in refused.stderr


# -- sampling: the runners' draws ---------------------------------------------------------------------------------
#: temperature, top-k and top-p together (each filter drops tokens on the tiny models' 256-token vocabulary)
SAMPLING = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}


@pytest.mark.parametrize("options", [SAMPLING, {"temperature": 1.7}, {"top_k": 3}, {"top_k": 0, "top_p": 0.5},
                                     {"top_k": 0, "top_p": 1.0}, {"top_k": 300, "top_p": 0.01}])
def test_sampling_warps_the_logits_as_hf(options):
    """`Sampling.warp` against HF's own warpers, in the order HF's generate builds them for `do_sample=True`."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    config = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, **options}  # HF's defaults
    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(config["temperature"])] if config["temperature"] != 1.0 else [])
        + ([TopKLogitsWarper(config["top_k"])] if config["top_k"] else [])
        + ([TopPLogitsWarper(config["top_p"])] if config["top_p"] < 1.0 else []))
    logits = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :5] = logits[0, 5]  # ties at the k-th largest stay, as in HF
    sampling = deploy_runner.Sampling(**options)
    assert torch.equal(sampling.warp(logits), warpers(torch.zeros(3, 1, dtype=torch.long), logits.clone()))


@pytest.mark.parametrize(("options", "message"), [
    ({"do_sample": True, "temperature": 0.0}, "temperature must be > 0"),
    ({"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"do_sample": True, "top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_p": 0.9, "seed": 1}, "top_p, seed only apply when sampling: pass do_sample=True"),
])
def test_runner_refuses_sampling_options_out_of_range(text_package, options, message):
    runner = hae_fx.load(text_package[0])
    with pytest.raises(hae_fx.HAEConfigError, match=message):
        runner.generate(**TEXT_FAMILY.inputs(batch=2), max_new_tokens=2, **options)


def test_sampled_package_tokens_are_hf_generates(text_package):
    """With a seed, the package's draws are HF's `generate(do_sample=True)` on the `transform()` path after
    `torch.manual_seed(seed)`: the same warped distribution, the same generator stream, one draw per step over the
    batch. `top_k=1` is greedy."""
    path, reference = text_package
    inputs = TEXT_FAMILY.inputs(batch=2)  # left-padded
    runner = hae_fx.load(path)
    for seed in (0, 7):
        torch.manual_seed(seed)
        expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, **SAMPLING)
        sampled = runner.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, seed=seed, **SAMPLING)
        assert torch.equal(sampled, expected)
    greedy = runner.generate(**inputs, max_new_tokens=NEW_TOKENS)
    assert not torch.equal(sampled, greedy)  # the draws left the argmax
    assert torch.equal(runner.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, seed=3), greedy)


def test_hae_fx_run_samples_with_a_seed(text_package):
    path, reference = text_package
    ids = _unpadded_prompt()
    torch.manual_seed(5)
    expected = reference.generate(input_ids=torch.tensor([ids] * 2), max_new_tokens=NEW_TOKENS, do_sample=True,
                                  **SAMPLING)
    result = _cli("run", str(path), "--prompt-ids", *map(str, ids), "--max-new-tokens", str(NEW_TOKENS),
                  "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "5")
    assert result.stdout.split() == [str(token) for token in expected[0, len(ids):].tolist()]


def test_cpp_runner_takes_pixels_from_a_raw_file(llava_package, cpp_runner, tmp_path):
    """`hae_deploy --image FILE` feeds a LLaVA package raw float32 pixels of the exported shape (two different
    images over the batch): the `transform()` path's tokens. Without the file, or with a file of another size,
    it refuses."""
    path, _ = llava_package("hae")
    model = tiny_llava(seed=0)
    ids = llava_prompt(model.config, prefix=[1, *range(3, 9)], suffix=list(range(20, 27)))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    pixels.numpy().tofile(tmp_path / "pixels.f32")
    reference = hae_fx.transform(model, CONFIGS["hae"], options=EAGER)
    expected = reference.generate(input_ids=torch.tensor([ids] * 2), pixel_values=pixels,
                                  max_new_tokens=NEW_TOKENS, do_sample=False)
    args = [str(path), str(NEW_TOKENS), *map(str, ids)]
    assert _cpp_tokens(cpp_runner, "--image", str(tmp_path / "pixels.f32"), *args) == expected[:, len(ids):].tolist()
    refused = _run_cpp(cpp_runner, *args, check=False)
    assert refused.returncode == 1 and "takes pixel_values with every prompt: pass --image FILE" in refused.stderr
    pixels[:1].numpy().tofile(tmp_path / "one.f32")
    refused = _run_cpp(cpp_runner, "--image", str(tmp_path / "one.f32"), *args, check=False)
    assert refused.returncode == 1 and "of shape [2, 3, 32, 32]" in refused.stderr
