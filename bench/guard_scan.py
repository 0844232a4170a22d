"""The leak guard's scan of one domain-bound response: microseconds per scan of a page of 100
users as the proxy sends it (rewritten: minted IDs, no home ID left), before and after the exact
guard (issue 14).

"before" is the shape rule of the first guard (a whole-token scan of ``id_pattern``, as
``find_leak`` did it); "after" is what ``LeakGuard.check`` computes before its lookup (the
candidates, and the internal IDs in play), with the hex-run prefilter, and the same without it
(every position tried by the regular expression) for comparison.

    python bench/guard_scan.py [--users 100] [--repeat 200]
"""

from __future__ import annotations

import argparse
import re
import secrets
import time
import uuid
from collections.abc import Callable

import orjson

from broker.scim.guard import IdShape, Scan, find_in_play

SCIM_PATTERN = "[0-9a-f]{32}"  # scim2-server's IDs
DEFAULT_PATTERN = (  # the README's default
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
BASE = "https://broker.example/scim/v2"


def page(users: int) -> tuple[str, set[str], set[str]]:
    """A ListResponse as a domain gets it; the internal IDs in play; the caller's own IDs."""
    resources = []
    internal: set[str] = set()
    own: set[str] = set()
    for n in range(users):
        mine = secrets.token_urlsafe(16)
        groups = [(uuid.uuid4().hex, secrets.token_urlsafe(16)) for _ in range(3)]
        manager = (uuid.uuid4().hex, secrets.token_urlsafe(16))
        internal.update([uuid.uuid4().hex, manager[0], *(g for g, _ in groups)])
        own.update([mine, manager[1], *(g for _, g in groups)])
        resources.append(
            {
                "schemas": [
                    "urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User",
                ],
                "id": mine,
                "externalId": f"hr-{n:06d}",
                "userName": f"user{n}@example.org",
                "name": {
                    "formatted": f"Ms. Barbara J Jensen the {n}th",
                    "familyName": "Jensen",
                    "givenName": "Barbara",
                    "middleName": "Jane",
                },
                "displayName": f"Babs Jensen {n}",
                "nickName": "Babs",
                "title": "Tour Guide",
                "userType": "Employee",
                "preferredLanguage": "en-US",
                "locale": "en-US",
                "timezone": "America/Los_Angeles",
                "active": True,
                "emails": [
                    {"value": f"user{n}@example.org", "type": "work", "primary": True},
                    {"value": f"babs{n}@jensen.org", "type": "home"},
                ],
                "phoneNumbers": [{"value": "555-555-8377", "type": "work"}],
                "addresses": [
                    {
                        "streetAddress": "100 Universal City Plaza",
                        "locality": "Hollywood",
                        "region": "CA",
                        "postalCode": "91608",
                        "country": "USA",
                        "type": "work",
                        "primary": True,
                    }
                ],
                "groups": [
                    {"value": g, "$ref": f"{BASE}/Groups/{g}", "display": f"Group {i}"}
                    for i, (_, g) in enumerate(groups)
                ],
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
                    "employeeNumber": f"{n:06d}",
                    "costCenter": "4130",
                    "organization": "Universal Studios",
                    "division": "Theme Park",
                    "department": "Tour Operations",
                    "manager": {
                        "value": manager[1],
                        "$ref": f"{BASE}/Users/{manager[1]}",
                        "displayName": "John Smith",
                    },
                },
                "meta": {
                    "resourceType": "User",
                    "created": "2024-01-23T04:56:22.123456+00:00",
                    "lastModified": "2024-05-13T04:42:34.654321+00:00",
                    "location": f"{BASE}/Users/{mine}",
                    "version": f'W/"{n + 17}"',
                },
            }
        )
    body = {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": users,
        "itemsPerPage": users,
        "startIndex": 1,
        "Resources": resources,
    }
    return orjson.dumps(body).decode(), internal, own


def per_scan(fn: Callable[[], object], repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1e6


_WORD = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


def first_guard(text: str, internal: set[str], pattern: re.Pattern[str], allowed: set[str]) -> bool:
    """The first guard's rule, the "before" column: any whole token in the home's ID shape that
    is not the caller's, and any odd-shaped internal ID in play, by substring."""
    for match in pattern.finditer(text):
        start, end = match.span()
        whole = (start == 0 or text[start - 1] not in _WORD) and (
            end == len(text) or text[end] not in _WORD
        )
        if whole and match.group(0) not in allowed:
            return True
    odd = [i for i in internal if i not in allowed and not pattern.fullmatch(i)]
    return any(i in text for i in odd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    text, internal, own = page(args.users)
    print(f"page of {args.users} users: {len(text) / 1000:.0f} KB")
    for name, pattern in (
        ("scim2-server [0-9a-f]{32}", SCIM_PATTERN),
        ("default", DEFAULT_PATTERN),
    ):
        shape = IdShape(pattern)
        slow = IdShape(pattern)
        slow.shapes.fast = False  # every position tried by the regular expression
        before = per_scan(
            lambda shape=shape: first_guard(text, internal, re.compile(shape.pattern.pattern), own),  # type: ignore[misc]
            args.repeat,
        )
        after = per_scan(
            lambda shape=shape: find_in_play([Scan.of("body", text, shape)], internal, shape),  # type: ignore[misc]
            args.repeat,
        )
        unfiltered = per_scan(
            lambda slow=slow: find_in_play([Scan.of("body", text, slow)], internal, slow),  # type: ignore[misc]
            max(1, args.repeat // 10),
        )
        assert find_in_play([Scan.of("body", text, shape)], internal, shape) is None
        print(
            f"{name}: before (shape rule) {before:,.0f} us; after {after:,.0f} us; "
            f"after without the prefilter {unfiltered:,.0f} us"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
