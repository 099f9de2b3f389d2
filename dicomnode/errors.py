"""One exception hierarchy for the whole package.

Every error that reaches a user carries a one-line message (``str(exc)``) fit to print as is.
Retryable and permanent failures are explicit so the pipeline never has to guess.
"""

from __future__ import annotations


class DicomnodeError(Exception):
    """Base of every error raised on purpose by dicomnode."""


class InputError(DicomnodeError):
    """The input cannot be read or makes no sense (corrupt file, undecodable pixels, bad geometry).

    ``dicomnode analyze`` exits 1 with this message.
    """


class NotQualifyingError(DicomnodeError):
    """The input is readable but is not something we measure (MR, localizer, head CT, dose report...).

    ``dicomnode analyze`` exits 2 with this message.
    """


class AnalysisError(DicomnodeError):
    """The measurement itself failed (spine not found, no usable vertebra)."""


class ConfigError(DicomnodeError):
    """Configuration is invalid; the message names the field."""


class RetryableError(DicomnodeError):
    """A transient failure (peer down, timeout): try again later."""


class PermanentError(DicomnodeError):
    """A failure that retrying will not fix (association rejected, SOP class refused, HTTP 4xx)."""


class BundleError(DicomnodeError):
    """A model bundle is missing, tampered with, or cannot serve this series."""
