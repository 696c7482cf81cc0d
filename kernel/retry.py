"""The one retry policy type, used by jobs (``worker.*``) and by sends (``dispatch.*``)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field


def _always_retryable(_error: object) -> bool:
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failed attempt is tried again.

    Attempt ``n`` (1-based) that failed is retried after
    ``min(cap_s, base_s * 2 ** (n - 1))`` seconds, shortened by up to ``jitter`` (a
    fraction, 0..1) at random so that many rows failing together do not retry together.
    After ``max_attempts`` attempts, or at once for an error ``permanent`` says a retry
    cannot fix (a refused object, an unreadable input), the attempt is final.
    """

    max_attempts: int
    base_s: float
    cap_s: float = math.inf
    jitter: float = 0.0
    permanent: Callable[[object], bool] = field(default=_always_retryable, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError("retry delays must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be a fraction 0..1, got {self.jitter}")

    def delay_s(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        base = min(self.cap_s, self.base_s * 2 ** max(0, attempts - 1))
        if self.jitter:
            base *= (rng or random).uniform(1.0 - self.jitter, 1.0)
        return base

    def next_delay_s(
        self, attempts: int, error: object = None, counted: int | None = None
    ) -> float | None:
        """The delay before the next attempt, or None when ``attempts`` was the last one
        (attempts used up, or ``error`` is one a retry cannot fix). ``counted``: how many
        of ``attempts`` count toward ``max_attempts`` (default all; the delay still grows
        with every attempt)."""
        counted = attempts if counted is None else counted
        if self.permanent(error) or counted >= self.max_attempts:
            return None
        return self.delay_s(attempts)
