"""Versions and timestamps as one domain sees them (broker/scim/versions.py): sealed per domain
and resource, opened only for the domain and resource they were sealed for, coarsened for an
unlinkable domain. Pure: no database, no socket."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.domains import Domain
from broker.scim.versions import (
    PreconditionFailedError,
    VersionSealer,
    coarsen_epoch,
    coarsen_meta,
    coarsen_time,
    home_condition,
    present_etag,
    present_meta,
)
from broker.secrets import SecretBox

KEY = bytes(range(64))
SEALER = VersionSealer(KEY)
ALICE = "2819c223-7f76-453a-919d-413861904646"
BOB = "902c246b-6245-4190-8e05-00816be7344a"


@dataclass(frozen=True)
class Terms:
    id: str
    unlinkable: bool = False
    timestamp_precision: int = 1


def home_user(version: Any = 'W/"3"', **meta: Any) -> dict[str, Any]:
    return {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "id": "ext-1",
        "userName": "alice",
        "meta": {
            "resourceType": "User",
            "created": "2024-05-06T07:08:09.123456Z",
            "lastModified": "2024-05-06T07:08:09.654321+00:00",
            "location": "https://broker.example/scim/v2/Users/ext-1",
            "version": version,
            **meta,
        },
    }


# ------------------------------------------------------------------ sealing


def test_a_sealed_version_opens_to_homes_version_for_its_domain_and_resource_only() -> None:
    sealed = SEALER.seal('W/"3"', domain="D", internal_id=ALICE)
    assert SEALER.open(sealed, domain="D", internal_id=ALICE) == 'W/"3"'
    assert SEALER.open(sealed, domain="E", internal_id=ALICE) is None
    assert SEALER.open(sealed, domain="D", internal_id=BOB) is None
    assert SEALER.open(sealed, domain="D", internal_id=ALICE + "x") is None
    assert VersionSealer(bytes(64)).open(sealed, domain="D", internal_id=ALICE) is None


def test_sealing_is_deterministic_so_if_none_match_caching_works() -> None:
    assert SEALER.seal('W/"3"', domain="D", internal_id=ALICE) == SEALER.seal(
        'W/"3"', domain="D", internal_id=ALICE
    )
    assert SEALER.seal('W/"3"', domain="D", internal_id=ALICE) != SEALER.seal(
        'W/"4"', domain="D", internal_id=ALICE
    )


def test_the_memo_answers_what_sealing_afresh_gives_across_versions_domains_and_a_full_memo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the memo keeps (one version per domain and resource) is never a stale answer: a
    resource read at a new version, the same resource in another domain, the same version of
    another resource, and the answers after the memo filled up and was dropped, are each what a
    sealer with no memo gives."""
    sealer = VersionSealer(KEY)
    monkeypatch.setattr(sealer, "MEMO_SIZE", 3)
    fresh = VersionSealer(KEY)

    def afresh(version: str, domain: str, internal_id: str) -> str:
        fresh._sealed.clear()
        return fresh.seal(version, domain=domain, internal_id=internal_id)

    asked = [
        ('W/"1"', "D", ALICE), ('W/"2"', "D", ALICE), ('W/"1"', "D", ALICE),
        ('W/"1"', "E", ALICE), ('W/"1"', "D", BOB), ('"9"', "E", BOB),
        ('W/"2"', "D", ALICE), ('W/"1"', "D", BOB),
    ]  # fmt: skip
    for version, domain, internal_id in asked * 2:
        expected = afresh(version, domain, internal_id)
        assert sealer.seal(version, domain=domain, internal_id=internal_id) == expected
        assert sealer.sealing(domain)(version, internal_id) == expected
        assert sum(len(m) for m in sealer._sealed.values()) <= 3


def test_one_home_version_is_a_different_etag_in_every_domain_and_resource() -> None:
    etags = {
        SEALER.seal('W/"7"', domain=d, internal_id=i) for d in ("D", "E", "F") for i in (ALICE, BOB)
    }
    assert len(etags) == 6
    assert not any(e.removeprefix("W/").strip('"') == "7" for e in etags)


def test_a_weak_version_stays_weak_and_a_strong_one_strong() -> None:
    weak = SEALER.seal('W/"3"', domain="D", internal_id=ALICE)
    strong = SEALER.seal('"3"', domain="D", internal_id=ALICE)
    assert weak.startswith('W/"') and weak.endswith('"')
    assert strong.startswith('"') and strong.endswith('"') and not strong.startswith("W/")
    # The domain may send either form back (RFC 7644 section 3.14 compares weakly).
    assert SEALER.open(weak.removeprefix("W/"), domain="D", internal_id=ALICE) == 'W/"3"'
    assert SEALER.open("W/" + strong, domain="D", internal_id=ALICE) == '"3"'


def test_the_length_of_homes_version_does_not_show() -> None:
    # A global counter's digit count would say roughly when the resource last changed.
    lengths = {
        len(SEALER.seal(f'W/"{n}"', domain="D", internal_id=ALICE)) for n in (1, 10, 1000, 10**9)
    }
    assert len(lengths) == 1


def test_a_lazy_key_is_loaded_on_first_use_only() -> None:
    loads: list[int] = []

    def key() -> bytes:
        loads.append(1)
        return KEY

    sealer = VersionSealer(key)
    assert loads == []
    sealed = sealer.seal('W/"3"', domain="D", internal_id=ALICE)
    assert sealer.open(sealed, domain="D", internal_id=ALICE) == 'W/"3"'
    assert loads == [1]
    assert sealed == SEALER.seal('W/"3"', domain="D", internal_id=ALICE)


def test_a_version_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        VersionSealer(bytes(32))


def test_the_version_key_is_a_subkey_of_the_outbox_key_not_the_key_itself() -> None:
    box = SecretBox(bytes(range(32)))
    key = box.derive("version seal", 64)
    assert len(key) == 64 and bytes(range(32)) not in key
    assert key == SecretBox(bytes(range(32))).derive("version seal", 64)
    assert box.derive("set txn") != key[:32]


@pytest.mark.parametrize(
    "etag",
    [
        "",
        '""',
        "*",
        'W/"3"',
        '"3"',
        "not base64 !",
        '"' + "A" * 2000 + '"',
        '"' + base64.urlsafe_b64encode(bytes(48)).decode().rstrip("=") + '"',
    ],
)
def test_an_etag_the_broker_did_not_issue_opens_to_nothing(etag: str) -> None:
    assert SEALER.open(etag, domain="D", internal_id=ALICE) is None


@given(
    version=st.text(min_size=1, max_size=80).filter(lambda v: v.strip() == v),
    domain=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    internal_id=st.text(min_size=1, max_size=40),
)
def test_every_version_round_trips(version: str, domain: str, internal_id: str) -> None:
    sealed = SEALER.seal(version, domain=domain, internal_id=internal_id)
    assert SEALER.open(sealed, domain=domain, internal_id=internal_id) == version
    assert SEALER.open(sealed, domain=domain + "x", internal_id=internal_id) is None


@given(
    version=st.text(min_size=1, max_size=40),
    position=st.integers(min_value=0),
    flip=st.integers(min_value=1, max_value=255),
)
def test_a_tampered_etag_is_refused(version: str, position: int, flip: int) -> None:
    sealed = SEALER.seal(version, domain="D", internal_id=ALICE)
    opaque = sealed.removeprefix("W/").strip('"')
    raw = bytearray(base64.urlsafe_b64decode(opaque + "=" * (-len(opaque) % 4)))
    raw[position % len(raw)] ^= flip
    forged = '"' + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=") + '"'
    assert SEALER.open(forged, domain="D", internal_id=ALICE) is None


@given(
    versions=st.lists(st.integers(min_value=0, max_value=10**6), min_size=2, max_size=5),
    domains=st.lists(
        st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,8}", fullmatch=True),
        min_size=2,
        max_size=4,
        unique=True,
    ),
)
def test_no_two_domains_share_an_etag_for_any_version(
    versions: list[int], domains: list[str]
) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for domain in domains:
        for version in versions:
            etag = SEALER.seal(f'W/"{version}"', domain=domain, internal_id=ALICE)
            assert seen.setdefault(etag, (domain, version)) == (domain, version)


# ------------------------------------------------------------------ conditional requests


def test_if_match_opens_to_homes_version() -> None:
    etag = present_etag('W/"3"', domain="D", internal_id=ALICE, sealer=SEALER)
    assert etag is not None
    assert home_condition(etag, domain="D", internal_id=ALICE, sealer=SEALER) == 'W/"3"'


def test_a_condition_with_another_domains_etag_matches_nothing() -> None:
    # E's ETag for the same resource and version: D cannot use it, nor learn that it is one.
    etag = SEALER.seal('W/"3"', domain="E", internal_id=ALICE)
    assert home_condition(etag, domain="D", internal_id=ALICE, sealer=SEALER) is None


def test_a_condition_with_homes_raw_version_matches_nothing() -> None:
    # A domain that guesses home's counter gets nowhere: If-Match 412, If-None-Match no match.
    assert home_condition('W/"3"', domain="D", internal_id=ALICE, sealer=SEALER) is None
    assert home_condition('"3", W/"4"', domain="D", internal_id=ALICE, sealer=SEALER) is None


def test_a_list_keeps_the_tags_that_open_and_drops_the_others() -> None:
    mine = [SEALER.seal(f'W/"{n}"', domain="D", internal_id=ALICE) for n in (3, 4)]
    header = f'"junk", {mine[0]},W/"7" , {mine[1]}, {mine[0]}'
    assert home_condition(header, domain="D", internal_id=ALICE, sealer=SEALER) == 'W/"3", W/"4"'


def test_an_if_match_that_opens_to_nothing_is_a_412_error_with_advice() -> None:
    error = PreconditionFailedError()
    assert error.status == 412 and error.scim_type is None
    assert "ETag" in error.detail


def test_a_star_stays_a_star() -> None:
    assert home_condition(" * ", domain="D", internal_id=ALICE, sealer=SEALER) == "*"


@pytest.mark.parametrize("header", [None, "", "   ", ",,,", '"unterminated', "W/", '"a" "b"'])
def test_an_empty_or_malformed_condition_matches_nothing(header: str | None) -> None:
    assert home_condition(header, domain="D", internal_id=ALICE, sealer=SEALER) is None


@given(st.text(max_size=200))
def test_any_header_a_domain_sends_is_read_without_error(header: str) -> None:
    result = home_condition(header, domain="D", internal_id=ALICE, sealer=SEALER)
    assert result is None or result == "*"


# ------------------------------------------------------------------ present_meta


def test_present_meta_seals_the_version_and_leaves_the_rest() -> None:
    doc = home_user()
    out = present_meta(doc, domain=Terms("D"), internal_id=ALICE, sealer=SEALER)
    assert out["meta"]["version"] == SEALER.seal('W/"3"', domain="D", internal_id=ALICE)
    assert {k: v for k, v in out["meta"].items() if k != "version"} == {
        k: v for k, v in doc["meta"].items() if k != "version"
    }
    assert doc["meta"]["version"] == 'W/"3"', "the input is not changed"
    assert out["userName"] == "alice"


def test_present_meta_coarsens_timestamps_for_an_unlinkable_domain_only() -> None:
    unlinkable = present_meta(
        home_user(), domain=Terms("D", unlinkable=True), internal_id=ALICE, sealer=SEALER
    )
    assert unlinkable["meta"]["created"] == "2024-05-06T07:08:09Z"
    assert unlinkable["meta"]["lastModified"] == "2024-05-06T07:08:09+00:00"
    minute = present_meta(
        home_user(),
        domain=Terms("D", unlinkable=True, timestamp_precision=60),
        internal_id=ALICE,
        sealer=SEALER,
    )
    assert minute["meta"]["created"] == "2024-05-06T07:08:00Z"
    linkable = present_meta(home_user(), domain=Terms("D"), internal_id=ALICE, sealer=SEALER)
    assert linkable["meta"]["created"] == "2024-05-06T07:08:09.123456Z"


def test_a_domain_object_is_an_audience() -> None:
    domain = Domain(
        id="D",
        kind="peer",
        scim_url=None,
        credential_ref=None,
        push=False,
        scope_filter=None,
        attribute_policy={},
        status="active",
        created_at=None,  # type: ignore[arg-type]
        unlinkable=True,
        timestamp_precision=3600,
    )
    out = present_meta(home_user(), domain=domain, internal_id=ALICE, sealer=SEALER)
    assert out["meta"]["created"] == "2024-05-06T07:00:00Z"


@pytest.mark.parametrize("version", [None, 3, {"v": 1}, "", "   "])
def test_a_version_that_cannot_be_sealed_is_not_shown_raw(version: Any) -> None:
    out = present_meta(home_user(version), domain=Terms("D"), internal_id=ALICE, sealer=SEALER)
    assert "version" not in out["meta"]


def test_meta_is_found_whatever_its_case_and_a_missing_meta_is_fine() -> None:
    doc = {"id": "ext-1", "Meta": {"Version": 'W/"9"', "LASTMODIFIED": "2024-01-01T00:00:00.5Z"}}
    out = present_meta(doc, domain=Terms("D", unlinkable=True), internal_id=ALICE, sealer=SEALER)
    assert out["Meta"]["Version"] == SEALER.seal('W/"9"', domain="D", internal_id=ALICE)
    assert out["Meta"]["LASTMODIFIED"] == "2024-01-01T00:00:00Z"
    bare = {"id": "ext-1", "meta": "not an object"}
    assert present_meta(bare, domain=Terms("D"), internal_id=ALICE, sealer=SEALER) == bare
    assert present_meta({"id": "x"}, domain=Terms("D"), internal_id=ALICE, sealer=SEALER) == {
        "id": "x"
    }


# ------------------------------------------------------------------ coarsening


@pytest.mark.parametrize(
    ("value", "precision", "expected"),
    [
        ("2024-05-06T07:08:09Z", 1, "2024-05-06T07:08:09Z"),
        ("2024-05-06T07:08:09.1Z", 1, "2024-05-06T07:08:09Z"),
        ("2024-05-06T07:08:09.999999999999999999Z", 1, "2024-05-06T07:08:09Z"),
        ("2024-05-06T07:08:09.123456+00:00", 1, "2024-05-06T07:08:09+00:00"),
        ("2024-05-06T07:08:09.5-00:00", 1, "2024-05-06T07:08:09-00:00"),
        ("2024-05-06t07:08:09.5z", 1, "2024-05-06t07:08:09z"),
        ("2024-05-06 07:08:09.5Z", 1, "2024-05-06 07:08:09Z"),
        ("2024-05-06T07:08:59.999Z", 60, "2024-05-06T07:08:00Z"),
        ("2024-05-06T07:59:59Z", 3600, "2024-05-06T07:00:00Z"),
        # Truncated as an instant, written in home's offset: 07:38:09+05:30 is 02:08:09Z.
        ("2024-05-06T07:38:09.5+05:30", 3600, "2024-05-06T07:30:00+05:30"),
        ("2024-05-06T00:00:30-08:00", 60, "2024-05-06T00:00:00-08:00"),
        ("1969-12-31T23:59:59.5Z", 60, "1969-12-31T23:59:00Z"),
        ("2024-12-31T23:59:59.9Z", 86400, "2024-12-31T00:00:00Z"),
    ],
)
def test_timestamps_are_truncated_in_the_form_home_wrote_them(
    value: str, precision: int, expected: str
) -> None:
    assert coarsen_time(value, precision) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        1715000000,
        1715000000.5,
        ["2024-05-06T07:08:09Z"],
        {"at": "2024-05-06T07:08:09Z"},
        "",
        "yesterday",
        "2024-05-06",
        "2024-05-06T07:08:09",  # no zone: not RFC 3339
        "2024-05-06T07:08Z",
        "2024-05-06T07:08:09.Z",
        "2024-02-30T00:00:00Z",
        "2024-05-06T24:00:00Z",
        "2024-05-06T23:59:60Z",  # a leap second
        "2024-05-06T07:08:09+24:00",
        "2024-05-06T07:08:09+05:60",
        "2024-05-06T07:08:09.5Z trailing",
        " 2024-05-06T07:08:09Z",
        "٢٠٢٤-05-06T07:08:09Z",  # Arabic-Indic digits
        "9999-12-31T23:59:59-01:00",  # past year 9999 in UTC
    ],
)
def test_what_is_not_an_rfc3339_date_time_is_not_coarsened_but_refused(value: Any) -> None:
    assert coarsen_time(value, 1) is None


def test_a_timestamp_that_cannot_be_coarsened_is_dropped_not_shown() -> None:
    doc = home_user(created="2024-05-06T07:08:09.123456", lastModified=1715000000.123456)
    out = coarsen_meta(doc, 1)
    assert "created" not in out["meta"] and "lastModified" not in out["meta"]
    assert out["meta"]["version"] == 'W/"3"'
    assert doc["meta"]["created"] == "2024-05-06T07:08:09.123456", "the input is not changed"


def test_a_precision_below_one_second_is_refused() -> None:
    with pytest.raises(ValueError):
        coarsen_time("2024-05-06T07:08:09Z", 0)
    with pytest.raises(ValueError):
        coarsen_epoch(1715000000, 0)


@given(
    seconds=st.integers(min_value=-(10**10), max_value=10**10),
    precision=st.integers(min_value=1, max_value=86400),
)
def test_a_coarsened_epoch_is_a_multiple_within_one_step(seconds: int, precision: int) -> None:
    coarse = coarsen_epoch(seconds, precision)
    assert coarse % precision == 0
    assert 0 <= seconds - coarse < precision


@given(
    instant=st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2200, 1, 1),
    ),
    micro=st.integers(min_value=0, max_value=999999),
    precision=st.sampled_from([1, 7, 60, 3600, 86400]),
)
def test_two_instants_in_one_step_look_the_same(instant: Any, micro: int, precision: int) -> None:
    stamp = instant.strftime("%Y-%m-%dT%H:%M:%S")
    coarse = coarsen_time(f"{stamp}.{micro:06d}Z", precision)
    assert coarse is not None and coarse == coarsen_time(f"{stamp}Z", precision)
    assert coarsen_time(coarse, precision) == coarse


# ------------------------------------------------------------------ filters and sortBy
