"""hae_fx: Hierarchical Adaptive Eviction for HF (multimodal) decoders, as a torch.compile transform.

    import hae_fx
    model = hae_fx.transform(model, hae_fx.HAEConfig(policy="hae", capacity=256, bin_size=64))
    out = model.generate(**inputs, max_new_tokens=100, return_dict_in_generate=True)
    out.past_key_values.nbytes     # fixed, whatever the prompt or generation length
    print(hae_fx.report(out.past_key_values))   # kept visual/text tokens, bin, KV bytes vs a full cache

    hae_fx.export(model, inputs, "model.pt2", hae_fx.HAEConfig(capacity=256))   # one AOTInductor package
    tokens = hae_fx.load("model.pt2").generate(**inputs, max_new_tokens=100)  # runs without hae_fx too
"""

from hae_fx import (
    logs,
    ops,  # noqa: F401  (registers torch.ops.hae.* and their Inductor decompositions)
)
from hae_fx.cache import HAECache
from hae_fx.errors import (
    HAECapacityError,
    HAEConfigError,
    HAEError,
    HAEPackageConfigError,
    HAEPackageCorruptError,
    HAEPackageError,
    HAEPackageTruncatedError,
    HAEPackageVersionError,
    HAESiteError,
    HAETensorParallelError,
    HAEUnsupportedModelError,
    HAEWeightLayoutError,
)
from hae_fx.export import export
from hae_fx.inspect import ModelInspection, inspect
from hae_fx.loading import load
from hae_fx.policies.hae import HAEConfig
from hae_fx.report import CacheReport, report
from hae_fx.transform import transform

logs.configure_from_environment()  # HAE_FX_LOG=INFO shows compiles as they start

__all__ = [
    "CacheReport",
    "HAECache",
    "HAECapacityError",
    "HAEConfig",
    "HAEConfigError",
    "HAEError",
    "HAEPackageConfigError",
    "HAEPackageCorruptError",
    "HAEPackageError",
    "HAEPackageTruncatedError",
    "HAEPackageVersionError",
    "HAESiteError",
    "HAETensorParallelError",
    "HAEUnsupportedModelError",
    "HAEWeightLayoutError",
    "ModelInspection",
    "export",
    "inspect",
    "load",
    "report",
    "transform",
]
