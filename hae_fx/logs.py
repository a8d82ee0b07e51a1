"""Where hae_fx's log lines go: the `hae_fx` logger, a handler that writes between progress bars, `HAE_FX_LOG`.

hae_fx reports through `logging.getLogger("hae_fx")`: every compile at INFO (announced before it starts, timed
after), what the passes found at DEBUG. A library leaves handlers to the application, so by default Python shows
only warnings. `configure("INFO")`, `HAE_FX_LOG=INFO` (or `DEBUG`) in the environment before `import hae_fx`, or
the `hae-fx` command line (INFO unless `--quiet`) attach one handler that prints them on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm import tqdm

#: environment variable naming the level `import hae_fx` shows the `hae_fx` logger at (e.g. `HAE_FX_LOG=DEBUG`)
LOG_ENV = "HAE_FX_LOG"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

logger = logging.getLogger("hae_fx")


class _ProgressAwareHandler(logging.Handler):
    """Writes each record to stderr through `tqdm.write`, which clears and redraws a running progress bar, so a
    compile announced in the middle of a bar does not garble it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a failing handler reports itself, never raises into the caller
            self.handleError(record)


def parse_level(name: str) -> int:
    """The `logging` level called `name` (any case); ValueError naming the accepted ones otherwise."""
    if name.upper() not in LEVELS:
        raise ValueError(f"unknown log level {name!r}; use one of {', '.join(LEVELS)}")
    return logging.getLevelName(name.upper())


def configure(level: int | str) -> None:
    """Print the `hae_fx` logger's records at `level` and above on stderr, as `[hae_fx] message`.

    Idempotent: a second call replaces the handler the first one attached. The records stop at this handler
    (`propagate = False`), so an application's root handler does not print them twice.
    """
    level = parse_level(level) if isinstance(level, str) else level
    for handler in [h for h in logger.handlers if isinstance(h, _ProgressAwareHandler)]:
        logger.removeHandler(handler)
    handler = _ProgressAwareHandler()
    handler.setFormatter(logging.Formatter("[hae_fx] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def configure_from_environment() -> None:
    """`configure($HAE_FX_LOG)` when the variable is set; a bad value warns and changes nothing."""
    name = os.environ.get(LOG_ENV)
    if not name:
        return
    try:
        configure(name)
    except ValueError as error:
        warnings.warn(f"{LOG_ENV}: {error}", stacklevel=2)
