"""When the ordering leader next tries to obtain a certificate: pure, clock passed in.

A certificate is ordered when there is none, when the one held names other names than wanted,
and `renew_before` ahead of its expiry (default 30 days, as the platform's seed does). A failed
attempt is retried with exponential backoff (`retry_base` doubling up to `retry_max`), and the
failures in a row are kept so a metric and the overview show that renewal is failing while the
certificate held keeps serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.cert_records import CertificateRecord, RenewalStatus
from geomesh.errors import ValidationError

DAY = 86400.0


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    renew_before: float = 30 * DAY   # seconds ahead of not_after
    retry_base: float = 30.0         # first retry after a failure
    retry_max: float = 3600.0        # backoff cap

    def __post_init__(self) -> None:
        if self.renew_before < 0:
            raise ValidationError("renew_before", "is negative")
        if not 0 < self.retry_base <= self.retry_max:
            raise ValidationError("retry_base", "must be > 0 and at most retry_max")

    def backoff(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (1 = the first)."""
        return min(self.retry_max, self.retry_base * 2 ** min(max(failures - 1, 0), 30))


def due_at(record: CertificateRecord | None, status: RenewalStatus | None, wanted: tuple[str, ...],
           policy: RenewalPolicy) -> float:
    """Unix time of the next attempt (0 = now)."""
    if status is not None and status.failures > 0:
        return status.renew_at  # a retry is scheduled
    if record is None or tuple(sorted(record.dns_names)) != tuple(sorted(wanted)):
        return 0.0
    return record.not_after - policy.renew_before


def after_success(name: str, record: CertificateRecord, policy: RenewalPolicy) -> RenewalStatus:
    return RenewalStatus(name, renew_at=record.not_after - policy.renew_before)


def after_failure(name: str, status: RenewalStatus | None, now: float, error: str,
                  policy: RenewalPolicy) -> RenewalStatus:
    failures = (status.failures if status is not None else 0) + 1
    return RenewalStatus(name, renew_at=now + policy.backoff(failures), failures=failures,
                         last_error=error[:500])
