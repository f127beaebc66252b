"""Errors only evaluation raises. The shared ones (InputError, ConfigError, ...) are in core/errors.py."""

from __future__ import annotations

from chatvec.core.errors import ChatvecError


class BenchmarkDataError(ChatvecError):
    """A benchmark file is malformed (names the file, line and field)."""


class NewerSchemaError(ChatvecError):
    """A results file was written by a newer chatvec, with a schema this one cannot read."""
