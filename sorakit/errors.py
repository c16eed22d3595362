"""Errors every layer raises. The CLI turns a SorakitError into one line on stderr and exit 1.

The contract (docs/errors.md): a ``SorakitError``'s message names the input and what is wrong
with it; ``hint`` says what to do, where that helps. Invalid arguments are also the built-in
type Python code expects: ``InvalidArgument`` is a ``ValueError``, ``InvalidArgumentType`` a
``TypeError`` (and an ``InvalidArgument``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class SorakitError(Exception):
    """A user-facing error: the message names what is wrong and, where possible, the fix."""

    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class InvalidArgument(SorakitError, ValueError):
    """An argument or option has a value outside what it accepts (checked before any work)."""


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument has the wrong type (a str where a number goes, bytes for a prompt, ...)."""


class OutputError(InvalidArgument):
    """An output path cannot be written (no parent directory, a directory, unwritable, unknown extension)."""


class NumericalError(SorakitError, ArithmeticError):
    """A computation produced NaN or infinity (e.g. the latent during sampling)."""


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
