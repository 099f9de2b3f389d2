"""Retry policy: exponential backoff with a cap and a maximum number of attempts (transient failures only)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicomnode.domain import DeliveryOutcome

if TYPE_CHECKING:
    from dicomnode.config import DeliverySettings
    from dicomnode.delivery.result import DeliveryResult


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a delivery again.

    Attempt ``n`` (1-based) that failed transiently is followed by a wait of
    ``min(base_delay_s * multiplier ** (n - 1), max_delay_s)`` seconds, optionally spread by ``jitter``
    (a fraction: 0.1 = up to 10 % shorter, so many deliveries failing together do not retry in lock-step).
    After ``max_attempts`` attempts, a transient failure becomes permanent. Permanent failures never retry.
    """

    max_attempts: int = 8
    base_delay_s: float = 30.0
    max_delay_s: float = 3600.0
    multiplier: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("need 0 <= base_delay_s <= max_delay_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    @classmethod
    def from_settings(cls, delivery: DeliverySettings, *, jitter: float = 0.1) -> RetryPolicy:
        """The policy of the ``delivery`` section of the settings."""
        return cls(
            max_attempts=delivery.max_attempts,
            base_delay_s=delivery.backoff_base_seconds,
            max_delay_s=delivery.backoff_max_seconds,
            jitter=jitter,
        )

    def delay_after(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError("attempt numbers start at 1")
        # Cap the exponent first: 2.0 ** 10_000 would overflow a float.
        exponent = min(attempt - 1, 64)
        delay = min(self.base_delay_s * self.multiplier**exponent, self.max_delay_s)
        if self.jitter:
            delay *= 1.0 - self.jitter * (rng or random).random()
        return delay

    def decide(self, result: DeliveryResult, attempt: int) -> tuple[DeliveryOutcome, float | None]:
        """Outcome to record after ``attempt`` produced ``result``, and the wait before the next attempt.

        Returns
        -------
        tuple
            ``(SUCCESS, None)``, ``(PERMANENT_FAILURE, None)`` (permanent error, or attempts exhausted) or
            ``(RETRYING, seconds)``.
        """
        if result.outcome is DeliveryOutcome.SUCCESS:
            return DeliveryOutcome.SUCCESS, None
        if result.outcome is DeliveryOutcome.PERMANENT_FAILURE or attempt >= self.max_attempts:
            return DeliveryOutcome.PERMANENT_FAILURE, None
        return DeliveryOutcome.RETRYING, self.delay_after(attempt)
