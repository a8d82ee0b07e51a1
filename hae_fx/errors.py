"""Exceptions hae_fx raises. Each message names the problem and the fix."""


class HAEError(Exception):
    """Base class of every error hae_fx raises on purpose."""


class HAEConfigError(HAEError, ValueError):
    """An `HAEConfig` field is out of range, or does not fit the model or the request."""


class HAESiteError(HAEError, RuntimeError):
    """The passes could not find the attention that reads an `HAECache` in a compiled graph."""


class HAEUnsupportedModelError(HAEError, TypeError):
    """The model family is not one hae_fx knows how to transform."""


class HAECapacityError(HAEError, ValueError):
    """The request does not fit the cache: a `full` cache too small, or a batch that differs from the cache's."""


class HAEMissingDependencyError(HAEError, ImportError):
    """An optional package a feature needs (a model checkpoint, a converter, a text corpus) is not installed."""


class HAEWeightLayoutError(HAEError, RuntimeError):
    """Parameters a compiled graph reads as one packed matmul (projection fusion) were replaced or moved since."""


class HAEPackageError(HAEError, RuntimeError):
    """An exported `.pt2` package that `hae_fx.load` refuses to run."""


class HAEPackageVersionError(HAEPackageError):
    """The package was built by another torch (its native code is bound to that libtorch) or package format."""


class HAEPackageTruncatedError(HAEPackageError):
    """The package file ends early (a partial download or copy)."""


class HAEPackageCorruptError(HAEPackageError):
    """The package's records fail their checksums, or the file is not an hae_fx package."""


class HAEPackageConfigError(HAEPackageError):
    """The package was built for another eviction config than the one expected."""


class HAETensorParallelError(HAEError, ValueError):
    """A tensor-parallel model whose ranks cannot keep one cache layout: a TP degree that does not divide the KV
    heads, ranks transformed with different policy configs, a cache built for another degree, or a policy whose
    decisions read sharded state that is not reduced across ranks."""
