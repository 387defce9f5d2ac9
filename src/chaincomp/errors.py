"""Error types. Every user-facing error names the offending key and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable


class ChaincompError(Exception):
    """Base class of the errors chaincomp raises on bad input."""


class ConfigError(ChaincompError, ValueError):
    """A configuration value is invalid.

    The message always has the form ``<key>: <problem>; allowed: <allowed values>``.
    """

    def __init__(self, key: str, problem: str, allowed: str | Iterable[object] | None = None):
        self.key = key
        self.problem = problem
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.allowed = allowed
        msg = f"{key}: {problem}"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)


class DataError(ChaincompError, RuntimeError):
    """Data could not be found or decoded. The message says which key/file and how to fix it."""


def check_keys(values: Iterable[str], known: Iterable[str], prefix: str) -> None:
    """The one unknown-key check of every config section: raise :class:`ConfigError` naming
    ``<prefix>.<first unknown key>`` (sorted) and the known keys."""
    allowed = sorted(known)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", "unknown key", allowed)
