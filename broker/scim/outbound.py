"""Home's resources as one domain sees them: the outbound half of the proxy, pure.

The shell asks the store once for every ID :func:`ids_in_resources` lists, then hands the answers
to :func:`resources_for_domain`.

:func:`translate_page` is the same in one walk (issue 15, the proxy's page path): it reads each
document once, noting where every ID sits and what its ``$ref`` will be, and
:meth:`OutboundPage.render` fills the answers in. It gives exactly what the two functions give
(a property test compares them on generated documents); any value it has no fast answer for (a
key spelled oddly, a reference that is a bare URI, a type home does not serve) is handed to the
general functions of :mod:`broker.scim.rewrite`, one value at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from broker.scim.rewrite import (
    InvisibleResource,
    Translation,
    collect_ids,
    collect_item,
    item_type,
    rewrite_document,
    rewrite_item,
)
from broker.scim.schemas import RefAttr, ReferenceMap

__all__ = [
    "DomainView",
    "OutboundPage",
    "ids_in_resources",
    "resources_for_domain",
    "translate_page",
]


@dataclass(frozen=True)
class DomainView:
    """How the domain knows one entity: its external ID, and the externalId it gave it."""

    external_id: str
    domain_external_id: str | None = None


class View(Protocol):
    """What :meth:`OutboundPage.render` reads of an answer (the store's ``Outbound`` is one)."""

    @property
    def external_id(self) -> str: ...

    @property
    def domain_external_id(self) -> str | None: ...


def ids_in_resources(
    docs: Sequence[Mapping[str, Any]], translation: Translation, *, resource_type: str | None
) -> dict[str, str | None]:
    """Every internal ID the documents hold -> its resource type where it can be told.

    ``translation`` goes from home's base to the broker's.
    """
    wanted: dict[str, str | None] = {}
    for doc in docs:
        for internal, rtype in collect_ids(
            dict(doc), translation, resource_type=resource_type
        ).items():
            if wanted.get(internal) is None:
                wanted[internal] = rtype
    return wanted


def resources_for_domain(
    docs: Sequence[Mapping[str, Any]],
    views: Mapping[str, View],
    translation: Translation,
    *,
    resource_type: str | None,
) -> list[dict[str, Any] | None]:
    """Each document as the domain sees it, or None where the resource is invisible to it.

    References to entities the domain has no view of are left out; home's ``externalId`` is
    replaced by the one the domain gave the entity, if any (DESIGN section 3).
    """

    def translate(internal: str, _rtype: str | None) -> str | None:
        return views[internal].external_id if internal in views else None

    out: list[dict[str, Any] | None] = []
    for doc in docs:
        try:
            new = rewrite_document(dict(doc), translation, translate, resource_type=resource_type)
        except InvisibleResource:
            out.append(None)
            continue
        for key in [k for k in new if k.lower() == "externalid"]:
            del new[key]
        view = views.get(doc["id"]) if isinstance(doc.get("id"), str) else None
        if view is not None and view.domain_external_id is not None:
            new["externalId"] = view.domain_external_id
        out.append(new)
    return out


# ------------------------------------------------------------------------- the one-walk page

_FAST, _DROP, _GENERAL = 0, 1, 2

# One value of a reference attribute: (kind, the value, its ID, its type, the key of its $ref).
# _FAST: a dict with a string "value": rendered here; _DROP: a complex value that names nothing
# (left out, as the general path leaves it out); _GENERAL: handed to rewrite_item.
_Item = tuple[int, Any, str, str | None, str | None]


@dataclass(frozen=True)
class _Level:
    """Where the IDs of one level of a document sit (the resource, or one extension of it)."""

    edits: list[tuple[str, RefAttr, bool, list[_Item]]]
    """(key, attribute, whether the value is a list, its values)."""
    extensions: list[tuple[str, _Level]]


_EMPTY = _Level([], [])
_UNKNOWN: Any = object()


@dataclass(frozen=True)
class _Doc:
    level: _Level
    location: tuple[str, str] | None
    """meta.location's (resource type, ID), where it names one of home's resources."""
    external_id_keys: list[str]
    """The keys spelling ``externalId`` (home's, never shown)."""


_KeyInfo = tuple[bool, RefAttr | None, bool]
"""Of a top-level key: whether it names an extension, its reference attribute, and whether it
spells ``externalId``."""
_TOP_KEYS: dict[int, tuple[ReferenceMap, dict[str, _KeyInfo]]] = {}


def _top_keys(refs: ReferenceMap) -> dict[str, _KeyInfo]:
    held = _TOP_KEYS.get(id(refs))
    if held is None or held[0] is not refs:
        if len(_TOP_KEYS) >= 16:  # one ReferenceMap per home schema load: a handful live
            _TOP_KEYS.clear()
        held = (refs, {})
        _TOP_KEYS[id(refs)] = held
    return held[1]


@dataclass(frozen=True)
class OutboundPage:
    """Home's documents on their way to one domain: :attr:`wanted` lists every internal ID they
    hold (with its type where it can be told) for the one round-trip to the store, and
    :meth:`render` gives the documents as the domain sees them once it has the answers.

    The same as :func:`ids_in_resources` then :func:`resources_for_domain`, in one walk."""

    docs: Sequence[Mapping[str, Any]]
    translation: Translation
    resource_type: str | None
    wanted: dict[str, str | None]
    _plans: list[_Doc]
    _targets: Mapping[str, str]

    def render(self, views: Mapping[str, View]) -> list[dict[str, Any] | None]:
        """Each document as the domain sees it (None: invisible to it), given the store's
        answer for the :attr:`wanted` IDs it has a view of."""
        renderer = _Renderer(views, self._targets, self.translation)
        return [renderer.doc(doc, plan) for doc, plan in zip(self.docs, self._plans, strict=True)]


class _Renderer:
    """:meth:`OutboundPage.render`'s walk: the plan applied with the store's answers."""

    def __init__(
        self, views: Mapping[str, View], targets: Mapping[str, str], translation: Translation
    ) -> None:
        self.views, self.targets, self.translation = views, targets, translation

    def visit(self, internal: str, _rtype: str | None) -> str | None:
        view = self.views.get(internal)
        return None if view is None else view.external_id

    def items(self, attr: RefAttr, items: list[_Item]) -> list[Any]:
        kept: list[Any] = []
        for kind, item, internal, rtype, ref_key in items:
            if kind == _FAST:
                new = self.visit(internal, rtype)
                if new is None:
                    continue
                if ref_key is None:
                    kept.append({**item, "value": new})
                elif rtype is not None:  # both keys are the item's: their places kept
                    kept.append({**item, "value": new, ref_key: self.targets[rtype] + new})
                else:  # a reference the broker cannot rebuild is not passed on
                    rewritten = {**item, "value": new}
                    del rewritten[ref_key]
                    kept.append(rewritten)
            elif kind == _GENERAL:
                general = rewrite_item(item, attr, self.translation, self.visit)
                if general is not None:
                    kept.append(general)
        return kept

    def level(self, attrs: Mapping[str, Any], plan: _Level) -> dict[str, Any]:
        out = dict(attrs)
        for key, attr, is_list, items in plan.edits:
            kept = self.items(attr, items)
            if is_list:
                out[key] = kept
            elif kept:
                out[key] = kept[0]
            else:
                del out[key]
        for key, inner in plan.extensions:
            out[key] = self.level(attrs[key], inner)
        return out

    def doc(self, doc: Mapping[str, Any], plan: _Doc) -> dict[str, Any] | None:
        new = self.level(doc, plan.level) if plan.level is not _EMPTY else dict(doc)
        own = doc.get("id")
        own_view = self.views.get(own) if isinstance(own, str) else None
        if "id" in doc:
            if own_view is None:
                return None  # the resource itself does not exist for the domain
            new["id"] = own_view.external_id
        meta = doc.get("meta")
        if isinstance(meta, dict) and "location" in meta:
            shown_meta = dict(meta)
            moved = self.visit(plan.location[1], plan.location[0]) if plan.location else None
            if moved is None or plan.location is None:
                del shown_meta["location"]
            else:
                shown_meta["location"] = self.targets[plan.location[0]] + moved
            new["meta"] = shown_meta
        for key in plan.external_id_keys:
            new.pop(key, None)
        if own_view is not None and own_view.domain_external_id is not None:
            new["externalId"] = own_view.domain_external_id
        return new


def translate_page(
    docs: Sequence[Mapping[str, Any]], translation: Translation, *, resource_type: str | None
) -> OutboundPage:
    """Every ID ``docs`` hold, found in one walk that notes where each sits (see
    :class:`OutboundPage`). ``translation`` goes from home's base to the broker's."""
    planner = _Planner(translation)
    plans = [planner.doc(doc, resource_type) for doc in docs]
    return OutboundPage(docs, translation, resource_type, planner.wanted, plans, planner.targets)


class _Planner:
    """The one walk of :func:`translate_page`: what each document holds, and where."""

    def __init__(self, translation: Translation) -> None:
        self.translation = translation
        self.refs, self.endpoints = translation.refs, translation.endpoints
        self.source_base = translation.source_base
        target = translation.target_base.rstrip("/")
        self.targets = {t: f"{target}{e}/" for t, e in self.endpoints.by_type.items()}
        self.top = _top_keys(self.refs)
        self.wanted: dict[str, str | None] = {}
        # item_type reads only an item's "type" and "$ref": its answer is kept for the page (a
        # page's references name the same few groups and managers over and over).
        self.types: dict[tuple[int, str | None, str | None], str | None] = {}

    def add(self, resource_id: str, rtype: str | None) -> None:
        if self.wanted.get(resource_id) is None:
            self.wanted[resource_id] = rtype

    def _type_of(self, item: dict[str, Any], attr: RefAttr) -> str | None:
        declared, ref = item.get("type"), item.get("$ref")
        if (declared is None or type(declared) is str) and (ref is None or type(ref) is str):
            memo = (id(attr), declared, ref)
            rtype = self.types.get(memo, _UNKNOWN)
            if rtype is _UNKNOWN:
                rtype = self.types[memo] = item_type(item, attr, self.endpoints, self.source_base)
            return rtype  # type: ignore[no-any-return]
        return item_type(item, attr, self.endpoints, self.source_base)

    def values(self, values: Sequence[Any], attr: RefAttr) -> list[_Item]:
        planned: list[_Item] = []
        for item in values:
            if attr.complex and type(item) is dict and "value" in item:
                value = item["value"]
                if not isinstance(value, str):
                    planned.append((_DROP, item, "", None, None))
                    continue
                rtype = self._type_of(item, attr)
                ref_key = "$ref" if "$ref" in item else _ref_key(item)
                if ref_key is None or rtype is None or rtype in self.targets:
                    if self.wanted.get(value) is None:
                        self.wanted[value] = rtype
                    planned.append((_FAST, item, value, rtype, ref_key))
                    continue
            collect_item(item, attr, self.translation, self.add)
            planned.append((_GENERAL, item, "", None, None))
        return planned

    def level(self, attrs: Mapping[str, Any], extension: str | None) -> _Level:
        edits: list[tuple[str, RefAttr, bool, list[_Item]]] = []
        extensions: list[tuple[str, _Level]] = []
        for key, value in attrs.items():
            is_extension, attr = self.refs.classify(key, extension)
            if is_extension and isinstance(value, dict):
                extensions.append((key, self.level(value, key)))
            elif attr is not None and value is not None:
                self._edit(edits, key, attr, value)
        return _Level(edits, extensions) if edits or extensions else _EMPTY

    def _edit(
        self,
        edits: list[tuple[str, RefAttr, bool, list[_Item]]],
        key: str,
        attr: RefAttr,
        value: Any,
    ) -> None:
        if isinstance(value, list):
            edits.append((key, attr, True, self.values(value, attr)))
        else:
            edits.append((key, attr, False, self.values((value,), attr)))

    def doc(self, doc: Mapping[str, Any], resource_type: str | None) -> _Doc:
        external_id_keys: list[str] = []
        edits: list[tuple[str, RefAttr, bool, list[_Item]]] = []
        extensions: list[tuple[str, _Level]] = []
        for key, value in doc.items():
            info = self.top.get(key)
            if info is None:
                is_extension, attr = self.refs.classify(key)
                info = (is_extension, attr, key.lower() == "externalid")
                if len(self.top) < 4096:  # home's keys: a few dozen; never an unbounded memo
                    self.top[key] = info
            if info[2]:
                external_id_keys.append(key)
            if info[0] and isinstance(value, dict):
                extensions.append((key, self.level(value, key)))
            elif info[1] is not None and value is not None:
                self._edit(edits, key, info[1], value)
        own = doc.get("id")
        if isinstance(own, str):
            self.add(own, resource_type or _meta_type(doc))
        location = None
        meta = doc.get("meta")
        if isinstance(meta, dict):
            uri = meta.get("location")
            parsed = (
                self.endpoints.parse_uri(uri, self.source_base) if isinstance(uri, str) else None
            )
            if parsed is not None:
                self.add(parsed[1], parsed[0])
                location = parsed
        level = _Level(edits, extensions) if edits or extensions else _EMPTY
        return _Doc(level, location, external_id_keys)


def _ref_key(item: Mapping[str, Any]) -> str | None:
    return next((k for k in item if k.lower() == "$ref"), None)


def _meta_type(doc: Mapping[str, Any]) -> str | None:
    meta = doc.get("meta")
    value = meta.get("resourceType") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None
