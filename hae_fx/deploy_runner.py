"""Generation (greedy or sampled) from an hae_fx `.pt2` package, with nothing but torch: copy this file beside the
package.

The package (`hae_fx.export` builds it) is one PT2 archive holding two AOTInductor models, `prefill` and
`decode`, whose eviction is compiled in (the hae ops were lowered to Inductor kernels at export), and
`extra/hae_fx.json`, the metadata this module reads: versions, the policy config, the shapes of the cache
tensors, the programs' input order and the prompt limits.

    from deploy_runner import Runner            # or: python deploy_runner.py model.pt2 --prompt-ids 1 5 9
    runner = Runner("model.pt2")
    tokens = runner.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=32)
    # a package exported with image features instead of pixels: generate(..., image_features=features)
    # sampling, as HF's generate(do_sample=True, ...): generate(..., do_sample=True, top_p=0.9, seed=0)

The runner owns the cache: one set of tensors, allocated from the metadata, that both programs take as inputs
and update in place. Prefill runs once per prompt (any length up to the package's maximum: the prompt length
is a dynamic dimension of the prefill program), then decode once per new token.

Loading a package loads native code compiled into it: load trusted files only.

This module imports only torch and the standard library, so it runs where hae_fx is not installed; `hae_fx.load`
wraps it and re-raises its errors as `hae_fx` errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # run in place, the script's folder is hae_fx's package folder, whose modules (inspect.py) would shadow the
    # standard library's
    sys.path.pop(0)

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import zipfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

#: version of the package layout this runner reads; `hae_fx.export` writes the same number
FORMAT_VERSION = 1
#: the metadata record, relative to the archive's root folder
METADATA = "extra/hae_fx.json"
#: the two AOTInductor models of a package
PROGRAMS = ("prefill", "decode")
#: the end-of-central-directory signature that closes every complete zip file
_END_OF_ZIP = b"PK\x05\x06"


class PackageError(Exception):
    """A `.pt2` package that this runner cannot or must not run."""


class PackageVersionError(PackageError):
    """The package was built by another torch (its native code is bound to that libtorch) or another format."""


class PackageTruncatedError(PackageError):
    """The file ends before its zip directory: a partial download or copy."""


class PackageCorruptError(PackageError):
    """The file's records do not match their checksums, or it is not an hae_fx package."""


class PackageConfigError(PackageError):
    """The package was built for another eviction config than the one the caller expects."""


class PromptError(PackageError, ValueError):
    """A prompt the package was not built for (batch, length, inputs)."""


class SamplingError(PackageError, ValueError):
    """Sampling options outside their range, or given without `do_sample=True`."""


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling as HF's `generate(do_sample=True, temperature=, top_k=, top_p=)` does it: the logits (in
    float32) divided by `temperature`, then every token below the `top_k`-th largest logit dropped (ties with it
    kept), then the smallest tokens whose probabilities sum to at most `1 - top_p` dropped (the most likely token
    always kept), and one `torch.multinomial` draw per sequence from the softmax of what is left.

    The defaults are HF's (`GenerationConfig`'s: temperature 1, top-k 50, top-p 1); `top_k=0` and `top_p=1` turn
    those filters off, as in HF.

    Raises:
        SamplingError: temperature <= 0, top_k < 0, or top_p outside (0, 1].
    """

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise SamplingError(f"temperature must be > 0, got {self.temperature}; for greedy decoding leave "
                                "do_sample off (1 keeps the model's distribution, below 1 sharpens it)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}; 0 keeps every token, 1 is "
                                "greedy")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}; 1 keeps every token")

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """`[batch, vocab]` logits -> the scores the draw's softmax takes (dropped tokens at -inf), in HF's order."""
        scores = logits.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k != 0:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ascending, order = torch.sort(scores, descending=False)
            drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            drop[..., -1:] = False  # the most likely token stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores

    def draw(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One token per sequence: `[batch]`, one `torch.multinomial` call over the batch."""
        return torch.multinomial(self.warp(logits).softmax(dim=-1), 1, generator=generator).squeeze(1)


def sampling_options(do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None,
                     seed: int | None) -> Sampling | None:
    """The `Sampling` of `generate`'s options (None: greedy); options left out take HF's defaults."""
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if not do_sample:
        passed = [name for name, value in {**given, "seed": seed}.items() if value is not None]
        if passed:
            raise SamplingError(f"{', '.join(passed)} only apply when sampling: pass do_sample=True, or leave them "
                                "out for greedy decoding")
        return None
    return Sampling(**{name: value for name, value in given.items() if value is not None})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The package's metadata, after checking that the file is whole, uncorrupted and built by this torch.

    Raises:
        PackageTruncatedError, PackageCorruptError, PackageVersionError.
    """
    path = Path(path)
    with path.open("rb") as file:
        file.seek(0, io.SEEK_END)
        size = file.tell()
        file.seek(max(0, size - 66_000))  # the directory's end record sits in the last 64 KiB + 22 bytes
        tail = file.read()
    if _END_OF_ZIP not in tail:
        raise PackageTruncatedError(
            f"{path} ({size} bytes) ends before its zip directory: the file is truncated (a partial download or "
            "copy); copy the whole package again"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
            if bad is not None:
                raise PackageCorruptError(f"{path}: record {bad} fails its checksum; the file is corrupted")
            name = _root(archive) + METADATA
            if name not in archive.namelist():
                raise PackageCorruptError(f"{path} is a PT2 archive without {METADATA}: not built by hae_fx.export")
            metadata = json.loads(archive.read(name))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise PackageCorruptError(f"{path} is corrupted or not an hae_fx package: {error}") from error
    check_versions(metadata, path)
    return metadata


def check_versions(metadata: dict[str, Any], path: str | Path) -> None:
    """Refuse a package of another layout version or built by another torch."""
    if metadata.get("format") != FORMAT_VERSION:
        raise PackageVersionError(
            f"{path} has package format {metadata.get('format')!r}, this runner reads format {FORMAT_VERSION}; "
            "export the model again with the hae_fx that ships this runner"
        )
    if metadata.get("torch_version") != torch.__version__:
        raise PackageVersionError(
            f"{path} was compiled by torch {metadata.get('torch_version')}, this process runs torch "
            f"{torch.__version__}; its native code is bound to the libtorch it was built with: export it again "
            f"under torch {torch.__version__}, or run it under torch {metadata.get('torch_version')}"
        )


def _root(archive: zipfile.ZipFile) -> str:
    """The archive's root folder (PT2 archives keep every record under one folder named after the file)."""
    return archive.namelist()[0].split("/")[0] + "/"


class Runner:
    """Loads a package's two programs once and generates from prompts, greedily or by sampling.

    Args:
        path: the `.pt2` file.
        expect_config: the eviction config's key (`PolicyConfig.key()`) the caller requires; None accepts any.
        device: where to run: the device the package was compiled for by default.

    Raises:
        PackageError: see `read_metadata`; `PackageConfigError` when `expect_config` differs.
    """

    def __init__(self, path: str | Path, expect_config: str | None = None, device: str | None = None) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        if expect_config is not None and json.loads(expect_config) != json.loads(self.metadata["config"]):
            raise PackageConfigError(
                f"{self.path} was built for the eviction config {self.metadata['config']}, not the expected "
                f"{expect_config}; export the model again with the config you need"
            )
        self.device = torch.device(device or self.metadata["device"])
        from torch._inductor.package import load_package

        self.programs = {name: load_package(str(self.path), name) for name in PROGRAMS}
        self._load_weights()
        self.cache = [torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=self.device)
                      for spec in self.metadata["cache"]]

    def _load_weights(self) -> None:
        """Give both programs the package's weights, stored once and shared (`user_managed`: no copy)."""
        with zipfile.ZipFile(self.path) as archive:
            root = _root(archive)
            storages: dict[str, torch.Tensor] = {}
            for name in PROGRAMS:
                table = self.metadata["weights"][name]
                constants = {}
                for fqn, (file, shape, stride, offset) in table.items():
                    if file not in storages:
                        data = archive.read(f"{root}data/weights/{file}")
                        storages[file] = torch.load(io.BytesIO(data), weights_only=True).to(self.device)
                    constants[fqn] = storages[file].as_strided(shape, stride, offset)
                if constants:
                    self.programs[name].load_constants(constants, check_full_update=True, user_managed=True)

    def reset(self) -> None:
        """Empty the cache: every tensor back to its initial value (free slots, zero scores)."""
        for tensor, spec in zip(self.cache, self.metadata["cache"], strict=True):
            tensor.fill_(spec["fill"])

    def check_prompt(self, input_ids: torch.Tensor, max_new_tokens: int) -> None:
        """Refuse a prompt the package was not built for, before anything runs."""
        meta = self.metadata
        if input_ids.dim() != 2 or input_ids.shape[0] != meta["batch"]:
            raise PromptError(f"input_ids must be [batch={meta['batch']}, tokens] (the package's batch), got "
                             f"{tuple(input_ids.shape)}; export again with example inputs of the batch you need")
        if not meta["min_prompt_len"] <= input_ids.shape[1] <= meta["max_prompt_len"]:
            raise PromptError(f"the prompt has {input_ids.shape[1]} tokens; the package takes "
                             f"{meta['min_prompt_len']} to {meta['max_prompt_len']} (export with a larger "
                             "max_prompt_len for longer prompts)")
        if meta["max_total_tokens"] is not None and input_ids.shape[1] + max_new_tokens > meta["max_total_tokens"]:
            raise PromptError(f"policy {meta['policy']!r} keeps every token: prompt {input_ids.shape[1]} + "
                             f"max_new_tokens {max_new_tokens} exceed its capacity {meta['max_total_tokens']}")

    def _image_input(self, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None
                     ) -> torch.Tensor | None:
        """The image input the package's prefill takes (`metadata["image_input"]`), checked against its shape."""
        expected = self.metadata["image_input"]
        given = {"pixel_values": pixel_values, "image_features": image_features}
        passed = [name for name, value in given.items() if value is not None]
        if passed != ([expected] if expected else []):
            raise PromptError(f"this package's prefill takes {expected or 'no image input'}, got "
                              f"{passed or 'none'}")
        if expected is None:
            return None
        image = given[expected]
        if list(image.shape) != self.metadata["image_shape"]:
            raise PromptError(f"{expected} of shape {list(image.shape)}; the package was exported for "
                              f"{self.metadata['image_shape']} (the same images per prompt)")
        return image

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty the cache and run the prompt: `(last position's logits [batch, vocab], its positions [batch, 1])`.
        `decode` continues from there (`generate` runs both); a prompt the package was not built for raises
        `PromptError`."""
        meta = self.metadata
        self.check_prompt(input_ids, max_new_tokens=0)
        image = self._image_input(pixel_values, image_features)
        device = self.device
        # contiguous: the programs were compiled for contiguous inputs
        input_ids = input_ids.to(device).contiguous()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device).contiguous()
        self.reset()
        kept = torch.empty(0, min(input_ids.shape[1], meta["kept_len_max"]), device=device)
        prefill_inputs = [input_ids, attention_mask, kept, self.cache]
        if image is not None:
            prefill_inputs.append(image.to(device, getattr(torch, meta["image_dtype"])).contiguous())
        logits = self.programs["prefill"](*prefill_inputs)
        return logits, (attention_mask.long().sum(-1, keepdim=True) - 1).clamp_min(0)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One decode step: `tokens [batch]` at `position [batch, 1]` into the cache; the next logits."""
        return self.programs["decode"](tokens[:, None].to(self.device).contiguous(), position, self.cache)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32,
                 image_features: torch.Tensor | None = None, *, do_sample: bool = False,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> torch.Tensor:
        """Tokens `[batch, prompt + new]`: the prompt followed by up to `max_new_tokens` new tokens (fewer when every
        sequence has emitted an end-of-sequence token; finished sequences are padded).

        Rows of a batch are left-padded (`attention_mask` 0 on padding), as HF's generate takes them. Greedy by
        default; `do_sample=True` samples as HF's `generate(do_sample=True, temperature=, top_k=, top_p=)` does
        (`Sampling`), from one `torch.Generator` on the runner's device seeded once with `seed` (a random seed
        when None), one multinomial draw over the batch per new token: with a seed, the draws are those of HF's
        generate after `torch.manual_seed(seed)`.

        Raises:
            PromptError: a prompt the package was not built for.
            SamplingError: sampling options out of range, or given without `do_sample=True`.
        """
        meta = self.metadata
        sampling = sampling_options(do_sample, temperature, top_k, top_p, seed)
        self.check_prompt(input_ids, max_new_tokens)
        generator = None
        if sampling is not None:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        logits, position = self.prefill(input_ids, attention_mask, pixel_values, image_features)
        eos = torch.tensor(meta["eos_token_id"] or [], dtype=torch.long, device=self.device)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=self.device)
        tokens = [input_ids.to(self.device)]
        for step in range(max_new_tokens):
            next_tokens = logits.argmax(dim=-1) if sampling is None else sampling.draw(logits, generator)
            if eos.numel():
                next_tokens = torch.where(unfinished, next_tokens, meta["pad_token_id"] or 0)
                unfinished = unfinished & ~torch.isin(next_tokens, eos)
            tokens.append(next_tokens[:, None])
            if step == max_new_tokens - 1 or (eos.numel() and not bool(unfinished.any())):
                break
            position = position + 1
            logits = self.decode(next_tokens, position)
        return torch.cat(tokens, dim=1)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """`--temperature`, `--top-k`, `--top-p`, `--seed`: any of them samples (`Sampling`); none decodes greedily."""
    group = parser.add_argument_group("sampling (any of these samples, as HF's generate(do_sample=True); "
                                      "none: greedy)")
    group.add_argument("--temperature", type=float, help="divides the logits (default 1)")
    group.add_argument("--top-k", type=int, help="keep the k most likely tokens (default 50; 0: all)")
    group.add_argument("--top-p", type=float, help="keep the most likely tokens up to this probability (default 1)")
    group.add_argument("--seed", type=int, help="seeds the draws: the same seed, the same tokens (default: random)")


def sampling_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """`generate`'s sampling keywords from `add_sampling_arguments`' options."""
    options = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "seed")}
    return {"do_sample": any(value is not None for value in options.values()), **options}


def main(argv: Sequence[str] | None = None) -> None:
    """`python deploy_runner.py model.pt2 --prompt-ids 1 5 9 [--max-new-tokens 16] [--top-p 0.9 --seed 0]`: print
    the first sequence's new token ids."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--prompt-ids", type=int, nargs="+", required=True, help="one prompt's token ids")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    runner = Runner(args.package)
    prompt = torch.tensor([args.prompt_ids] * runner.metadata["batch"])
    try:
        out = runner.generate(input_ids=prompt, max_new_tokens=args.max_new_tokens, **sampling_arguments(args))
    except SamplingError as error:
        parser.error(str(error))
    print(" ".join(str(token) for token in out[0, prompt.shape[1]:].tolist()))


if __name__ == "__main__":
    main()
