"""Versions and timestamps as one domain sees them, so that colluding domains cannot link their
pairwise IDs through them (DESIGN section 8, "unlinkability goes beyond IDs"). Pure.

Home's version of a resource (``meta.version``, the ``ETag`` header; RFC 7644 section 3.14) comes
from home's own counter or clock, the same for every domain: two domains comparing the versions
they were shown would pair their IDs for one entity at once. Each domain is shown home's version
*sealed* for it and the resource instead: AES-SIV (RFC 5297), deterministic, so one home version
is always the same ETag for one domain and resource (``If-None-Match`` caching works), different
for every other domain or resource, and only the broker can open it again to pass the domain's
``If-Match`` or ``If-None-Match`` to home.

A domain marked unlinkable also sees ``meta.created`` and ``meta.lastModified`` truncated to its
timestamp precision (1 second by default), so that home's microseconds do not pair its IDs with
another domain's; and a filter or ``sortBy`` naming them (which would recover the precision by
bisection) is refused (:func:`reveals_time`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from broker.errors import BrokerError

__all__ = [
    "Audience",
    "PreconditionFailedError",
    "VersionSealer",
    "coarsen_epoch",
    "coarsen_meta",
    "coarsen_time",
    "home_condition",
    "present_etag",
    "present_meta",
]

_LABEL = b"scim-id-broker version v1"
_BLOCK = 16  # plaintexts are padded to a multiple of this: the length of home's version is hidden
_SIV_KEY = 64  # AES-256-SIV


class Audience(Protocol):
    """What :func:`present_meta` needs of a domain (``broker.domains.Domain`` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def unlinkable(self) -> bool: ...

    @property
    def timestamp_precision(self) -> int: ...


class PreconditionFailedError(BrokerError):
    """``If-Match`` (or a Bulk operation's ``version``) names no version the domain was given of
    the resource: refused without asking home (RFC 7644 section 3.14, RFC 9110 section 13.1.1)."""

    status = 412

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(
            detail
            or "If-Match names no version of this resource that the broker gave you: read the "
            "resource again and send its current ETag"
        )


class VersionSealer:
    """Home's versions sealed for one (domain, resource), and opened again.

    ``key`` is 64 bytes (AES-256-SIV), or a callable giving them on first use (so that a broker
    that never shows a version never loads its key). The domain and the resource's internal ID
    are the associated data: a version sealed for one opens for no other.
    """

    MEMO_SIZE = 16384
    """Sealed versions kept (about 3 MB at most): sealing is deterministic, so a resource read
    again at the same version is sealed again to the same tag, and a page of 100 users read by
    a polling domain costs 100 dict look-ups instead of 100 AES-SIV operations (issue 15). One
    per (domain, resource): its latest version; all are dropped when the memo is full."""

    def __init__(self, key: bytes | Callable[[], bytes]) -> None:
        self._key = key
        self._siv: AESSIV | None = None
        self._sealed: dict[str, dict[str, tuple[str, str]]] = {}
        """By domain: a resource's internal ID -> (home's version, that version sealed); keyed
        by plain strings, so that a look-up builds nothing (issue 15)."""
        self._held = 0
        if isinstance(key, bytes):
            self._siv = self._cipher(key)

    @staticmethod
    def _cipher(key: bytes) -> AESSIV:
        if len(key) != _SIV_KEY:
            raise ValueError(f"a version key is {_SIV_KEY} bytes, not {len(key)}")
        return AESSIV(key)

    def _aead(self) -> AESSIV:
        if self._siv is None:
            assert callable(self._key)
            self._siv = self._cipher(self._key())
        return self._siv

    def seal(self, version: str, *, domain: str, internal_id: str) -> str:
        """Home's ``version`` (an entity tag, ``W/"3"``) as ``domain`` is to see it: an entity tag
        of the same strength (weak stays weak) whose opaque part is the sealed version."""
        memo = self._sealed.get(domain)
        held = None if memo is None else memo.get(internal_id)
        if held is not None and held[0] == version:
            return held[1]
        sealed = self._seal(version, domain=domain, internal_id=internal_id)
        if len(version) + len(internal_id) > 512:
            return sealed  # only what home's versions and IDs look like is kept
        if self._held >= self.MEMO_SIZE:
            self._sealed.clear()
            self._held = 0
            memo = None
        if memo is None:
            memo = self._sealed[domain] = {}
        if internal_id not in memo:
            self._held += 1
        memo[internal_id] = (version, sealed)
        return sealed

    def sealing(self, domain: str) -> Callable[[str, str], str]:
        """:meth:`seal` for one domain, as a function of (version, internal ID), that answers
        from the memo without a further call (issue 15: a page seals 100 versions)."""
        memo = self._sealed.get(domain)
        if memo is None:
            memo = self._sealed[domain] = {}

        def seal(version: str, internal_id: str) -> str:
            held = memo.get(internal_id)
            if held is not None and held[0] == version:
                return held[1]
            return self.seal(version, domain=domain, internal_id=internal_id)

        return seal

    def _seal(self, version: str, *, domain: str, internal_id: str) -> str:
        plain = version.encode()
        padded = plain + b"\x80" + b"\x00" * (-(len(plain) + 1) % _BLOCK)
        sealed = self._aead().encrypt(padded, [_LABEL, domain.encode(), internal_id.encode()])
        opaque = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()
        return f'W/"{opaque}"' if _is_weak(version) else f'"{opaque}"'

    def open(self, etag: str, *, domain: str, internal_id: str) -> str | None:
        """Home's version from an entity tag the broker sealed for ``domain`` and the resource
        (weak or strong, quoted or not); None for any other (tampered, another domain's,
        another resource's, or not the broker's at all)."""
        opaque = _opaque(etag)
        if not opaque or len(opaque) > 1024 or not _BASE64URL.fullmatch(opaque):
            return None
        try:
            sealed = base64.urlsafe_b64decode(opaque + "=" * (-len(opaque) % 4))
            padded = self._aead().decrypt(sealed, [_LABEL, domain.encode(), internal_id.encode()])
        except (InvalidTag, binascii.Error, ValueError):
            return None
        plain = padded.rstrip(b"\x00")
        if not plain.endswith(b"\x80"):
            return None
        try:
            return plain[:-1].decode()
        except UnicodeDecodeError:
            return None


_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def _is_weak(entity_tag: str) -> bool:
    return entity_tag.lstrip()[:2] in ("W/", "w/")


def _opaque(entity_tag: str) -> str:
    """The opaque part of an entity tag: no weak prefix, no quotes (RFC 9110 section 8.8.3)."""
    tag = entity_tag.strip()
    if tag[:2] in ("W/", "w/"):
        tag = tag[2:]
    if len(tag) >= 2 and tag[0] == tag[-1] == '"':
        tag = tag[1:-1]
    return tag


def present_etag(
    home_etag: str | None, *, domain: str, internal_id: str, sealer: VersionSealer
) -> str | None:
    """The ``ETag`` header value ``domain`` gets for home's ``home_etag`` of the resource."""
    if not isinstance(home_etag, str) or not home_etag.strip():
        return None
    return sealer.seal(home_etag.strip(), domain=domain, internal_id=internal_id)


def home_condition(
    header: str | None, *, domain: str, internal_id: str, sealer: VersionSealer
) -> str | None:
    """The ``If-Match`` or ``If-None-Match`` value (or a Bulk operation's ``version``) to send
    home for a domain's ``header``: its tags opened back to home's versions, ``*`` kept.

    None when no tag in it is one the broker sealed for this domain and resource: the condition
    can match nothing, so an ``If-Match`` fails with 412 without asking home, and an
    ``If-None-Match`` is simply not sent (nothing matches, so the resource is returned).
    Tags that do not open are dropped from a list whose other tags do.
    """
    if header is None:
        return None
    tags = _entity_tags(header)
    if tags is None:
        return "*"
    opened = [sealer.open(tag, domain=domain, internal_id=internal_id) for tag in tags]
    versions = list(dict.fromkeys(v for v in opened if v is not None))
    return ", ".join(versions) if versions else None


def _entity_tags(header: str) -> list[str] | None:
    """The entity tags of a conditional header (RFC 9110 section 13.1.1), or None for ``*``.

    A quoted tag may hold a comma, so the list is read tag by tag rather than split."""
    tags: list[str] = []
    rest = header.strip()
    if rest == "*":
        return None
    while rest:
        match = _TAG.match(rest)
        if match is None:  # malformed from here on: what is left names no tag of ours
            break
        if match.group(1):
            tags.append(match.group(1))
        rest = rest[match.end() :]
    return tags


# One member of the list: optional weak prefix, a quoted tag or a bare run, then a comma or the end.
_TAG = re.compile(r'\s*((?:[Ww]/)?(?:"[^"]*"|[^,"\s]*))\s*(?:,|\Z)')


def present_meta(
    doc: Mapping[str, Any],
    *,
    domain: Audience,
    internal_id: str,
    sealer: VersionSealer,
    in_place: bool = False,
) -> dict[str, Any]:
    """A resource's ``meta`` as ``domain`` is to see it: ``version`` sealed for the domain and
    the resource, ``created`` and ``lastModified`` coarsened when the domain is unlinkable.

    For every outgoing resource, after translation and before the read list; the rest of the
    document is returned as it is (a shallow copy, ``meta`` a new object; with ``in_place``, a
    document that belongs to this one call, ``doc`` itself, its ``meta`` changed where it lies)."""
    out: dict[str, Any] = doc if in_place and type(doc) is dict else dict(doc)
    for key in _spelled(doc, "meta"):
        meta = doc[key]
        if type(meta) is not dict and not isinstance(meta, Mapping):  # (the ABC check is slow)
            continue
        shown = meta if in_place and type(meta) is dict else dict(meta)
        for name in _spelled(meta, "version"):
            value = meta[name]
            sealed = present_etag(
                value if isinstance(value, str) else None,
                domain=domain.id,
                internal_id=internal_id,
                sealer=sealer,
            )
            if sealed is None:
                del shown[name]  # not a version the broker can seal: not shown raw either
            else:
                shown[name] = sealed
        out[key] = shown
    if domain.unlinkable:
        out = coarsen_meta(out, domain.timestamp_precision)
    return out


_SPELLED: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}


def _spelled(attrs: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """The keys of ``attrs`` that spell ``name`` (lower case) in any case, found once per key
    sequence: home's resources repeat theirs (issue 15: a page's 100 documents share one)."""
    keys = tuple(attrs)
    found = _SPELLED.get((name, keys))
    if found is None:
        found = tuple(k for k in keys if k.lower() == name)
        if len(_SPELLED) >= 1024:  # never an unbounded memo, whatever home sends
            _SPELLED.clear()
        _SPELLED[name, keys] = found
    return found


_TIMESTAMPS = frozenset({"created", "lastmodified"})


def coarsen_meta(doc: Mapping[str, Any], precision: int) -> dict[str, Any]:
    """``doc`` with ``meta.created`` and ``meta.lastModified`` truncated to ``precision`` seconds
    (see :func:`coarsen_time`); a value that is not an RFC 3339 date-time is dropped rather than
    shown as it is (it might carry what the truncation hides)."""
    out = dict(doc)
    for key, meta in doc.items():
        if key.lower() != "meta" or not isinstance(meta, Mapping):
            continue
        shown = dict(meta)
        for name, value in meta.items():
            if name.lower() in _TIMESTAMPS:
                coarse = coarsen_time(value, precision)
                if coarse is None:
                    del shown[name]
                else:
                    shown[name] = coarse
        out[key] = shown
    return out


# RFC 3339 section 5.6 date-time; the separator may be "T", "t" or a space (its note), the zone
# "Z", "z" or an offset.
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})([Tt ])([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def coarsen_time(value: Any, precision: int) -> str | None:
    """An RFC 3339 date-time truncated to a multiple of ``precision`` seconds since the epoch,
    written in the form it came in (its separator and its zone: ``Z`` stays ``Z``, ``+02:00``
    stays ``+02:00``) without fractional seconds; None when ``value`` is not one."""
    if precision < 1:
        raise ValueError("a timestamp precision is at least 1 second")
    if not isinstance(value, str):
        return None
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        return None
    year, month, day, sep, hour, minute, second, zone = match.groups()
    if zone in ("Z", "z"):
        tz: timezone = UTC
    else:
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            return None
        offset = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-offset if zone[0] == "-" else offset)
    try:
        instant = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
        )
        epoch = int(instant.timestamp())
        coarse = datetime.fromtimestamp(coarsen_epoch(epoch, precision), tz)
    except (ValueError, OverflowError, OSError):
        return None  # not a date (February 30th, second 60), or out of the representable range
    return coarse.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + zone


def coarsen_epoch(seconds: int, precision: int) -> int:
    """Seconds since the epoch (a SET's ``iat``) truncated to a multiple of ``precision``."""
    if precision < 1:
        raise ValueError("a timestamp precision is at least 1 second")
    return seconds // precision * precision
