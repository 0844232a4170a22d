"""The leak guard and the scrubber of free text, pure."""

from __future__ import annotations

from broker.scim.guard import IdShape, find_leak, scrub

SHAPE = IdShape(r"[0-9a-f]{32}")
HOME_ID = "8fa37814bef94644829bf8b8642e0918"


def test_an_internal_id_in_a_body_or_a_header_is_a_leak_and_says_where_not_what() -> None:
    leak = find_leak(
        [("body", "{}"), ("header ETag", f'W/"{HOME_ID}"')],
        internal_ids={HOME_ID},
        id_pattern=SHAPE,
        allowed=set(),
    )
    assert leak is not None and leak.where == "header ETag" and HOME_ID not in leak.reason


def test_the_callers_own_ids_and_longer_hashes_are_not_leaks() -> None:
    text = f'{{"id": "{HOME_ID}", "etag": "{HOME_ID}abcdef01"}}'
    assert (
        find_leak([("body", text)], internal_ids=set(), id_pattern=SHAPE, allowed={HOME_ID}) is None
    )


def test_an_internal_id_of_another_shape_is_still_found() -> None:
    leak = find_leak(
        [("body", "user 42 not found")], internal_ids={"42"}, id_pattern=SHAPE, allowed=set()
    )
    assert leak is not None


def test_scrub_replaces_known_ids_and_masks_the_rest() -> None:
    other = "0" * 32
    text = f"User '{HOME_ID}' conflicts with '{other}'"
    assert scrub(text, {HOME_ID: "mine-1"}, SHAPE) == "User 'mine-1' conflicts with '[id]'"
