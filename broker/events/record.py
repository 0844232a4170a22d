"""Recording home's changes for the domains subscribed to them, on the caller's transaction (so
that a write and the SETs it implies commit together or not at all)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from broker.db import query
from broker.events.sets import Change, EventKind, describe_change

if TYPE_CHECKING:
    from broker.db import Connection

__all__ = ["record_changes"]

_VERB_KIND = {"create": EventKind.CREATE, "put": EventKind.PUT, "patch": EventKind.PATCH}


async def record_changes(
    conn: Connection,
    changed: Collection[str],
    deleted: Sequence[str],
    *,
    origin: str | None,
    verb: str | Mapping[str, str] | None,
    documents: Mapping[str, Mapping[str, Any]],
    write_only: Mapping[str, Collection[str]],
) -> None:
    """Each change once, with what it touched (compared with the last document recorded for the
    entity), and a SET for each subscribed domain (the caller knows some domain subscribes).

    ``verb`` is how the change was made (create, put, patch; by entity for a bulk write; None
    when a poll found it), ``documents`` home's resources after it (where known), ``write_only`` the names of
    attributes the write set that home never shows (a password).
    """
    entities = list(dict.fromkeys([*changed, *deleted]))
    if not entities:
        return
    records = await conn.fetch(query("previous_documents"), entities)
    previous = {r["internal_id"]: r["document"] for r in records}
    gone = set(deleted)
    out: list[dict[str, Any]] = []
    for internal in entities:
        before = previous.get(internal)
        if internal in gone:
            change = describe_change(before, None, "delete")
            document = before
        else:
            document = documents.get(internal)
            how = verb.get(internal) if isinstance(verb, Mapping) else verb
            change = _describe(before, document, how, write_only.get(internal, ()))
        if change is not None:
            out.append(
                {
                    "internal_id": internal,
                    "kinds": [k.value for k in change.kinds],
                    "attributes": list(change.attributes),
                    "document": document,
                }
            )
    if out:
        await conn.execute(query("record_changes"), out, origin)


def _describe(
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    verb: str | None,
    write_only: Collection[str],
) -> Change | None:
    if after is None:
        # Home's state after the write is not known here (a bulk write): the verb is.
        kind = _VERB_KIND.get(verb or "", EventKind.PATCH)
        return Change((kind,), tuple(sorted(write_only)))
    if before is None and verb != "create" and not _created_now(after):
        # Found by a poll, first seen since events were subscribed to: not a creation.
        before = {}
    change = describe_change(before, after, verb)
    if write_only:
        kinds = change.kinds if change else (_VERB_KIND.get(verb or "", EventKind.PATCH),)
        names = tuple(sorted({*(change.attributes if change else ()), *write_only}))
        change = Change(kinds, names)
    return change


def _created_now(document: Mapping[str, Any]) -> bool:
    """Whether home's ``meta`` says the resource was last modified when it was created."""
    meta = document.get("meta")
    if not isinstance(meta, Mapping):
        return False
    created = meta.get("created")
    return created is not None and created == meta.get("lastModified")
