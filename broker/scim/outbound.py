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
from typing import Any, NamedTuple, Protocol

from broker.scim.rewrite import (
    Endpoints,
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

_Edit = tuple[str | None, str, RefAttr, bool, list[_Item], bool]
"""One reference attribute to rewrite: (the extension it sits in, None at the top; its key; the
attribute; whether the value is a list; its values; whether every value is _FAST)."""

_UNKNOWN: Any = object()
_GENERAL_VALUE: Any = object()


class _Doc(NamedTuple):
    """What one document holds, and where (a tuple: one is made per document of a page)."""

    edits: list[_Edit]
    extensions: list[str]
    """The keys of the extensions that hold an edit (copied, unless rendered in place)."""
    location: tuple[str, str] | None
    """meta.location's (resource type, ID), where it names one of home's resources."""
    external_id_keys: list[str]
    """The keys spelling ``externalId`` (home's, never shown)."""


_NO_EDITS = _Doc([], [], None, [])

_KeyInfo = tuple[bool, RefAttr | None, bool]
"""Of a top-level key: whether it names an extension, its reference attribute, and whether it
spells ``externalId``."""
_Shape = tuple[tuple[str, bool, RefAttr | None], ...]
"""Of a document's key sequence: the keys that matter (an extension, a reference attribute),
with what they are; the documents of a page share their key sequence."""
_TOP_KEYS: dict[int, tuple[ReferenceMap, dict[str, _KeyInfo], dict[tuple[str, ...], Any]]] = {}


def _top_keys(refs: ReferenceMap) -> tuple[dict[str, _KeyInfo], dict[tuple[str, ...], Any]]:
    held = _TOP_KEYS.get(id(refs))
    if held is None or held[0] is not refs:
        if len(_TOP_KEYS) >= 16:  # one ReferenceMap per home schema load: a handful live
            _TOP_KEYS.clear()
        held = (refs, {}, {})
        _TOP_KEYS[id(refs)] = held
    return held[1], held[2]


_MEMO_SIZE = 16_384
"""Values kept per reference attribute in :func:`_type_memos`' memos."""
_Memos = tuple[dict[int, dict[Any, str | None]], dict[int, dict[str, str | None]]]
_TYPE_MEMOS: dict[tuple[int, int, str], tuple[ReferenceMap, Endpoints, _Memos]] = {}


def _type_memos(translation: Translation) -> _Memos:
    """The item types already told (by attribute: by ("type", "$ref"), and by "$ref" for a value
    with no "type") for the references, endpoints and home base of ``translation``: what
    :func:`item_type` answers depends on nothing else (the targets' keys are the endpoints')."""
    refs, endpoints = translation.refs, translation.endpoints
    key = (id(refs), id(endpoints), translation.source_base)
    held = _TYPE_MEMOS.get(key)
    if held is None or held[0] is not refs or held[1] is not endpoints:
        if len(_TYPE_MEMOS) >= 16:  # one pair per home schema load: a handful live
            _TYPE_MEMOS.clear()
        held = (refs, endpoints, ({}, {}))
        _TYPE_MEMOS[key] = held
    return held[2]


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

    def render(
        self, views: Mapping[str, View], *, in_place: bool = False
    ) -> list[dict[str, Any] | None]:
        """Each document as the domain sees it (None: invisible to it), given the store's
        answer for the :attr:`wanted` IDs it has a view of.

        ``in_place``: the documents belong to this one call (parsed for it, read by nothing
        after): they are rewritten where they lie, with no copy; otherwise they are left as
        they are and the rewritten parts are copies."""
        renderer = _Renderer(views, self._targets, self.translation, in_place)
        return [renderer.doc(doc, plan) for doc, plan in zip(self.docs, self._plans, strict=True)]


class _Renderer:
    """:meth:`OutboundPage.render`'s walk: the plan applied with the store's answers."""

    def __init__(
        self,
        views: Mapping[str, View],
        targets: Mapping[str, str],
        translation: Translation,
        in_place: bool,
    ) -> None:
        self.views, self.targets, self.translation = views, targets, translation
        self.in_place = in_place
        self.external = {internal: view.external_id for internal, view in views.items()}
        """Each internal ID -> the domain's ID for it, read once for the page."""

    def visit(self, internal: str, _rtype: str | None) -> str | None:
        view = self.views.get(internal)
        return None if view is None else view.external_id

    def fast(self, items: list[_Item]) -> list[Any]:
        """Values that are all _FAST: each rewritten where it lies (or a copy), those naming
        nothing the domain can see left out."""
        external, targets, in_place = self.external, self.targets, self.in_place
        kept: list[Any] = []
        for _, item, internal, rtype, ref_key in items:
            new = external.get(internal)
            if new is None:
                continue
            shown = item if in_place else dict(item)
            shown["value"] = new
            if ref_key is not None:
                if rtype is not None:  # both keys are the item's: their places kept
                    shown[ref_key] = targets[rtype] + new
                else:  # a reference the broker cannot rebuild is not passed on
                    del shown[ref_key]
            kept.append(shown)
        return kept

    def items(self, attr: RefAttr, items: list[_Item]) -> list[Any]:
        kept: list[Any] = []
        for planned in items:
            kind, item = planned[0], planned[1]
            if kind == _FAST:
                kept += self.fast([planned])
            elif kind == _GENERAL:
                general = rewrite_item(item, attr, self.translation, self.visit)
                if general is not None:
                    kept.append(general)
        return kept

    def doc(self, doc: Mapping[str, Any], plan: _Doc) -> dict[str, Any] | None:
        own = doc.get("id")
        new: dict[str, Any] = doc if self.in_place else dict(doc)  # type: ignore[assignment]
        if plan is not _NO_EDITS:
            self.edits(new, plan)
        own_view = self.views.get(own) if isinstance(own, str) else None
        if own_view is None and "id" in doc:
            return None  # the resource itself does not exist for the domain
        if own_view is not None:
            new["id"] = own_view.external_id
        meta = doc.get("meta")
        if isinstance(meta, dict) and "location" in meta:
            shown_meta = meta if self.in_place else dict(meta)
            location = plan.location
            moved = self.external.get(location[1]) if location else None
            if moved is None or location is None:
                del shown_meta["location"]
            else:
                shown_meta["location"] = self.targets[location[0]] + moved
            new["meta"] = shown_meta
        for key in plan.external_id_keys:
            new.pop(key, None)
        if own_view is not None and own_view.domain_external_id is not None:
            new["externalId"] = own_view.domain_external_id
        return new

    def edits(self, new: dict[str, Any], plan: _Doc) -> None:
        containers: dict[str | None, dict[str, Any]] = {}
        for key in plan.extensions:
            containers[key] = new[key] = new[key] if self.in_place else dict(new[key])
        for where, key, attr, is_list, items, all_fast in plan.edits:
            kept = self.fast(items) if all_fast else self.items(attr, items)
            container = new if where is None else containers[where]
            if is_list:
                container[key] = kept
            elif kept:
                container[key] = kept[0]
            else:
                del container[key]


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
        self.top, self.shapes = _top_keys(self.refs)
        self.wanted: dict[str, str | None] = {}
        # item_type reads only an item's "type" and "$ref": its answer is kept from page to
        # page, and from one document to the next (issue 15: a GET of one user names the same
        # few groups as the requests before it), for these references and this home base.
        self.types, self.by_ref = _type_memos(translation)
        self.own_prefixes: dict[str, str | None] = {}

    def add(self, resource_id: str, rtype: str | None) -> None:
        if self.wanted.get(resource_id) is None:
            self.wanted[resource_id] = rtype

    def values(self, values: Sequence[Any], attr: RefAttr) -> tuple[list[_Item], bool]:
        """The plan of each value, and whether all are _FAST."""
        planned: list[_Item] = []
        all_fast = True
        wanted = self.wanted
        types = self.types.get(id(attr))
        if types is None:
            types = self.types[id(attr)] = {}
        by_ref = self.by_ref.get(id(attr))
        if by_ref is None:
            by_ref = self.by_ref[id(attr)] = {}
        complex_values = attr.complex
        for item in values:
            # The common value first ({"value": ID, "$ref": URI, ...}, no "type"): its type and
            # whether it is rendered here are known from its $ref, once per page.
            if complex_values and type(item) is dict and "type" not in item:
                value, ref = item.get("value"), item.get("$ref")
                if type(value) is str and type(ref) is str:
                    rtype = by_ref.get(ref, _UNKNOWN)
                    if rtype is _UNKNOWN:
                        if len(by_ref) >= _MEMO_SIZE:  # whatever home sends, never unbounded
                            by_ref.clear()
                        rtype = by_ref[ref] = self._fast_type(item, attr, types)
                    if rtype is not _GENERAL_VALUE:
                        if wanted.get(value) is None:
                            wanted[value] = rtype
                        planned.append((_FAST, item, value, rtype, "$ref"))
                        continue
            if not self._value(item, attr, types, planned):
                all_fast = False
        return planned, all_fast

    def _fast_type(
        self, item: dict[str, Any], attr: RefAttr, types: dict[Any, str | None]
    ) -> str | None:
        """The type of a value that has a string "$ref" and no "type", or _GENERAL_VALUE where
        :meth:`_value` would hand it to the general functions."""
        planned: list[_Item] = []
        self._value(item, attr, types, planned)
        kind, _, _, rtype, _ = planned[0]
        return rtype if kind == _FAST else _GENERAL_VALUE

    def _value(
        self, item: Any, attr: RefAttr, types: dict[Any, str | None], planned: list[_Item]
    ) -> bool:
        """The plan of one value, whatever it is, appended to ``planned``; whether it is
        _FAST."""
        if attr.complex and type(item) is dict and "value" in item:
            value = item["value"]
            if not isinstance(value, str):
                planned.append((_DROP, item, "", None, None))
                return False
            declared, ref = item.get("type"), item.get("$ref")
            if (declared is None or type(declared) is str) and (ref is None or type(ref) is str):
                rtype = types.get((declared, ref), _UNKNOWN)
                if rtype is _UNKNOWN:
                    if len(types) >= _MEMO_SIZE:
                        types.clear()
                    rtype = types[declared, ref] = self._type_of(item, attr)
            else:
                rtype = self._type_of(item, attr)
            ref_key = "$ref" if "$ref" in item else _ref_key(item)
            if ref_key is None or rtype is None or rtype in self.targets:
                if self.wanted.get(value) is None:
                    self.wanted[value] = rtype
                planned.append((_FAST, item, value, rtype, ref_key))
                return True
        collect_item(item, attr, self.translation, self.add)
        planned.append((_GENERAL, item, "", None, None))
        return False

    def _type_of(self, item: dict[str, Any], attr: RefAttr) -> str | None:
        return item_type(item, attr, self.endpoints, self.source_base)

    def level(self, edits: list[_Edit], attrs: Mapping[str, Any], extension: str | None) -> None:
        for key, value in attrs.items():
            _, attr = self.refs.classify(key, extension)
            if attr is not None and value is not None:
                self._edit(edits, extension, key, attr, value)

    def _edit(
        self, edits: list[_Edit], where: str | None, key: str, attr: RefAttr, value: Any
    ) -> None:
        is_list = isinstance(value, list)
        items, all_fast = self.values(value if is_list else (value,), attr)
        edits.append((where, key, attr, is_list, items, all_fast))

    def shape(self, doc: Mapping[str, Any]) -> tuple[_Shape, list[str]]:
        """What the keys of ``doc`` are: decided once per key sequence, as a page's documents
        share theirs."""
        keys = tuple(doc)
        held = self.shapes.get(keys)
        if held is None:
            matter: list[tuple[str, bool, RefAttr | None]] = []
            external_id_keys: list[str] = []
            for key in keys:
                is_extension, attr = self.refs.classify(key)
                if is_extension or attr is not None:
                    matter.append((key, is_extension, attr))
                if key.lower() == "externalid":
                    external_id_keys.append(key)
            held = (tuple(matter), external_id_keys)
            if len(self.shapes) < 256:  # never an unbounded memo, whatever home sends
                self.shapes[keys] = held
        return held

    def own_location(self, uri: str, own: Any, own_type: str | None) -> tuple[str, str] | None:
        """``meta.location`` read without parsing where it is what home writes: its base, the
        endpoint of the document's own type as home spells it, and the document's own ID
        (what :meth:`Endpoints.parse_uri` answers for it); None for anything else."""
        if own_type is None or type(own) is not str or "/" in own or "?" in own or "#" in own:
            return None
        prefix = self.own_prefixes.get(own_type, _UNKNOWN)
        if prefix is _UNKNOWN:
            prefix = self.own_prefixes[own_type] = self._own_prefix(own_type)
        if prefix is not None and own and uri == prefix + own:
            return own_type, own
        return None

    def _own_prefix(self, resource_type: str) -> str | None:
        """``{home's base}/{endpoint}/`` for a type, where parse_uri's fast path reads such a
        URI as (that type, the rest); None otherwise."""
        endpoint = self.endpoints.by_type.get(resource_type)
        if endpoint is None:
            return None
        sample = "x"
        base = self.source_base.rstrip("/")
        if "://" not in base:
            return None
        prefix = f"{base}/{endpoint.strip('/')}/"
        return (
            prefix
            if self.endpoints.parse_uri(prefix + sample, self.source_base)
            == (
                resource_type,
                sample,
            )
            else None
        )

    def doc(self, doc: Mapping[str, Any], resource_type: str | None) -> _Doc:
        shape, external_id_keys = self.shape(doc)
        edits: list[_Edit] = []
        extensions: list[str] = []
        for key, is_extension, attr in shape:
            value = doc[key]
            if is_extension and isinstance(value, dict):
                before = len(edits)
                self.level(edits, value, key)
                if len(edits) > before:
                    extensions.append(key)
            elif attr is not None and value is not None:
                self._edit(edits, None, key, attr, value)
        wanted = self.wanted
        own = doc.get("id")
        own_type = None
        if isinstance(own, str):
            own_type = resource_type or _meta_type(doc)
            if wanted.get(own) is None:
                wanted[own] = own_type
        location = None
        meta = doc.get("meta")
        if isinstance(meta, dict):
            uri = meta.get("location")
            if type(uri) is str:
                parsed = self.own_location(uri, own, own_type)
                if parsed is None:
                    parsed = self.endpoints.parse_uri(uri, self.source_base)
                if parsed is not None:
                    if wanted.get(parsed[1]) is None:
                        wanted[parsed[1]] = parsed[0]
                    location = parsed
            elif isinstance(uri, str):
                parsed = self.endpoints.parse_uri(uri, self.source_base)
                if parsed is not None:
                    self.add(parsed[1], parsed[0])
                    location = parsed
        if not edits and location is None and not external_id_keys:
            return _NO_EDITS
        return _Doc(edits, extensions, location, external_id_keys)


def _ref_key(item: Mapping[str, Any]) -> str | None:
    return next((k for k in item if k.lower() == "$ref"), None)


def _meta_type(doc: Mapping[str, Any]) -> str | None:
    meta = doc.get("meta")
    value = meta.get("resourceType") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None
