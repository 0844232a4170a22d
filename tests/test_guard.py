"""The leak guard's pure core: candidate tokens however written, internal IDs in play, scrub.
Unit and property tests, no I/O (the exact lookup is in test_leak_guard.py)."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import DEFAULT_ID_PATTERN
from broker.scim.guard import (
    IdShape,
    Scan,
    find_in_play,
    forms,
    known_in,
    lookup_keys,
    scrub,
    unescape_json,
)

SHAPE = IdShape(r"[0-9a-f]{32}")
DEFAULT = IdShape(DEFAULT_ID_PATTERN)
HOME_ID = "8fa37814bef94644829bf8b8642e0918"
DASHED = "8fa37814-bef9-4644-829b-f8b8642e0918"


def _escaped(value: str) -> str:
    """``value`` with its first character as a JSON escape, as it stands in raw JSON text."""
    return f"\\u{ord(value[0]):04x}{value[1:]}"


# Each way an internal ID can be written so that a whole-token, case-sensitive scan misses it.
RENDERINGS = {
    "plain": HOME_ID,
    "dash-glued": f"emp-{HOME_ID}",
    "underscore-glued": f"x_{HOME_ID}",
    "letter-glued": f"abc{HOME_ID}xyz",
    "upper case": HOME_ID.upper(),
    "dashed": DASHED,
    "dashed upper, glued": f"id:{DASHED.upper()}_",
    "inside a longer hex run": f"ff{HOME_ID}0a",
    "JSON escape": _escaped(HOME_ID),
    "double JSON escape": "\\" + _escaped(HOME_ID),
}


@pytest.mark.parametrize("shape", [SHAPE, DEFAULT], ids=["32-hex", "default"])
@pytest.mark.parametrize("rendering", list(RENDERINGS))
def test_a_home_id_is_a_candidate_however_it_is_written(shape: IdShape, rendering: str) -> None:
    text = json.dumps({"title": "x"}).replace('"x"', f'"{RENDERINGS[rendering]}"')
    assert HOME_ID in shape.candidates(text)
    assert DASHED in shape.candidates(text)
    scan = Scan.of("body", text, shape)
    assert find_in_play([scan], {HOME_ID}, shape) == find_in_play([scan], {DASHED}, shape)
    leak = find_in_play([scan], {HOME_ID.upper()}, shape)
    assert leak is not None and leak.where == "body" and HOME_ID not in leak.reason


def test_an_internal_id_of_another_shape_is_found_glued_and_in_any_case() -> None:
    for text in ("user 42 not found", "emp-42", "ID_AB12", "id ab12"):
        scan = Scan.of("body", text, SHAPE)
        assert find_in_play([scan], {"42", "Ab12"}, SHAPE) is not None, text
    assert find_in_play([Scan.of("body", "user 43", SHAPE)], {"42"}, SHAPE) is None


def test_in_play_names_the_first_part_that_holds_it_and_never_the_value() -> None:
    scans = [
        Scan.of("body", "{}", SHAPE),
        Scan.of("header ETag", f'W/"{HOME_ID.upper()}"', SHAPE),
    ]
    leak = find_in_play(scans, {HOME_ID}, SHAPE)
    assert leak is not None and leak.where == "header ETag" and HOME_ID not in leak.reason


def test_random_hex_and_the_brokers_own_ids_are_candidates_but_not_in_play() -> None:
    jti, txn = uuid.uuid4().hex, str(uuid.uuid4())
    text = json.dumps({"jti": jti, "txn": txn, "title": uuid.uuid4().hex})
    scan = Scan.of("SET", text, DEFAULT)
    assert jti in scan.candidates and txn in scan.candidates
    assert find_in_play([scan], {HOME_ID}, DEFAULT) is None


def test_forms_and_lookup_keys_cover_both_renderings_in_both_cases() -> None:
    assert forms(HOME_ID.upper()) == {HOME_ID, DASHED}
    assert forms(DASHED) == {HOME_ID, DASHED}
    assert forms("Emp42") == {"emp42"}
    assert lookup_keys([HOME_ID]) == {HOME_ID, DASHED, HOME_ID.upper(), DASHED.upper()}
    assert {"AbC9", "abc9", "ABC9"} <= lookup_keys(["AbC9"])


def test_known_in_names_each_part_holding_a_known_id() -> None:
    scans = [Scan.of(str(n), text, SHAPE) for n, text in enumerate(["a", f"x{DASHED}", "b"])]
    assert [leak.where for leak in known_in(scans, {HOME_ID.upper()})] == ["1"]


def test_json_escapes_of_ascii_are_undone_others_kept() -> None:
    assert unescape_json("\\u0061\\\\u0062\\u00e9c") == "ab\\u00e9c"
    text = "nothing to undo \\n"
    assert unescape_json(text) is text


def test_a_shape_with_anchors_is_looked_for_anywhere() -> None:
    anchored = IdShape(r"^[0-9a-f]{32}$")
    assert HOME_ID in anchored.candidates(f"emp-{HOME_ID}!")


@pytest.mark.parametrize("pattern", [r"\w{6}", r"(?<=x)[0-9]{4}", r"[^ ]{5}q"])
def test_a_shape_whose_alphabet_is_unknown_is_scanned_the_slow_way(pattern: str) -> None:
    shape = IdShape(pattern)
    assert not shape.shapes.fast
    text = "ab x1234 cdefgh zz1234q"
    expected = {
        m.group(1).lower() for m in re.finditer(f"(?=({pattern}))", text, re.I | re.A) if m.group(1)
    }
    assert shape.candidates(text) == expected


def test_scrub_replaces_known_ids_and_masks_the_rest_glued_and_in_any_case() -> None:
    other = "0" * 32
    text = f"User 'emp-{HOME_ID.upper()}' conflicts with 'x_{other}' and {DASHED}."
    assert scrub(text, {HOME_ID: "mine-1"}, SHAPE) == (
        "User 'emp-mine-1' conflicts with 'x_[id]' and mine-1."
    )


def test_scrub_masks_a_whole_long_hex_run_and_keeps_the_callers_ids() -> None:
    text = f"hash {HOME_ID}{HOME_ID}ff and yours {HOME_ID}"
    assert scrub(text, {HOME_ID: "mine-1"}, SHAPE) == "hash mine-1mine-1ff and yours mine-1"
    assert scrub(f"hash aa{HOME_ID}{HOME_ID}ff", {}, SHAPE) == "hash [id]"
    assert scrub("a\\b", {"a": "c\\d"}, SHAPE) == "c\\d\\b", "the replacement is taken literally"


# ---------------------------------------------------------------------------- properties

hex_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
glue = st.text(alphabet="0123456789abcdefxyzABCDEFXYZ-_ :\"'/\\.é€", max_size=8)


def _render(internal: str, dashed: bool, case: list[bool]) -> str:
    text = f"{internal[:8]}-{internal[8:12]}-{internal[12:16]}-{internal[16:20]}-{internal[20:]}"
    text = text if dashed else internal
    flips = case + [False] * len(text)
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=False))


@settings(max_examples=400, deadline=None)
@given(
    hex_ids,
    glue,
    glue,
    st.booleans(),
    st.lists(st.booleans(), max_size=36),
    st.booleans(),
    st.sampled_from([SHAPE, DEFAULT]),
)
def test_an_id_is_found_whatever_its_neighbours_case_and_rendering(
    internal: str,
    before: str,
    after: str,
    dashed: bool,
    case: list[bool],
    escaped: bool,
    shape: IdShape,
) -> None:
    rendered = _render(internal, dashed, case)
    if escaped:
        rendered = _escaped(rendered)
    text = json.dumps({"title": "?"}).replace("?", before + rendered + after)
    for written in (text, text.encode()):  # as a str, and as the bytes a response is sent as
        scan = Scan.of("body", written, shape)
        assert internal in scan.candidates
        assert find_in_play([scan], {internal}, shape) is not None
        assert lookup_keys(scan.tokens) & lookup_keys([internal])


texts = st.text(alphabet=st.sampled_from('0123456789abcdefABCDEFxX-_ é\\u"{}'), max_size=300)


@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from([r"[0-9a-f]{32}", DEFAULT_ID_PATTERN, r"[0-9a-f]{4}-?[0-9]{2}"]))
def test_the_prefiltered_scan_finds_exactly_what_the_slow_scan_finds(
    text: str, pattern: str
) -> None:
    fast, slow = IdShape(pattern), IdShape(pattern)
    slow.shapes.fast = False
    assert fast.shapes.fast
    assert fast.tokens(text) == slow.tokens(text)
    data = text.encode()  # the bytes a response is written from: the same tokens, both ways
    assert fast.tokens(data) == slow.tokens(data) == slow.tokens(text)


@pytest.mark.parametrize("pattern", [r"[0-9a-f]{32}", DEFAULT_ID_PATTERN, r"[0-9a-f]{16}"])
def test_the_sampled_prefilter_misses_no_run_as_long_as_the_shape_at_any_offset(
    pattern: str,
) -> None:
    """A text whose runs of the alphabet are all shorter than the shape is skipped after a look
    at every stride-th byte (issue 15); a run exactly as long as the shape, wherever it starts,
    is never skipped. Fails if the prefilter asks for one sampled byte too many."""
    shape = IdShape(pattern)
    assert shape.shapes.stride > 1
    width = len(shape.shapes.needle)
    run = "0123456789abcdef" * 3
    for offset in range(3 * shape.shapes.stride):
        whole = "xyz:" * 10 + "_" * offset + run[:width] + "_" + "xyz:" * 10
        short = "xyz:" * 10 + "_" * offset + run[: width - 1] + "_" + "xyz:" * 10
        for text in (whole, short):
            slow = IdShape(pattern)
            slow.shapes.fast = False
            assert shape.tokens(text) == slow.tokens(text) == shape.tokens(text.encode())
        assert shape.tokens(short) == set()
        assert run[:width] in shape.tokens(whole)


sparse = st.text(alphabet=st.sampled_from('xyz_ :/."u{}0a-'), max_size=400)


@settings(max_examples=300, deadline=None)
@given(sparse, hex_ids, st.integers(min_value=0, max_value=400), st.integers(26, 32))
def test_the_sampled_prefilter_finds_exactly_what_the_slow_scan_finds_in_sparse_text(
    text: str, internal: str, at: int, length: int
) -> None:
    """Text whose alphabet characters are sparse (the prefilter mostly answers alone), with one
    hex run as long as the shape or a little shorter, anywhere in it."""
    text = text[:at] + internal[:length] + text[at:]
    fast, slow = IdShape(r"[0-9a-f]{32}"), IdShape(r"[0-9a-f]{32}")
    slow.shapes.fast = False
    assert fast.tokens(text) == slow.tokens(text) == fast.tokens(text.encode())
    if length == 32:
        assert internal in fast.tokens(text)


@settings(max_examples=300, deadline=None)
@given(texts, st.sets(st.sampled_from(["é" + "a" * 31, "x" * 4, "\\u0041", "Ab-" * 3])))
def test_a_scan_of_the_bytes_is_the_scan_of_the_text(text: str, others: set[str]) -> None:
    """What the guard finds in the bytes a response is sent as is what it finds in the text:
    the tokens, their forms, and internal IDs in play of any shape (also behind escapes)."""
    text = text + "".join(sorted(others))
    as_text, as_bytes = Scan.of("body", text, SHAPE), Scan.of("body", text.encode(), SHAPE)
    assert as_bytes.tokens == as_text.tokens
    assert as_bytes.candidates == as_text.candidates
    assert as_bytes.texts == as_text.texts
    for value in others:
        assert (find_in_play([as_bytes], {value}, SHAPE) is None) == (
            find_in_play([as_text], {value}, SHAPE) is None
        )


@settings(max_examples=200, deadline=None)
@given(texts, st.lists(hex_ids, max_size=3))
def test_scrub_leaves_nothing_in_the_home_shape_but_the_callers_ids(
    text: str, known: list[str]
) -> None:
    replacements = {k: f"mine{n}" for n, k in enumerate(known)}
    out = scrub(text, replacements, SHAPE)
    assert not SHAPE.candidates(out.replace("mine", "...."))


escapable = st.text(alphabet=st.sampled_from('xyz_ :/."{}-é'), max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    escapable,
    hex_ids,
    st.integers(min_value=0, max_value=300),
    st.sets(st.integers(0, 35), max_size=36),
    st.sampled_from(["\\", "\\\\", "\\\\\\"]),
    st.integers(26, 36),
    st.sampled_from([r"[0-9a-f]{32}", DEFAULT_ID_PATTERN]),
)
def test_the_sampled_prefilter_finds_an_id_behind_json_escapes_as_the_slow_scan_does(
    text: str,
    internal: str,
    at: int,
    escaped: set[int],
    backslashes: str,
    length: int,
    pattern: str,
) -> None:
    """An ID (or a little less of it) with any of its characters written as JSON escapes of
    ASCII, singly or doubly escaped, anywhere in a text: the bytes' sampled scan, which
    unescapes only the stretches it finds, finds what the slow scan of the whole text finds.
    Fails if the prefilter's marks leave out an escape's bytes."""
    dashed = f"{internal[:8]}-{internal[8:12]}-{internal[12:16]}-{internal[16:20]}-{internal[20:]}"
    source = internal if length <= 32 else dashed[:length]
    rendered = "".join(
        f"{backslashes}u{ord(c):04x}" if n in escaped else c for n, c in enumerate(source[:length])
    )
    data = (text[:at] + rendered + text[at:]).encode()
    fast, slow = IdShape(pattern), IdShape(pattern)
    slow.shapes.fast = False
    assert fast.shapes.stride > 1
    assert fast.tokens(data) == slow.tokens(data)
    if length == 32:
        assert internal in fast.tokens(data)
