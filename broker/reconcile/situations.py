"""Reconciliation's decisions, as pure functions: what each peer account on a page is (its
situation), what a run's options do about each situation, and whether a run would deprovision
more of a peer than the deletion threshold allows (docs/reconciliation.md).

The situations are those of midPoint and PingIDM, made exact for the mapping table (seed 002):

- ``linked``: mapped, both exist, the attributes agree;
- ``drifted``: mapped, the peer's attributes differ from home's;
- ``missing``: mapped (or in the domain's scope), the peer lacks it;
- ``unlinked``: one peer account matches one home entity by the correlation rule, no mapping;
- ``disputed``: several candidates either way;
- ``unmatched``: a peer account with no home entity (an orphan);
- ``deleted``: the home entity is gone, the peer still holds it;
- ``out_of_scope``: the peer holds an entity the domain's scope excludes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.propagation.policy import deletion_limit

__all__ = [
    "ACTIONS",
    "DEFAULT_ACTIONS",
    "SITUATIONS",
    "Candidate",
    "Item",
    "Mapped",
    "Options",
    "Page",
    "classify_page",
    "correlation_values",
    "deletion_limit",
    "deletion_problem",
    "differences",
    "parse_correlate",
]

SITUATIONS = (
    "linked",
    "drifted",
    "missing",
    "unlinked",
    "disputed",
    "unmatched",
    "deleted",
    "out_of_scope",
)

ACTIONS: Mapping[str, tuple[str, ...]] = {
    "unlinked": ("link", "report"),
    "unmatched": ("report", "deprovision"),
    "drifted": ("sync", "report"),
    "missing": ("create", "report"),
    "deleted": ("report", "deprovision"),
}
"""What a run may do about each situation it can act on (the others are reported)."""

DEFAULT_ACTIONS: Mapping[str, str] = {
    "unlinked": "link",
    "unmatched": "report",
    "drifted": "sync",
    "missing": "create",
    "deleted": "report",
}
"""Safe: nothing is deleted unless asked; an existing account is linked, not duplicated, and an
entity the peer lacks is created."""

CORRELATABLE = frozenset({"username", "emails.value", "externalid", "displayname"})
"""Attributes a correlation rule may name (simple strings in the peer's terms)."""

GROUP_CORRELATE = ("displayName",)
"""Groups are recognised by their display name."""

_IGNORED = frozenset({"id", "meta", "schemas", "externalid", "groups", "password"})
"""Never compared: the peer's own (id, meta), the broker's handle, read-only or write-only."""


_CASE_INSENSITIVE = frozenset({"username"})
"""Compared regardless of case (RFC 7643 section 4.1.1: userName is not caseExact; a peer may
store it lower-cased)."""


def parse_correlate(value: str) -> tuple[str, ...]:
    """``userName,emails.value`` as the rule's attributes; ValueError naming the fix."""
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    if not names:
        raise ValueError("--correlate names at least one attribute, for example userName")
    unknown = [n for n in names if n.lower() not in CORRELATABLE]
    if unknown:
        raise ValueError(
            f"--correlate {','.join(unknown)}: a rule compares userName, emails.value, "
            "externalId or displayName, for example --correlate userName,emails.value"
        )
    return names


@dataclass(frozen=True)
class Options:
    """What one run does: an action per situation, which situations it covers, whether it only
    plans, and how many deprovisionings a person confirmed."""

    actions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    only: frozenset[str] | None = None
    """The situations the run acts on and reports (None: all)."""
    dry_run: bool = False
    confirm_deletions: int = 0

    def action(self, situation: str) -> str:
        """The action the run takes for an account or entity in ``situation``."""
        if self.only is not None and situation not in self.only:
            return "report"
        return self.actions.get(situation, "report")

    def to_json(self) -> dict[str, Any]:
        return {
            "actions": dict(self.actions),
            "only": sorted(self.only) if self.only is not None else None,
            "dry_run": self.dry_run,
            "confirm_deletions": self.confirm_deletions,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Options:
        only = value.get("only")
        return cls(
            actions={**DEFAULT_ACTIONS, **value.get("actions", {})},
            only=frozenset(only) if only is not None else None,
            dry_run=bool(value.get("dry_run", False)),
            confirm_deletions=int(value.get("confirm_deletions", 0)),
        )


@dataclass(frozen=True)
class Mapped:
    """The mapping row an account's ID is found in."""

    internal_id: str
    primary: bool
    entity_state: str
    """active, merged or deleted (the broker's record of the entity)."""


@dataclass(frozen=True)
class Candidate:
    """A home entity an account's correlation values point at."""

    internal_id: str
    in_scope: bool
    account: str | None = None
    """The entity's primary account in the domain already, if it has one."""


@dataclass(frozen=True)
class Page:
    """One page of a peer's accounts and what the shell looked up for it in batches."""

    resource_type: str
    accounts: Sequence[Mapping[str, Any]]
    correlate: Sequence[str]
    mapped: Mapping[str, Mapped]
    """Account ID -> its mapping row (accounts without one are left out)."""
    desired: Mapping[str, Mapping[str, Any] | None]
    """Internal ID -> home's resource as the peer is to hold it (None: home has it no more).
    For mapped entities and candidates alike."""
    in_scope: frozenset[str]
    """The mapped entities within the domain's scope."""
    matches: Mapping[tuple[str, str], Sequence[str]]
    """(attribute lower-cased, value lower-cased) -> home entities holding that value."""
    candidates: Mapping[str, Candidate]
    """Internal ID -> the candidate entity (scope, existing account)."""


@dataclass(frozen=True)
class Item:
    """An account (or entity) and its situation."""

    resource_type: str
    situation: str
    external_id: str | None
    internal_id: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)


def correlation_values(doc: Mapping[str, Any], attributes: Iterable[str]) -> set[tuple[str, str]]:
    """(attribute, value) pairs of ``doc`` the rule compares, both lower-cased (case-insensitive,
    as RFC 7643 section 4.1.1 makes userName)."""
    lowered = {k.lower(): v for k, v in doc.items()}
    found: set[tuple[str, str]] = set()
    for attribute in attributes:
        name, _, sub = attribute.lower().partition(".")
        value = lowered.get(name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if sub:
                v = {k.lower(): x for k, x in v.items()}.get(sub) if isinstance(v, dict) else None
            if isinstance(v, str) and v.strip():
                found.add((attribute.lower(), v.strip().lower()))
    return found


def _normal(value: Any, like: Any) -> Any:
    """``value`` cut to what ``like`` (home's side) says: sub-attributes home does not send are
    the peer's own (``$ref``, ``display``); multi-valued attributes compare as sets."""
    if isinstance(like, dict) and isinstance(value, dict):
        lowered = {k.lower(): v for k, v in value.items()}
        return {k.lower(): _normal(lowered.get(k.lower()), v) for k, v in like.items()}
    if isinstance(like, list) and isinstance(value, list):
        model = like[0] if like else None
        return sorted(json.dumps(_normal(v, model), sort_keys=True) for v in value)
    return value


def differences(desired: Mapping[str, Any], account: Mapping[str, Any]) -> list[str]:
    """The attributes whose value in ``account`` (the peer's) differs from ``desired`` (home's,
    in the peer's terms), sorted. Attributes the peer has and home does not send are its own."""
    held = {k.lower(): v for k, v in account.items()}
    changed = []
    for key, want in desired.items():
        if key.lower() in _IGNORED:
            continue
        have = held.get(key.lower())
        if isinstance(want, list):
            want_n = sorted(json.dumps(_normal(v, v), sort_keys=True) for v in want)
            have_n = _normal(have if isinstance(have, list) else [], want)
            if not want and have in (None, []):
                continue
            if want_n != have_n:
                changed.append(key)
        elif key.lower() in _CASE_INSENSITIVE and isinstance(want, str):
            if not isinstance(have, str) or have.lower() != want.lower():
                changed.append(key)
        elif _normal(have, want) != _normal(want, want):
            changed.append(key)
    return sorted(changed)


def _account_id(account: Mapping[str, Any]) -> str | None:
    value = account.get("id")
    return value if isinstance(value, str) and value else None


def classify_page(page: Page) -> list[Item]:
    """The situation of every account on ``page`` (accounts without an ``id`` are skipped).

    An account whose single candidate is claimed by another account on the page, or which
    already has an account in the domain, is ``disputed``; so is one with several candidates.
    Disputes across pages are found after the pass (the shell's query over the items)."""
    sole: dict[str, str] = {}
    for account in page.accounts:
        account_id = _account_id(account)
        if account_id is None or account_id in page.mapped:
            continue
        found = _candidates(page, account)
        if len(found) == 1:
            sole[account_id] = found[0]
    claims = Counter(sole.values())
    items = []
    for account in page.accounts:
        account_id = _account_id(account)
        if account_id is None:
            continue
        row = page.mapped.get(account_id)
        if row is not None:
            items.append(_mapped_item(page, account, account_id, row))
        else:
            items.append(_unmapped_item(page, account, account_id, claims))
    return items


def _candidates(page: Page, account: Mapping[str, Any]) -> list[str]:
    found: dict[str, None] = {}
    for key in sorted(correlation_values(account, page.correlate)):
        for internal_id in page.matches.get(key, ()):
            found[internal_id] = None
    return list(found)


def _mapped_item(page: Page, account: Mapping[str, Any], account_id: str, row: Mapped) -> Item:
    """A mapped account: linked, drifted, deleted or out of scope."""
    rt = page.resource_type

    def item(situation: str, **detail: Any) -> Item:
        return Item(rt, situation, account_id, row.internal_id, detail)

    if not row.primary:
        return item("linked", reason="an alias: a merge's clean-up deletes it")
    desired = page.desired.get(row.internal_id)
    if row.entity_state == "deleted" or desired is None:
        return item("deleted", reason="home no longer has the entity")
    if row.internal_id not in page.in_scope:
        return item("out_of_scope", reason="the domain's scope excludes the entity")
    changed = differences(desired, account)
    if changed:
        return item("drifted", attributes=changed)
    return item("linked")


def _unmapped_item(
    page: Page, account: Mapping[str, Any], account_id: str, claims: Mapping[str, int]
) -> Item:
    """An account with no mapping: unlinked, disputed, unmatched or out of scope."""
    rt = page.resource_type
    found = _candidates(page, account)
    if not found:
        return Item(rt, "unmatched", account_id, None, {"reason": "no home entity matches"})
    if len(found) > 1:
        return Item(
            rt,
            "disputed",
            account_id,
            None,
            {"reason": f"{len(found)} home entities match", "candidates": found},
        )
    internal_id = found[0]
    candidate = page.candidates.get(internal_id, Candidate(internal_id, in_scope=False))
    if not candidate.in_scope:
        return Item(
            rt,
            "out_of_scope",
            account_id,
            internal_id,
            {"reason": "matches an entity out of scope"},
        )
    if candidate.account is not None or claims.get(internal_id, 0) > 1:
        return Item(
            rt,
            "disputed",
            account_id,
            internal_id,
            {"reason": "several peer accounts match one home entity"},
        )
    desired = page.desired.get(internal_id)
    drift = differences(desired, account) if desired is not None else []
    return Item(rt, "unlinked", account_id, internal_id, {"attributes": drift} if drift else {})


def deletion_problem(
    deprovisions: int, peer_accounts: int, *, limit: int, confirmed: int, command: str
) -> str | None:
    """Why the run stops before deleting anything (None: it may go on). A person confirms by
    naming the exact number (``--confirm-deletions N``), so a confirmation given for a smaller
    run never covers a larger one."""
    if deprovisions <= limit or confirmed == deprovisions:
        return None
    share = (
        f" ({deprovisions * 100 // peer_accounts}% of its {peer_accounts} accounts)"
        if peer_accounts
        else ""
    )
    return (
        f"the run would deprovision {deprovisions} accounts{share}, "
        f"more than the deletion threshold ({limit}); nothing was deleted. Check the plan with "
        f"`{command} --dry-run`, then confirm with `{command} --confirm-deletions {deprovisions}`"
    )
