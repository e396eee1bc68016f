"""The export's expected-failure exception (bad inputs, parity, pyfunc check)."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An expected export failure (bad inputs, parity, pyfunc check); the registry is unchanged."""
