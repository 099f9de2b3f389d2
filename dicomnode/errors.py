"""One exception hierarchy for the whole package.

Every error that reaches a user carries a one-line message (``str(exc)``) fit to print as is.
Retryable and permanent failures are explicit so the pipeline never has to guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True)
class RuleProblem:
    """One problem of a rules text, located as data (rule name or number, condition number, field, line).

    ``message`` is the problem's own text, prefixed with where it is (``rule 'abd' condition 2: ...``).
    """

    message: str
    rule: str | None = None
    condition: int | None = None
    field: str | None = None
    line: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "rule": self.rule,
            "condition": self.condition,
            "field": self.field,
            "line": self.line,
        }


class RulesError(ConfigError):
    """Routing rules that do not validate; ``problems`` locates each one as data, the message lists them.

    Parameters
    ----------
    where
        ``rules`` or ``rules (FILE)``, the message's prefix.
    problems
        At least one problem.
    """

    def __init__(self, where: str, problems: Sequence[RuleProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__(f"{where}: " + "; ".join(p.message for p in self.problems))


class RetryableError(DicomnodeError):
    """A transient failure (peer down, timeout): try again later."""


class PermanentError(DicomnodeError):
    """A failure that retrying will not fix (association rejected, SOP class refused, HTTP 4xx)."""


class BundleError(DicomnodeError):
    """A model bundle is missing, tampered with, or cannot serve this series."""
