"""Hypothesis: the page path's one-walk translation (``translate_page``) is the general path.

For generated home documents (odd key spellings, URN-qualified extensions, a plain reference
attribute, missing and non-string values, foreign and relative URIs, types home does not serve,
an ``externalId`` however spelled) and any answer of the store, :class:`OutboundPage` lists the
same IDs in the same order with the same types as :func:`ids_in_resources`, and renders the
same documents, byte for byte once serialised, as :func:`resources_for_domain` (or fails the
same way), whether it renders copies or rewrites documents it owns in place. Likewise ``Endpoints.parse_uri``'s fast prefix path against the general one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.scim.outbound import (
    DomainView,
    ids_in_resources,
    resources_for_domain,
    translate_page,
)
from broker.scim.rewrite import Endpoints, Translation
from broker.scim.schemas import DEFAULT_REFERENCES, ENTERPRISE_USER, ReferenceMap

HOME = "http://home.internal/v2"
BROKER = "https://broker.example/scim/v2"
CUSTOM = "urn:example:params:scim:schemas:extension:sponsorship:2.0:User"
REFS = ReferenceMap.from_schemas(
    [
        {
            "id": "urn:ietf:params:scim:schemas:core:2.0:User",
            "attributes": [
                {
                    "name": "groups",
                    "type": "complex",
                    "multiValued": True,
                    "subAttributes": [
                        {"name": "value", "type": "string"},
                        {"name": "$ref", "type": "reference", "referenceTypes": ["Group"]},
                    ],
                },
            ],
        },
        {
            "id": "urn:ietf:params:scim:schemas:core:2.0:Group",
            "attributes": [
                {
                    "name": "members",
                    "type": "complex",
                    "multiValued": True,
                    "subAttributes": [
                        {"name": "value", "type": "string"},
                        {"name": "$ref", "type": "reference", "referenceTypes": ["User", "Group"]},
                    ],
                },
                {
                    "name": "owner",
                    "type": "complex",
                    "subAttributes": [
                        {"name": "$ref", "type": "reference", "referenceTypes": ["Device"]},
                    ],
                },
            ],
        },
        {
            "id": CUSTOM,
            "attributes": [
                {"name": "sponsor", "type": "reference", "referenceTypes": ["User"]},
                {
                    "name": "mentors",
                    "type": "complex",
                    "multiValued": True,
                    "subAttributes": [
                        {"name": "$ref", "type": "reference", "referenceTypes": ["User"]},
                    ],
                },
            ],
        },
        {
            "id": ENTERPRISE_USER,
            "attributes": [
                {
                    "name": "manager",
                    "type": "complex",
                    "subAttributes": [
                        {"name": "$ref", "type": "reference", "referenceTypes": ["User"]},
                    ],
                }
            ],
        },
    ],
    [{"name": "User", "schemaExtensions": [{"schema": CUSTOM}, {"schema": ENTERPRISE_USER}]}],
)
ENDPOINTS = Endpoints({"User": "/Users", "Group": "/Groups"})
ODD_ENDPOINTS = Endpoints({"User": "/Users", "Group": "/groups", "Other": "/USERS"})

ids = st.sampled_from([f"{n:032x}" for n in range(1, 9)])
words = st.text(alphabet="abcXYZ-_/:?#. ", max_size=6)


def spellings(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.upper(), name.capitalize(), name.swapcase()])


@st.composite
def uri(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    rid = draw(ids)
    endpoint = draw(st.sampled_from(["Users", "Groups", "users", "GROUPS", "Devices", ""]))
    if kind <= 4:
        return f"{HOME}/{endpoint}/{rid}"
    if kind == 5:
        return f"{HOME.upper()}/{endpoint}/{rid}{draw(words)}"
    if kind == 6:
        return f"/v2/{endpoint}/{rid}"  # relative: home's path
    if kind == 7:
        return f"http://elsewhere.example/v2/{endpoint}/{rid}"
    if kind == 8:
        return draw(st.sampled_from([None, 7, [rid], f"urn:odd:{rid}", ""]))
    return f"{HOME}/{endpoint}/{rid}/{draw(words)}"


@st.composite
def reference(draw: st.DrawFn) -> Any:
    """One value of a complex reference attribute, as home might write it (or not)."""
    if draw(st.integers(0, 12)) == 0:
        return draw(st.sampled_from([None, "just-a-string", 3, [1]]))
    item: dict[str, Any] = {}
    if draw(st.integers(0, 5)):
        key = draw(st.sampled_from(["value", "value", "value", "Value", "VALUE"]))
        item[key] = draw(st.one_of(ids, ids, ids, st.sampled_from([None, 5, ["x"]])))
    if draw(st.booleans()):
        key = draw(st.sampled_from(["$ref", "$ref", "$ref", "$Ref", "$REF"]))
        item[key] = draw(uri())
    if draw(st.booleans()):
        item["type"] = draw(st.sampled_from(["User", "Group", "user", "Device", 4, None]))
    if draw(st.booleans()):
        item["display"] = draw(words)
    return item


@st.composite
def document(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"]}
    fields = draw(
        st.lists(
            st.sampled_from(
                [
                    "id",
                    "externalId",
                    "userName",
                    "groups",
                    "members",
                    "owner",
                    "sponsor",
                    "manager",
                    "meta",
                    "enterprise",
                    "custom",
                    "null",
                ]
            ),
            unique=True,
            max_size=10,
        )
    )
    for field in fields:
        if field == "id":
            doc["id"] = draw(st.one_of(ids, ids, ids, st.sampled_from([None, 1])))
        elif field == "externalId":
            doc[draw(spellings("externalId"))] = draw(words)
        elif field == "userName":
            doc["userName"] = draw(words)
        elif field in ("groups", "members"):
            many = draw(st.lists(reference(), max_size=4))
            doc[draw(spellings(field))] = many if draw(st.integers(0, 5)) else draw(reference())
        elif field == "owner":
            doc["owner"] = draw(reference())
        elif field == "sponsor":  # a plain reference attribute, unqualified
            doc[draw(spellings("sponsor"))] = draw(st.one_of(uri(), st.lists(uri(), max_size=2)))
        elif field == "manager":  # an extension attribute, unqualified
            doc["manager"] = draw(reference())
        elif field == "meta":
            meta: dict[str, Any] = {"resourceType": draw(st.sampled_from(["User", "Group", 3]))}
            if draw(st.integers(0, 4)):
                meta["location"] = draw(uri())
            doc["meta"] = meta if draw(st.integers(0, 8)) else draw(words)
        elif field == "enterprise":
            urn = draw(st.sampled_from([ENTERPRISE_USER, ENTERPRISE_USER.upper()]))
            doc[urn] = (
                {"manager": draw(reference()), "department": draw(words)}
                if draw(st.integers(0, 6))
                else draw(words)
            )
        elif field == "custom":
            doc[CUSTOM] = {
                "sponsor": draw(uri()),
                draw(spellings("mentors")): draw(st.lists(reference(), max_size=2)),
            }
        else:
            doc["nickName"] = None
    return doc


@st.composite
def answers(draw: st.DrawFn) -> dict[str, DomainView]:
    known = draw(st.lists(ids, unique=True))
    return {
        i: DomainView(f"ext-{i[-4:]}", draw(st.sampled_from([None, f"hr-{i[-2:]}"]))) for i in known
    }


def general(
    docs: list[dict[str, Any]],
    views: dict[str, DomainView],
    translation: Translation,
    resource_type: str | None,
) -> tuple[dict[str, str | None], Any]:
    wanted = ids_in_resources(docs, translation, resource_type=resource_type)
    try:
        out: Any = resources_for_domain(docs, views, translation, resource_type=resource_type)
    except Exception as exc:  # the same failure is what is compared
        out = type(exc)
    return wanted, out


def fast(
    docs: list[dict[str, Any]],
    views: dict[str, DomainView],
    translation: Translation,
    resource_type: str | None,
) -> tuple[dict[str, str | None], Any]:
    page = translate_page(docs, translation, resource_type=resource_type)
    try:
        out: Any = page.render(views)
    except Exception as exc:
        out = type(exc)
    return page.wanted, out


def fast_in_place(
    docs: list[dict[str, Any]],
    views: dict[str, DomainView],
    translation: Translation,
    resource_type: str | None,
) -> tuple[dict[str, str | None], Any]:
    """The page path as the proxy runs it: home's documents parsed for this one call (a copy
    here, as orjson gives them) and rewritten where they lie."""
    owned = orjson.loads(orjson.dumps(docs))
    page = translate_page(owned, translation, resource_type=resource_type)
    try:
        out: Any = page.render(views, in_place=True)
    except Exception as exc:
        out = type(exc)
    return page.wanted, out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(document(), max_size=5),
    views=answers(),
    refs=st.sampled_from([REFS, DEFAULT_REFERENCES]),
    endpoints=st.sampled_from([ENDPOINTS, ODD_ENDPOINTS]),
    resource_type=st.sampled_from([None, "User", "Group"]),
    base=st.sampled_from([HOME, HOME + "/", "/v2"]),
)
def test_the_one_walk_page_is_the_general_path(
    docs: list[dict[str, Any]],
    views: dict[str, DomainView],
    refs: ReferenceMap,
    endpoints: Endpoints,
    resource_type: str | None,
    base: str,
) -> None:
    translation = Translation(refs, endpoints, base, BROKER)
    before = orjson.dumps(docs)
    wanted, out = general(docs, views, translation, resource_type)
    fast_wanted, fast_out = fast(docs, views, translation, resource_type)
    assert list(fast_wanted.items()) == list(wanted.items())
    if isinstance(out, type):
        assert fast_out is out
    else:
        assert orjson.dumps(fast_out) == orjson.dumps(out)  # the same keys, in the same order
    assert orjson.dumps(docs) == before  # home's documents are not changed
    owned_wanted, owned_out = fast_in_place(docs, views, translation, resource_type)
    assert list(owned_wanted.items()) == list(wanted.items())
    if isinstance(out, type):
        assert owned_out is out
    else:
        assert orjson.dumps(owned_out) == orjson.dumps(out)


def test_a_page_is_rendered_with_references_dropped_and_externalid_replaced() -> None:
    """A worked example: what the generated comparison checks, spelled out once."""
    translation = Translation(REFS, ENDPOINTS, HOME, BROKER)
    u1, u2, g1 = f"{1:032x}", f"{2:032x}", f"{3:032x}"
    doc = {
        "id": u1,
        "externalId": "home-hr-1",
        "groups": [
            {"value": g1, "$ref": f"{HOME}/Groups/{g1}", "display": "A"},
            {"value": u2, "$ref": f"{HOME}/Groups/{u2}"},  # no view: left out
        ],
        ENTERPRISE_USER: {"manager": {"value": u2, "$ref": f"{HOME}/Users/{u2}"}},
        "meta": {"resourceType": "User", "location": f"{HOME}/Users/{u1}"},
    }
    page = translate_page([doc], translation, resource_type="User")
    assert page.wanted == {g1: "Group", u2: "Group", u1: "User"}
    (out,) = page.render({u1: DomainView("me", "hr-1"), g1: DomainView("grp")})
    assert out == {
        "id": "me",
        "groups": [{"value": "grp", "$ref": f"{BROKER}/Groups/grp", "display": "A"}],
        ENTERPRISE_USER: {},
        "meta": {"resourceType": "User", "location": f"{BROKER}/Users/me"},
        "externalId": "hr-1",
    }


def reference_parse_uri(endpoints: Endpoints, uri: str, base: str) -> tuple[str, str] | None:
    """``Endpoints.parse_uri`` as it was before its fast path (issue 15)."""
    by_endpoint = {e.strip("/").lower(): t for t, e in endpoints.by_type.items()}
    base = base.rstrip("/")
    if "://" in uri:
        if uri[: len(base)].lower() != base.lower() or uri[len(base) : len(base) + 1] != "/":
            return None
        rest = uri[len(base) + 1 :]
    else:
        base_path = urlsplit(base).path
        if not uri.startswith(base_path + "/"):
            return None
        rest = uri[len(base_path) + 1 :]
    endpoint, _, resource_id = rest.partition("/")
    if not resource_id or "/" in resource_id or "?" in resource_id or "#" in resource_id:
        return None
    resource_type = by_endpoint.get(endpoint.lower())
    return (resource_type, resource_id) if resource_type is not None else None


@settings(max_examples=500, deadline=None)
@given(
    value=st.one_of(uri().filter(lambda u: isinstance(u, str)), st.text(max_size=40)),
    endpoints=st.sampled_from([ENDPOINTS, ODD_ENDPOINTS, Endpoints.default()]),
    base=st.sampled_from([HOME, HOME + "/", HOME + "//", "/v2", "http://HOME.internal/v2"]),
)
def test_parse_uri_fast_path_is_the_general_one(
    value: str, endpoints: Endpoints, base: str
) -> None:
    assert endpoints.parse_uri(value, base) == reference_parse_uri(endpoints, value, base)
