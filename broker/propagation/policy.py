"""How a delivery's outcome is judged, and when it is tried again: pure functions."""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

__all__ = [
    "Backoff",
    "Failure",
    "Verdict",
    "deletion_limit",
    "judge",
    "retry_after_seconds",
    "too_large",
]


class Verdict(enum.Enum):
    TRANSIENT = "transient"
    """May pass by itself: retried with backoff."""
    PERMANENT = "permanent"
    """Will not pass by retrying: dead-lettered for a person."""


# Statuses that may pass by themselves (RFC 7231 and RFC 6585); everything else 4xx is final.
_TRANSIENT = frozenset({408, 425, 429, 500, 502, 503, 504})

_ADVICE = {
    400: "the peer rejected the request as invalid; check the attribute values and the peer's schema",
    401: "the peer refused the broker's credential; check its token (`broker domain show DOMAIN` names where it is kept: --token-env or --token-file) and `broker domain test DOMAIN`",
    403: "the peer does not allow the broker this operation; check the credential's permissions",
    404: "the peer has no such resource or endpoint; check the domain's --scim-url",
    409: "the peer holds a conflicting resource; resolve it there, or set the domain's on_conflict to link",
    413: "the request is too large for the peer",
}


@dataclass
class Failure(Exception):
    """A delivery that did not succeed: why, in words a person can act on, and what the peer said."""

    verdict: Verdict
    reason: str
    status: int | None = None
    scim_error: dict[str, Any] | None = None
    retry_after: float | None = None
    peer_fault: bool = True
    """False when the fault is not the peer's (home unreachable): the peer is not marked failing."""
    conflict_since: float | None = None
    """For a 409: when the peer first refused the delivery so (epoch seconds), kept across tries."""

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": self.verdict.value, "reason": self.reason}
        if self.status is not None:
            out["status"] = self.status
        if self.conflict_since is not None:
            out["conflict_since"] = self.conflict_since
        if self.scim_error is not None:
            out["peer_error"] = self.scim_error
        return out


def judge(status: int, body: Any, headers: Mapping[str, str], what: str) -> Failure:
    """The failure a peer's non-success answer to ``what`` (``"POST /Users"``) is."""
    error = body if isinstance(body, dict) else None
    detail = error.get("detail") if error else None
    if 300 <= status < 400 and status != 304:
        # Never followed (the request would go, credential and password with it, wherever the
        # peer points), and retrying gets the same answer: a person corrects the URL.
        location = (headers.get("Location") or "")[:200]
        return Failure(
            Verdict.PERMANENT,
            f"{what}: HTTP {status} redirect"
            + (f" to {location}" if location else "")
            + "; the broker never follows redirects: if the peer really moved, re-add the "
            "domain with that address as --scim-url (or re-subscribe with it as --endpoint), "
            "then retry the dead letters",
            status,
            error,
        )
    verdict = Verdict.TRANSIENT if status in _TRANSIENT or status >= 500 else Verdict.PERMANENT
    advice = _ADVICE.get(status, "the peer refused it" if status < 500 else "the peer failed")
    reason = f"{what}: HTTP {status}" + (f" ({detail})" if detail else "") + f"; {advice}"
    return Failure(
        verdict,
        reason,
        status,
        error,
        retry_after_seconds(headers.get("Retry-After")),
    )


def unanswered(what: str, exc: BaseException, by: str = "the peer") -> Failure:
    """The failure of ``what`` that got no answer (a connection refused or cut, a timeout):
    retried until one comes."""
    return Failure(
        Verdict.TRANSIENT,
        f"{what}: {by} did not answer ({type(exc).__name__}); retrying until it does",
    )


def too_large(status: int, limit: int, headers: Mapping[str, str], what: str) -> Failure:
    """The failure an answer to ``what`` longer than ``limit`` bytes is (left unread). A status
    that may pass by itself (5xx, 429) is retried as that status is; any other is a dead letter:
    a peer answering one request with that much is broken or hostile, and asking again gets the
    same (a write it answered so may have been made: a retry of a create may then meet 409)."""
    if status in _TRANSIENT or status >= 500:
        return Failure(
            Verdict.TRANSIENT,
            f"{what}: HTTP {status} with an answer over {limit} bytes, left unread; retrying",
            status,
            None,
            retry_after_seconds(headers.get("Retry-After")),
        )
    return Failure(
        Verdict.PERMANENT,
        f"{what}: HTTP {status} with an answer over {limit} bytes, left unread (a SCIM answer "
        "to one request is far smaller): check the peer, or raise [propagation] "
        "peer_max_answer_bytes if its answers really are that large, then retry the dead letter",
        status,
    )


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, capped; a quarantined peer waits ``quarantine``."""

    base: float = 1.0
    ceiling: float = 60.0
    quarantine: float = 120.0

    def delay(
        self,
        attempts: int,
        *,
        retry_after: float | None = None,
        quarantined: bool = False,
        rng: random.Random | None = None,
    ) -> float:
        """Seconds to wait before attempt ``attempts + 1``; never less than ``Retry-After``."""
        if quarantined:
            wait = self.quarantine
        else:
            cap = min(self.ceiling, self.base * 2 ** min(attempts, 32))
            wait = cap / 2 + (rng or random).uniform(0, cap / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, max(self.ceiling, self.quarantine)))
        return wait


def deletion_limit(accounts: int, configured: int | None) -> int:
    """The most deprovisionings one reconciliation, sweep or initial sync may make without a
    person's confirmation: the configured ``[propagation] deletion_threshold``, else 5% of the
    accounts or 500, whichever is smaller (Microsoft Entra's accidental-deletion threshold), and
    never less than one, so that a single deletion in a small federation is not held."""
    if configured is not None:
        return configured
    return max(1, min(accounts * 5 // 100, 500))
