"""Per-tenant token buckets, sized by plan. Each tenant has its own bucket, so one tenant's
flood is refused with RESOURCE_EXHAUSTED without taking capacity from anyone else."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

DEFAULT_LIMITS = {"basic": (50.0, 100.0), "professional": (200.0, 400.0), "enterprise": (1000.0, 2000.0)}


@dataclass
class _Bucket:
    rate: float
    burst: float
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, limits: dict[str, tuple[float, float]] | None = None) -> None:
        self._limits = limits or DEFAULT_LIMITS
        self._buckets: dict[str, _Bucket] = {}

    @classmethod
    def from_setting(cls, text: str) -> RateLimiter:
        """`{"basic": [rate_per_second, burst], ...}`; missing plans keep their defaults."""
        limits = dict(DEFAULT_LIMITS)
        for plan, (rate, burst) in (json.loads(text) if text else {}).items():
            limits[plan] = (float(rate), float(burst))
        return cls(limits)

    def try_acquire(self, tenant_id: str, plan: str) -> float:
        """0 when the call may go ahead, else the seconds until a token is available."""
        rate, burst = self._limits.get(plan, self._limits["basic"])
        now = time.monotonic()
        bucket = self._buckets.get(tenant_id)
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[tenant_id] = _Bucket(rate, burst, burst, now)
        bucket.tokens = min(bucket.burst, bucket.tokens + (now - bucket.updated) * bucket.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / bucket.rate
