"""`hae_fx.load(path)`: a runner for a package `hae_fx.export` built, its refusals raised as `hae_fx` errors.

The runner is `hae_fx.deploy_runner.Runner`, the module that also runs packages where hae_fx is not installed;
this adds the `HAEError` classes and takes an `expect_config` as a config object. Loading a `.pt2` loads the
native code compiled into it: load trusted files only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from hae_fx import deploy_runner
from hae_fx.config import PolicyConfig
from hae_fx.errors import (
    HAECapacityError,
    HAEConfigError,
    HAEError,
    HAEPackageConfigError,
    HAEPackageCorruptError,
    HAEPackageTruncatedError,
    HAEPackageVersionError,
)

#: the runner's errors and the hae_fx error each becomes
_ERRORS: tuple[tuple[type[Exception], type[HAEError]], ...] = (
    (deploy_runner.PackageVersionError, HAEPackageVersionError),
    (deploy_runner.PackageTruncatedError, HAEPackageTruncatedError),
    (deploy_runner.PackageCorruptError, HAEPackageCorruptError),
    (deploy_runner.PackageConfigError, HAEPackageConfigError),
    (deploy_runner.PromptError, HAECapacityError),
    (deploy_runner.SamplingError, HAEConfigError),
)


@contextlib.contextmanager
def _hae_errors() -> Iterator[None]:
    try:
        yield
    except deploy_runner.PackageError as error:
        for raised, hae_error in _ERRORS:
            if isinstance(error, raised):
                raise hae_error(str(error)) from None
        raise


class PackageRunner(deploy_runner.Runner):
    """`deploy_runner.Runner` raising `hae_fx` errors: `HAEPackage*Error` when loading, `HAECapacityError` for a
    prompt the package was not built for, `HAEConfigError` for sampling options out of range."""

    def __init__(self, path: str | Path, expect_config: str | None = None, device: str | None = None) -> None:
        with _hae_errors():
            super().__init__(path, expect_config=expect_config, device=device)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        with _hae_errors():
            return super().prefill(input_ids, attention_mask, pixel_values, image_features)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32,
                 image_features: torch.Tensor | None = None, *, do_sample: bool = False,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> torch.Tensor:
        with _hae_errors():
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                    max_new_tokens=max_new_tokens, image_features=image_features,
                                    do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                    seed=seed)


def load(path: str | Path, *, expect_config: PolicyConfig | None = None, device: str | None = None) -> PackageRunner:
    """Load a package built by `hae_fx.export`; `.generate(input_ids=..., attention_mask=..., pixel_values=...,
    max_new_tokens=...)` decodes greedily (`image_features=` in place of `pixel_values` for a package exported
    with image features), or samples with `do_sample=True, temperature=, top_k=, top_p=, seed=` as HF's
    `generate(do_sample=True, ...)` does (`deploy_runner.Sampling`).

    Loading runs native code compiled into the package: load trusted files only.

    Args:
        path: the `.pt2` file.
        expect_config: refuse a package built for any other eviction config.
        device: where to run (the device the package was built for by default).

    Raises:
        HAEPackageTruncatedError, HAEPackageCorruptError: the file is incomplete or damaged.
        HAEPackageVersionError: built by another torch or package format.
        HAEPackageConfigError: built for another config than `expect_config`.
    """
    return PackageRunner(path, expect_config=None if expect_config is None else expect_config.key(), device=device)
