"""Errors every layer raises. The CLI turns a SorakitError into one line on stderr and exit 1."""

from __future__ import annotations


class SorakitError(Exception):
    """A user-facing error: the message names what is wrong and, where possible, the fix."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class CheckpointError(SorakitError):
    """A checkpoint is missing, in an unknown layout, unsafe, or does not match the preset."""


class BundleError(SorakitError):
    """A bundle is malformed, incomplete, corrupt or of an unknown format version."""


class VerificationError(SorakitError):
    """A numerical check failed (export parity, pass parity, quality gate)."""


class BudgetError(SorakitError):
    """A memory budget is too small for the work asked of it."""


class ProviderError(SorakitError):
    """An execution provider is unavailable or would fall back in strict mode."""
