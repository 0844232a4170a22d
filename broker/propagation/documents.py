"""What a push peer receives, as pure functions: home's resource in the peer's terms, and the
smallest SCIM PATCH from what the peer last received to that (RFC 7644 section 3.5.2).

Changed attributes are found with ``jsonpatch``; its JSON-pointer paths cannot be sent as SCIM
paths (SCIM has no array indices), so each changed attribute becomes SCIM operations of its own:
a sub-attribute replaced or removed, a multi-valued attribute keyed by ``value`` (``members``)
changed by adding and removing the values that differ, anything else replaced whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jsonpatch

from broker.scim.rewrite import Translation, rewrite_document

__all__ = ["PATCH_SCHEMA", "peer_document", "scim_patch"]

PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
# Never sent to a peer: the peer assigns its own id and meta, and computes read-only ``groups``
# from the groups it holds.
_NOT_SENT = frozenset({"id", "meta", "groups", "externalid"})

Json = dict[str, Any]


def peer_document(
    home_doc: Mapping[str, Any],
    translation: Translation,
    translate: Callable[[str, str | None], str | None],
    *,
    resource_type: str,
    correlation_handle: str,
    readable: Collection[str] | None,
) -> Json:
    """Home's resource as the peer is to hold it.

    References are translated to the peer's IDs (what ``translate`` cannot translate is left
    out), ``externalId`` is the pairwise correlation handle, and only the attributes the peer
    may read are kept.
    """
    permitted = None if readable is None else {a.lower() for a in readable} | {"schemas"}
    body = {
        k: v
        for k, v in home_doc.items()
        if k.lower() not in _NOT_SENT and (permitted is None or k.lower() in permitted)
    }
    out = rewrite_document(body, translation, translate, resource_type=resource_type)
    for key, value in out.items():
        ref = translation.refs.attribute(key)
        if ref is not None and ref.complex and ref.multi_valued and isinstance(value, list):
            out[key] = _unique_values(value)
    out["externalId"] = correlation_handle
    return out


def _unique_values(items: list[Any]) -> list[Any]:
    """References to one resource once: a merged entity and its survivor both named in home
    are one account in the peer."""
    seen: set[str] = set()
    kept = []
    for item in items:
        value = item.get("value") if isinstance(item, dict) else None
        if isinstance(value, str):
            if value in seen:
                continue
            seen.add(value)
        kept.append(item)
    return kept


def scim_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Json]:
    """SCIM PATCH operations that take ``before`` to ``after`` (empty when they are equal)."""
    changed: list[str] = []
    for op in jsonpatch.make_patch(dict(before), dict(after)):
        # A "move" changes the attribute it takes the value from as well as the one it puts it in.
        for pointer in (op.get("from"), op["path"]):
            if pointer is None:
                continue
            top = _unescape(pointer.split("/")[1]) if pointer != "" else ""
            if top not in changed:
                changed.append(top)
    operations: list[Json] = []
    for key in changed:
        if key in ("", "schemas"):
            continue  # schemas follow the attributes (RFC 7644 section 3.5.2)
        if ":" in key and isinstance(after.get(key), dict) and isinstance(before.get(key), dict):
            operations += _attribute_ops(before[key], after[key], prefix=key + ":")
        else:
            operations += _attribute_ops(
                {key: before[key]} if key in before else {},
                {key: after[key]} if key in after else {},
                prefix="",
            )
    return operations


def _attribute_ops(
    before: Mapping[str, Any], after: Mapping[str, Any], *, prefix: str
) -> list[Json]:
    ops: list[Json] = []
    for name in [*before, *(k for k in after if k not in before)]:
        old, new = before.get(name), after.get(name)
        path = prefix + name
        if old == new:
            continue
        if new is None or new == [] or new == {}:
            ops.append({"op": "remove", "path": path})
        elif isinstance(old, dict) and isinstance(new, dict):
            ops += _complex_ops(old, new, path)
        elif isinstance(old, list) and isinstance(new, list) and _keyed(old) and _keyed(new):
            ops += _keyed_ops(old, new, path)
        else:
            ops.append({"op": "replace", "path": path, "value": new})
    return ops


def _complex_ops(old: Mapping[str, Any], new: Mapping[str, Any], path: str) -> list[Json]:
    """A singular complex attribute: each sub-attribute replaced or removed."""
    ops: list[Json] = []
    replaced = {k: v for k, v in new.items() if old.get(k) != v and v is not None}
    if replaced:
        ops.append({"op": "replace", "path": path, "value": replaced})
    ops += [{"op": "remove", "path": f"{path}.{k}"} for k in old if k not in new or new[k] is None]
    return ops


def _keyed(items: list[Any]) -> bool:
    """Items identified by ``value`` alone: dicts with distinct string values."""
    values = [i.get("value") for i in items if isinstance(i, dict)]
    return (
        len(values) == len(items)
        and all(isinstance(v, str) for v in values)
        and len(set(values)) == len(values)
    )


def _keyed_ops(old: list[Json], new: list[Json], path: str) -> list[Json]:
    before = {i["value"]: i for i in old}
    after = {i["value"]: i for i in new}
    if any(before[v] != after[v] for v in before.keys() & after.keys()):
        return [{"op": "replace", "path": path, "value": new}]
    ops: list[Json] = [
        {"op": "remove", "path": f"{path}[value eq {json.dumps(v)}]"}
        for v in before
        if v not in after
    ]
    added = [after[v] for v in after if v not in before]
    if added:
        ops.append({"op": "add", "path": path, "value": added})
    return ops


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")
