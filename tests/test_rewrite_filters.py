"""Filters are rewritten through the AST: IDs, value paths, references, externalId; unknown IDs match nothing."""

from __future__ import annotations

import pytest

from broker.scim.filters import NO_SUCH_ID, FilterError, filter_ids, parse_filter, rewrite_filter
from broker.scim.rewrite import Endpoints, Translation
from broker.scim.schemas import DEFAULT_REFERENCES, ENTERPRISE_USER

BROKER = "https://broker.example/scim/v2"
HOME = "http://home.internal/scim/v2"
INWARD = Translation(DEFAULT_REFERENCES, Endpoints.default(), BROKER, HOME)
IDS = {"ext-a": "int-a", "ext-b": "int-b"}


def inbound(text: str, external_ids: dict[str, list[str]] | None = None) -> str:
    ast = parse_filter(text)
    return str(rewrite_filter(ast, INWARD, ids=IDS, external_ids=external_ids or {}))


@pytest.mark.parametrize(
    ("given", "sent_home"),
    [
        ('id eq "ext-a"', 'id eq "int-a"'),
        ('ID eq "ext-a" and userName sw "id"', 'ID eq "int-a" and userName sw "id"'),
        (
            'members[value eq "ext-a" or display co "ext-b"]',
            'members[value eq "int-a" or display co "ext-b"]',
        ),
        ('members.value eq "ext-b"', 'members.value eq "int-b"'),
        ('members eq "ext-b"', 'members eq "int-b"'),
        ('groups.value ne "ext-a"', 'groups.value ne "int-a"'),
        (
            f'{ENTERPRISE_USER}:manager.value eq "ext-a"',
            f'{ENTERPRISE_USER}:manager.value eq "int-a"',
        ),
        (f'members.$ref eq "{BROKER}/Users/ext-a"', f'members.$ref eq "{HOME}/Users/int-a"'),
        ('not (id eq "ext-a") and members pr', 'not (id eq "int-a") and members pr'),
        ('userName eq "ext-a"', 'userName eq "ext-a"'),  # not an ID attribute: untouched
    ],
)
def test_ids_in_every_filter_position_are_translated(given: str, sent_home: str) -> None:
    assert inbound(given) == sent_home


def test_unknown_and_foreign_ids_match_nothing() -> None:
    assert inbound('id eq "guessed-internal-id"') == f'id eq "{NO_SUCH_ID}"'
    assert (
        inbound('members.$ref eq "http://elsewhere/Users/ext-a"')
        == f'members.$ref eq "{NO_SUCH_ID}"'
    )


def test_external_id_becomes_the_entities_the_domain_gave_it() -> None:
    assert inbound('externalId eq "bjensen"', {"bjensen": ["int-a"]}) == 'id eq "int-a"'
    assert (
        inbound('externalId eq "bjensen"', {"bjensen": ["int-a", "int-b"]})
        == 'id eq "int-a" or id eq "int-b"'
    )
    assert inbound('externalId eq "nobody"') == f'id eq "{NO_SUCH_ID}"'
    assert (
        inbound('externalId ne "x" and active eq true', {"x": ["int-a"]})
        == 'id ne "int-a" and active eq true'
    )


def test_filter_ids_lists_what_to_resolve() -> None:
    found = filter_ids(
        parse_filter(
            f'id eq "ext-a" or members[value eq "ext-b"] or externalId eq "e1" or members.$ref eq "{BROKER}/Groups/g"'
        ),
        INWARD,
    )
    assert found.ids == {"ext-a": None, "ext-b": None, "g": "Group"}
    assert found.external_ids == {"e1"}


@pytest.mark.parametrize("text", ['id sw "a"', 'members.value gt "a"', 'externalId co "x"'])
def test_ordering_and_substring_operators_on_ids_are_refused(text: str) -> None:
    with pytest.raises(FilterError, match="only be compared with eq or ne") as caught:
        filter_ids(parse_filter(text), INWARD)
    assert caught.value.status == 400 and caught.value.scim_type == "invalidFilter"


@pytest.mark.parametrize("text", ["userName eq", "((((", "not " * 40 + "id pr"])
def test_malformed_and_too_deep_filters_are_invalid_filter_errors(text: str) -> None:
    with pytest.raises(FilterError, match="invalid filter"):
        parse_filter(text)
