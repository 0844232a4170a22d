"""``broker domain test``: reach a peer's SCIM service with its credential and say what works.

Three GETs, none carrying anything of the federation's (no ID, no body): ``/ServiceProviderConfig``
(reachable, speaks SCIM, what it supports), ``/Schemas`` (it describes its resources) and
``/Users?count=1&attributes=id`` (the broker's token is accepted where it must be: many
services answer the first two to anyone). What each answer means is decided by the pure
:func:`assess`; :func:`probe` makes the calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from broker.credentials import CredentialProblem, describe_ref, read_credential
from broker.errors import InvalidValueError
from broker.http import AnswerTooLarge, exchange, is_redirect

if TYPE_CHECKING:
    from broker.domains import Domain

__all__ = ["Check", "ProbeReport", "assess", "probe", "probe_domain"]

STEPS = (
    ("service", "/ServiceProviderConfig", None),
    ("schemas", "/Schemas", None),
    ("auth", "/Users", {"count": "1", "attributes": "id"}),
)
"""(check, path, query) in the order they run."""

MAX_ANSWER = 1 << 20
"""The longest answer a probe reads (1 MiB): a peer's configuration and schemas fit many times
over; a longer one is refused unread, so a hostile peer cannot fill the broker's memory."""


@dataclass(frozen=True)
class Check:
    name: str
    """credential, service (/ServiceProviderConfig), schemas (/Schemas) or auth."""
    ok: bool
    detail: str
    waits: bool = False
    """A failure that makes no delivery a dead letter: one a delivery retries by itself (no
    answer, a 5xx, a token file not there yet), or one deliveries do not meet (no schemas
    described); any other (401, 403, 404, a redirect) makes the peer's deliveries dead letters."""


# Answers a delivery retries by itself (as broker/propagation/policy.py judges them).
_PASSING = frozenset({408, 425, 429})


@dataclass(frozen=True)
class ProbeReport:
    domain: str
    url: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def deliveries_wait(self) -> bool:
        """Whether the peer's deliveries wait (and retry) while it fails so, rather than
        become dead letters: its credential cannot be read yet (nothing is sent), or every
        failure is one a delivery retries."""
        failed = [check for check in self.checks if not check.ok]
        if any(check.name == "credential" and check.waits for check in failed):
            return True
        return all(check.waits for check in failed)

    def lines(self) -> list[str]:
        """What ``broker domain test`` prints: one line per check, then the verdict."""
        out = [f"testing domain {self.domain} at {self.url}"]
        out += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<10} {c.detail}" for c in self.checks]
        out.append(
            f"domain {self.domain}: the broker can reach it and its credential works"
            if self.ok
            else f"domain {self.domain}: NOT usable as it is; fix what FAIL says, then "
            f"`broker domain test {self.domain}` again"
        )
        return out

    def json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "url": self.url,
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


_REFUSED = {
    401: "the peer refused the broker's token (401): check the token and where it is kept "
    "(--token-env or --token-file)",
    403: "the peer accepted the token but forbids this (403): ask the peer for read and write "
    "access to Users and Groups",
    404: "nothing there (404): check --scim-url (the SCIM base, ending before /Users)",
}


def assess(name: str, status: int | None, body: Any, *, error: str = "") -> Check:
    """What one answer says. ``status`` None: no answer (``error`` says why)."""
    if status is None:
        return Check(
            name, False, f"no answer: {error}; check --scim-url and the network", waits=True
        )
    if is_redirect(status):
        return Check(
            name, False, f"redirect ({status}), never followed: set --scim-url to where it points"
        )
    if status in _REFUSED:
        return Check(name, False, _REFUSED[status])
    if status != 200 or not isinstance(body, dict):
        waits = status >= 500 or status in _PASSING
        return Check(name, False, f"answered HTTP {status} without a SCIM document", waits)
    if name == "service":
        return Check(name, True, "SCIM service found; supports " + _features(body))
    if name == "schemas":
        count = len(body.get("Resources") or [])
        # No schemas described hinders no delivery (they write the core schema's attributes).
        described = f"{count} schemas described" if count else "no schemas"
        return Check(name, count > 0, described, waits=True)
    return Check(name, True, "the peer accepts the broker's token")


def _features(config: Mapping[str, Any]) -> str:
    names = ("patch", "bulk", "filter", "etag")
    supported = [n for n in names if isinstance(config.get(n), dict) and config[n].get("supported")]
    return ", ".join(supported) if supported else "none of patch, bulk, filter, etag"


async def probe(
    session: aiohttp.ClientSession, domain: str, scim_url: str, credential_ref: str | None
) -> ProbeReport:
    """The checks against the peer at ``scim_url``, with the credential ``credential_ref``
    points at (the calls go on without one when it cannot be read, to show what else works)."""
    checks = []
    try:
        token = read_credential(credential_ref)
        checks.append(
            Check("credential", True, f"read from {describe_ref(credential_ref)}")
            if token
            else Check("credential", False, "none: give one with --token-env or --token-file")
        )
    except CredentialProblem as exc:
        token = None
        checks.append(Check("credential", False, str(exc), waits=not exc.permanent))
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    base = scim_url.rstrip("/")
    for name, path, params in STEPS:
        try:
            answer = await exchange(
                session, "GET", base + path, auth=auth, params=params, limit=MAX_ANSWER
            )
        except AnswerTooLarge:
            checks.append(
                Check(
                    name,
                    False,
                    f"the answer is too large (over {MAX_ANSWER} bytes), left unread: a SCIM "
                    "service answers this in a few kilobytes; check --scim-url",
                )
            )
            continue
        except (aiohttp.ClientError, TimeoutError) as exc:
            checks.append(assess(name, None, None, error=type(exc).__name__))
            continue
        checks.append(assess(name, answer.status, answer.json_or_none()))
    return ProbeReport(domain, scim_url, tuple(checks))


async def probe_domain(domain: Domain, seconds: float = 15.0) -> ProbeReport:
    """:func:`probe` of a stored domain over a session of its own (the admin API's and the
    console's test); InvalidValueError when the domain has no SCIM URL to test."""
    if not domain.scim_url:
        raise InvalidValueError(
            f"domain {domain.id} has no SCIM URL: nothing to test (it calls the broker; "
            "the broker does not call it)"
        )
    limit = aiohttp.ClientTimeout(total=seconds)
    async with aiohttp.ClientSession(timeout=limit) as session:
        return await probe(session, domain.id, domain.scim_url, domain.credential_ref)
