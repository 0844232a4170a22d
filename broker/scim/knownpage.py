"""The page path when every answer is already known (issue 15): one walk that translates home's
documents where they lie, asking a synchronous look-up (the mapping cache) for each ID, and
seals each ``meta.version`` on the way.

:func:`translate_known` takes the documents in order and rewrites each one exactly as
:meth:`broker.scim.outbound.OutboundPage.render` (in place) then
:func:`broker.scim.versions.present_meta` would, given the same answers, as long as the document
holds nothing but the common shapes (reference values ``{"value": ID, "$ref": URI, ...}`` that
the page path renders itself, ``id``, ``meta.location``, ``externalId``) and the look-up knows
every ID in it. At the first document for which either fails it stops, that document as home
wrote it: it and the documents after it go the general way (``translate_page``, the store,
``render``, ``present_meta``), so the result is the same whatever the cache holds (a property
test compares the two).

What makes it cheaper than planning then rendering: a value is checked against a memo of the
page (its ``$ref`` -> what it becomes), so the 500 group references of a 100-user page cost one
look-up each, and no plan is built. A document's own ID and ``meta.location`` are checked before
anything in it changes; each reference value is then rewritten as soon as it is checked, and
noted, so that the values already rewritten are put back if a later one fails (one pass over the
values instead of a check, then a rewrite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broker.scim.outbound import _UNKNOWN, View, _meta_type, _Planner
from broker.scim.rewrite import Translation
from broker.scim.schemas import RefAttr
from broker.scim.versions import _spelled

__all__ = ["KnownPrefix", "translate_known"]

Lookup = Callable[[str], View | None]
"""The answer for one internal ID, None when it is not known (a miss: the general path asks)."""
Seal = Callable[[str, str], str]
"""Home's version (stripped) and the resource's internal ID -> the version the domain sees."""

# What one reference value becomes: (its ID at home, the domain's ID, its new $ref (None: no
# $ref written), whether a $ref it has is dropped, its type, its $ref at home (None: none)).
_Entry = tuple[str, str, str | None, bool, str | None, str | None]
# Of a document's key sequence: the reference attributes and extensions (the planner's shape),
# the keys spelling externalId, and those spelling meta.
_Shape = tuple[tuple[tuple[str, bool, RefAttr | None], ...], list[str], tuple[str, ...]]


@dataclass
class KnownPrefix:
    """What :func:`translate_known` did: the first :attr:`count` documents are rewritten in
    place; :attr:`wanted` holds every internal ID they held (with its type as
    ``translate_page`` tells it), and :attr:`internal_ids` each one's own ID as home wrote it."""

    count: int
    wanted: dict[str, str | None]
    internal_ids: list[str]


def translate_known(
    docs: Sequence[dict[str, Any]],
    translation: Translation,
    lookup: Lookup,
    *,
    resource_type: str | None,
    seal: Seal | None = None,
    scope_own: frozenset[str] | None = None,
) -> KnownPrefix:
    """Rewrite in place the longest run of ``docs``, from the first, that needs no other answer
    than ``lookup``'s (see the module's text); with ``seal``, their ``meta.version`` too, as
    ``present_meta`` seals it for a domain that is not unlinkable. The documents must belong to
    the caller (parsed for this one call); those after :attr:`KnownPrefix.count` are left as
    they were.

    ``scope_own``, for a domain with a scope: the users a document may name without asking home
    whether they are in the scope (the page's own users, home's answer to a scoped search); a
    document naming any other user, or an ID whose type is not known, goes to the general path,
    which asks home (``Proxy.in_scope``)."""
    walk = _KnownWalk(translation, lookup, seal, scope_own)
    count = walk.run(docs, resource_type)
    return KnownPrefix(count, walk.wanted, walk.internal_ids)


# What a value with a given $ref (and no "type") becomes, whatever its answer: (its ID at home,
# its type, the prefix of its new $ref (None: no $ref written), whether its $ref is dropped).
_Static = tuple[str, str | None, str | None, bool]


class _Statics:
    """What a walk learns that holds for every walk with the same translation (one per home
    schema load): the planner's memos, the key shapes, the prefixes, and what each $ref tells
    (issue 15: a GET of one user made them all afresh, about half of its walk). Each memo is
    bounded, whatever home sends."""

    def __init__(self, translation: Translation) -> None:
        self.translation = translation
        self.planner = _Planner(translation)
        self.shapes: dict[tuple[str, ...], _Shape] = {}
        self.own_prefixes: dict[str | None, str | None] = {}
        self.meta_shapes: dict[tuple[str, ...], tuple[bool, tuple[str, ...]]] = {}
        """By ``meta``'s key sequence: whether it has ``location``, and its keys spelling
        ``version``."""
        self.by_ref: dict[int, dict[str, _Static]] = {}
        """By attribute: a value's $ref -> what a value with that $ref becomes."""


_STATICS: dict[int, _Statics] = {}
_NO_META: dict[str, Any] = {}
"""What a document without a ``meta`` object is read as: nothing is ever written to it."""


def _undo(done: list[tuple[dict[str, Any], _Entry]], count: int) -> int:
    """Put the values ``done`` lists back as home wrote them; ``count`` (what the walk
    returns)."""
    for item, entry in done:
        item["value"] = entry[0]
        if entry[2] is not None:
            item["$ref"] = entry[5]
    return count


def _statics(translation: Translation) -> _Statics:
    held = _STATICS.get(id(translation))
    if held is None or held.translation is not translation:
        if len(_STATICS) >= 16:  # two Translations per home schema load: a handful live
            _STATICS.clear()
        held = _STATICS[id(translation)] = _Statics(translation)
    return held


class _KnownWalk:
    """:func:`translate_known`'s walk, with the memos of its translation and the page's own."""

    def __init__(
        self,
        translation: Translation,
        lookup: Lookup,
        seal: Seal | None,
        scope_own: frozenset[str] | None = None,
    ) -> None:
        statics = _statics(translation)
        self.planner = statics.planner
        self.scope_own = scope_own
        self.refs = translation.refs
        self.targets = self.planner.targets
        self.lookup = lookup
        self.seal = seal
        self.answers: dict[str, View | None] = {}
        self.wanted: dict[str, str | None] = {}
        self.entries: dict[int, dict[Any, _Entry]] = {}
        """By attribute: a value's $ref -> what a value with that $ref (and its ID) becomes."""
        self.statics = statics
        self.shapes = statics.shapes
        self.own_prefixes = statics.own_prefixes
        self.meta_shapes = statics.meta_shapes
        self.internal_ids: list[str] = []
        """The own ID of each document rewritten, as home wrote it."""

    def answer(self, internal: str) -> View | None:
        answers = self.answers
        found = answers.get(internal, _UNKNOWN)
        if found is _UNKNOWN:
            found = answers[internal] = self.lookup(internal)
        return found  # type: ignore[no-any-return]

    def outside(self, internal: str, rtype: str | None) -> bool:
        """Whether ``Proxy.in_scope`` would ask home about ``internal`` (a user, or of no known
        type, not among the page's own users)."""
        assert self.scope_own is not None
        return rtype in (None, "User") and internal not in self.scope_own

    def want(self, internal: str, rtype: str | None) -> None:
        if self.wanted.get(internal) is None:
            self.wanted[internal] = rtype

    def shape(self, doc: dict[str, Any]) -> _Shape:
        """What matters in a document of this key sequence (kept: :attr:`shapes`)."""
        matter, external_id_keys = self.planner.shape(doc)
        held = (matter, external_id_keys, _spelled(doc, "meta"))
        if len(self.shapes) < 256:  # never an unbounded memo, whatever home sends
            self.shapes[tuple(doc)] = held
        return held

    def meta_shape(self, meta: dict[str, Any]) -> tuple[bool, tuple[str, ...]]:
        """Whether ``meta`` has ``location``, and its keys spelling ``version`` (kept:
        :attr:`meta_shapes`)."""
        held = ("location" in meta, _spelled(meta, "version"))
        if len(self.meta_shapes) < 256:  # never an unbounded memo, whatever home sends
            self.meta_shapes[tuple(meta)] = held
        return held

    def run(self, docs: Sequence[dict[str, Any]], resource_type: str | None) -> int:
        """Rewrite the documents in order, each checked whole first (what can fail without a
        change, its own ID and ``meta.location``; then each reference value rewritten as soon as
        its answer is known, all of them put back as they were if a later one fails); how many
        were rewritten before the first that needs the general path (left unchanged).

        One loop for the page, with what every document reads taken once (issue 15: a call and
        a dozen attribute look-ups per document were about a tenth of the walk)."""
        lookup, shapes, meta_shapes, wanted = (
            self.lookup,
            self.shapes,
            self.meta_shapes,
            self.wanted,
        )
        targets, seal, scope_own, internal_ids = (
            self.targets,
            self.seal,
            self.scope_own,
            self.internal_ids,
        )
        prefix_of: object = _UNKNOWN
        prefix: str | None = None
        for count, doc in enumerate(docs):
            own = doc.get("id") if type(doc) is dict else None
            if type(own) is not str:
                return count
            shape = shapes.get(tuple(doc)) or self.shape(doc)
            matter, external_id_keys, meta_keys = shape
            own_view = lookup(own)
            if own_view is None:
                return count  # unknown here, or invisible to the domain: the general path
            own_type = resource_type or _meta_type(doc)
            if scope_own is not None and self.outside(own, own_type):
                return count
            found = doc.get("meta")
            meta: dict[str, Any] = found if type(found) is dict else _NO_META
            has_location, version_names = meta_shapes.get(tuple(meta)) or self.meta_shape(meta)
            location: str | None = None
            located: tuple[str, str] | None = None
            if has_location:
                uri = meta["location"]
                if own_type is not prefix_of:  # the page's documents share their type
                    prefix_of, prefix = own_type, self.own_prefix(own_type)
                if (
                    prefix is not None
                    and type(uri) is str
                    and uri == prefix + own
                    and own
                    and "/" not in own
                    and "?" not in own
                    and "#" not in own
                ):
                    # home's URI of the document itself (what parse_uri reads as its type and
                    # ID): its own type's endpoint at the broker, and its own ID there.
                    location = targets[own_type] + own_view.external_id  # type: ignore[index]
                else:
                    moved = self.location(uri, own, own_view)
                    if moved is None:
                        return count
                    location, located = moved
            done: list[tuple[dict[str, Any], _Entry]] = []
            drops = False
            for key, is_extension, attr in matter:
                value = doc[key]
                if is_extension and isinstance(value, dict):
                    if self.refers(value, key):
                        return _undo(done, count)  # references in an extension: the general path
                    continue
                if attr is None or value is None:
                    continue
                dropping = self.rewrite(value if type(value) is list else (value,), attr, done)
                if dropping is None:
                    return _undo(done, count)
                drops = drops or dropping
            if scope_own is not None and any(self.outside(e[0], e[4]) for _, e in done):
                return _undo(done, count)  # names a user home has to say is in the scope or not
            # Checked: nothing below can fail. The IDs noted in the order translate_page notes
            # them (references, the document, its location): each has the first type it tells.
            if wanted.get(own) is None:
                wanted[own] = own_type
            if located is not None:
                self.want(located[1], located[0])
            if drops:
                for item, entry in done:
                    if entry[3]:
                        del item["$ref"]
            doc["id"] = own_view.external_id
            if has_location:
                if location is None:
                    del meta["location"]
                else:
                    meta["location"] = location
            for key in external_id_keys:
                doc.pop(key, None)
            if own_view.domain_external_id is not None:
                doc["externalId"] = own_view.domain_external_id
            internal_ids.append(own)
            if seal is None:
                continue
            if meta_keys == ("meta",):  # the common spelling: one meta
                for name in version_names:
                    value = meta[name]
                    tag = value.strip() if isinstance(value, str) else ""
                    if tag:
                        meta[name] = seal(tag, own)
                    else:
                        del meta[name]  # not a version the broker can seal: not shown raw
            else:
                self.versions(doc, meta_keys, own)
        return len(docs)

    def location(
        self, uri: Any, own: str, own_view: View
    ) -> tuple[str | None, tuple[str, str] | None] | None:
        """``meta.location`` other than home's URI of the document itself: what it becomes
        (None: dropped, as for what is not a URI of home's) and the ID it names, with its type,
        to note; None where the general path decides (an answer not known, a user outside the
        scope, a str subclass)."""
        if type(uri) is not str:
            return None if isinstance(uri, str) else (None, None)  # a str subclass: not orjson's
        parsed = self.planner.endpoints.parse_uri(uri, self.planner.source_base)
        if parsed is None:
            return (None, None)
        moved = own_view if parsed[1] == own else self.answer(parsed[1])
        if moved is None or (self.scope_own is not None and self.outside(parsed[1], parsed[0])):
            return None
        return self.targets[parsed[0]] + moved.external_id, parsed

    def refers(self, extension: dict[str, Any], urn: str) -> bool:
        """Whether an extension holds a reference attribute (the general path renders it)."""
        return any(self.refs.classify(k, urn)[1] is not None for k in extension)

    def own_prefix(self, own_type: str | None) -> str | None:
        """``{home's base}/{endpoint}/`` of ``own_type``, where ``meta.location`` is compared
        rather than parsed (None: always parsed)."""
        prefix = self.own_prefixes.get(own_type, _UNKNOWN)
        if prefix is _UNKNOWN:
            prefix = None if own_type is None else self.planner._own_prefix(own_type)
            if len(self.own_prefixes) < 64:  # a type home names in meta: a handful
                self.own_prefixes[own_type] = prefix
        return prefix  # type: ignore[no-any-return]

    def versions(self, doc: dict[str, Any], meta_keys: tuple[str, ...], own: str) -> None:
        """``meta.version`` sealed, as ``present_meta`` (in place) seals it."""
        assert self.seal is not None
        for key in meta_keys:
            meta = doc[key]
            if type(meta) is not dict:
                continue
            for name in _spelled(meta, "version"):
                value = meta[name]
                tag = value.strip() if isinstance(value, str) else ""
                if tag:
                    meta[name] = self.seal(tag, own)
                else:
                    del meta[name]  # not a version the broker can seal: not shown raw either

    def rewrite(
        self, values: Sequence[Any], attr: RefAttr, done: list[tuple[dict[str, Any], _Entry]]
    ) -> bool | None:
        """Rewrite each value as soon as what it becomes is known, noting it in ``done`` (to be
        put back if the document fails after); whether a value's ``$ref`` is to be dropped (left
        to the caller, once nothing can fail). None where a value needs the general path (a
        shape the planner does not render itself, or an ID the look-up does not know)."""
        if not attr.complex:
            return None
        entries = self.entries.get(id(attr))
        if entries is None:
            entries = self.entries[id(attr)] = {}
        drops = False
        for item in values:
            if type(item) is not dict:
                return None
            ref = item.get("$ref")
            entry = entries.get(ref) if type(ref) is str else None
            if entry is None or "type" in item or item.get("value") != entry[0]:
                entry = self.entry(item, attr, entries)
                if entry is None:
                    return None
            done.append((item, entry))
            item["value"] = entry[1]
            new = entry[2]
            if new is not None:
                item["$ref"] = new
            elif entry[3]:
                drops = True
        return drops

    def entry(
        self, item: dict[str, Any], attr: RefAttr, entries: dict[Any, _Entry]
    ) -> _Entry | None:
        """What ``item`` becomes, told as the planner tells it (kept in the page's memo where
        its $ref alone says it); None for the general path."""
        value = item.get("value")
        ref = item.get("$ref", _UNKNOWN)
        if type(value) is not str or not (ref is _UNKNOWN or type(ref) is str):
            return None
        by_ref: dict[str, _Static] | None = None
        if ref is not _UNKNOWN and "type" not in item:
            by_ref = self.statics.by_ref.get(id(attr))
            if by_ref is None:
                by_ref = self.statics.by_ref[id(attr)] = {}
            told = by_ref.get(ref)
            if told is not None and told[0] == value:  # an earlier walk told it
                return self.told(told, entries, ref)
        planner = self.planner
        types = planner.types.get(id(attr))
        if types is None:
            types = planner.types[id(attr)] = {}
        if ref is _UNKNOWN and any(k.lower() == "$ref" for k in item):
            return None  # "$REF" and the like: the general path
        declared = item.get("type")
        if not (declared is None or type(declared) is str):
            return None
        held = None if ref is _UNKNOWN else ref
        rtype = types.get((declared, held), _UNKNOWN)
        if rtype is _UNKNOWN:
            rtype = planner._type_of(item, attr)
            if len(types) < 16_384:
                types[declared, held] = rtype
        if ref is not _UNKNOWN and rtype is not None and rtype not in self.targets:
            return None  # the planner hands such a value to the general functions
        if by_ref is not None and len(by_ref) < 4096:
            by_ref[ref] = (
                value,
                rtype,
                None if rtype is None else self.targets[rtype],
                rtype is None,
            )
        view = self.answer(value)
        if view is None:
            return None
        new = view.external_id
        if ref is _UNKNOWN:
            entry: _Entry = (value, new, None, False, rtype, None)
        elif rtype is None:
            entry = (value, new, None, True, None, ref)
        else:
            entry = (value, new, self.targets[rtype] + new, False, rtype, ref)
        self.want(value, rtype)
        if ref is not _UNKNOWN and "type" not in item and len(entries) < 4096:
            entries[ref] = entry  # its type told by its $ref alone, as the planner's memo says
        return entry

    def told(self, told: _Static, entries: dict[Any, _Entry], ref: str) -> _Entry | None:
        """:meth:`entry` of a value whose $ref an earlier walk told: only its answer asked."""
        value, rtype, prefix, dropped = told
        view = self.answer(value)
        if view is None:
            return None
        new = view.external_id
        entry = (value, new, None if prefix is None else prefix + new, dropped, rtype, ref)
        self.want(value, rtype)
        if len(entries) < 4096:
            entries[ref] = entry
        return entry
