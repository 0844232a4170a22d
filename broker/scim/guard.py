"""The leak guard's pure core (DESIGN sections 3 and 8.5): where the home's ID shape occurs in a
text, and which internal IDs in play a text holds. No I/O.

The guard is not the mechanism: the rewriter is. Tests show the rewriter never needs it. What
the guard blocks is decided by :class:`broker.mapping.guard.LeakGuard`, which adds the one fact a
shape cannot give: whether a string in the home's ID shape really is an internal ID (an exact
lookup). This module only finds the *candidates*, however they are written:

- without regard to case (``8FA3...`` is ``8fa3...``);
- however they are glued to their neighbours (``emp-<id>``, ``x_<id>``, ``abc<id>``), including
  every window inside a longer run (a 32-hex ID inside 40 hex digits);
- for hex UUID shapes, in both the 32-hex and the dashed (8-4-4-4-12) rendering, so that a
  dashed rendering of an undashed home ID is caught, and the reverse;
- behind JSON ``\\u00XX`` escapes of ASCII characters.

Speed: a page of 100 users is about 150 KB and every domain-bound response is scanned. A regular
expression with a leading character class is slow in CPython's ``re`` (it is tried at every
position), so the scan maps the shape's alphabet to one byte with ``bytes.translate`` and looks
for a literal run of it; the shape itself is only tried inside the (rare) runs long enough to
hold it. Shapes whose alphabet cannot be read off the pattern (``.``, ``\\w``, look-arounds) are
scanned the slow way, with the same result.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IdShape",
    "Leak",
    "Scan",
    "find_in_play",
    "forms",
    "lookup_keys",
    "scrub",
    "unescape_json",
]

_WORD = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
_HEX = "0123456789abcdefABCDEF"
_HEX32 = r"[0-9a-f]{32}"
_DASHED = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_SAMPLE = "0123456789abcdef0123456789abcdef"
# A JSON escape of an ASCII character (any number of backslashes: a doubly escaped one too).
_ESCAPE = re.compile(r"\\+u00([0-7][0-9a-fA-F])")
_ESCAPED = re.compile(r"\\u00[0-7][0-9a-fA-F]")  # the same, found fast (no leading repeat)
_ESCAPE_BYTES = re.compile(_ESCAPE.pattern.encode())
_ESCAPED_BYTES = re.compile(_ESCAPED.pattern.encode())


def _dashed(hex32: str) -> str:
    h = hex32
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _is_hex32(value: str) -> bool:
    # String operations rather than a regular expression: the guard asks this of every internal
    # ID in play, hundreds per page.
    return len(value) == 32 and value.isascii() and not value.strip(_HEX)


def _is_dashed(value: str) -> bool:
    return (
        len(value) == 36
        and value[8] == value[13] == value[18] == value[23] == "-"
        and value.isascii()
        and not value.replace("-", "").strip(_HEX)
    )


def forms(token: str) -> frozenset[str]:
    """The canonical forms of a token: lower case, and for a hex UUID both its 32-hex and its
    dashed rendering."""
    lowered = token.lower()
    if _is_hex32(lowered):
        return frozenset({lowered, _dashed(lowered)})
    if _is_dashed(lowered):
        return frozenset({lowered, lowered.replace("-", "")})
    return frozenset({lowered})


def lookup_keys(tokens: Iterable[str]) -> set[str]:
    """The exact strings to look up among the internal IDs for these tokens: each as written, in
    lower and in upper case, and for a hex UUID in both renderings (in each of those cases).

    Internal IDs are stored as home wrote them; a home writes its hex IDs in one case, and an ID
    of mixed case (base62) is found as written or wholly re-cased.
    """
    keys: set[str] = set()
    for token in tokens:
        for written in {token, token.lower(), token.upper()}:
            keys.add(written)
            if _is_hex32(written):
                keys.add(_dashed(written))
            elif _is_dashed(written):
                keys.add(written.replace("-", ""))
    return keys


def unescape_json(text: str) -> str:
    """``text`` with JSON escapes of ASCII characters (``\\u0064``, also doubly escaped) undone."""
    # One character is found with memchr; then the expression, whose literal first character
    # makes it fast (faster than a search for the five characters "\\u00" amid hex digits).
    if "\\" not in text or _ESCAPED.search(text) is None:
        return text
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _unescape_json_bytes(data: bytes) -> bytes:
    """:func:`unescape_json` of UTF-8 bytes (the escapes undone are ASCII)."""
    if b"\\" not in data or _ESCAPED_BYTES.search(data) is None:
        return data
    return _ESCAPE_BYTES.sub(lambda m: bytes([int(m.group(1), 16)]), data)


# ---------------------------------------------------------------------------- the alphabet


def _alphabet(pattern: str) -> tuple[frozenset[int], int] | None:
    """The ASCII bytes a match of ``pattern`` can hold (both cases of each letter), and the
    shortest match; None where that cannot be read off the pattern (``.``, negated sets,
    categories, anchors, look-arounds, back references, non-ASCII): then the slow scan serves."""
    try:
        parser: Any = importlib.import_module("re._parser")
        tree = parser.parse(pattern)
        width = int(tree.getwidth()[0])
    except Exception:  # an internal module of CPython: any surprise means "not known"
        return None
    chars: set[int] = set()

    def walk(items: Any) -> bool:
        for op, arg in items:
            name = str(op)
            if name == "LITERAL":
                chars.add(int(arg))
            elif name == "IN":
                for inner, value in arg:
                    inner_name = str(inner)
                    if inner_name == "LITERAL":
                        chars.add(int(value))
                    elif inner_name == "RANGE":
                        chars.update(range(int(value[0]), int(value[1]) + 1))
                    else:  # NEGATE, CATEGORY: not a finite ASCII set
                        return False
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                if not walk(arg[2]):
                    return False
            elif name == "SUBPATTERN":
                if not walk(arg[3]):
                    return False
            elif name == "ATOMIC_GROUP":
                if not walk(arg):
                    return False
            elif name == "BRANCH":
                if not all(walk(branch) for branch in arg[1]):
                    return False
            else:  # ANY, NOT_LITERAL, AT, ASSERT, ASSERT_NOT, GROUPREF, ...
                return False
        return True

    if not walk(tree) or width < 1 or any(c >= 128 for c in chars):
        return None
    folded = set(chars)
    for c in chars:
        folded.update({ord(chr(c).lower()), ord(chr(c).upper())})
    return frozenset(folded), width


class _Shapes:
    """Every place one of some shapes occurs in a text, overlapping, whatever the case."""

    def __init__(self, patterns: Iterable[str]) -> None:
        flags = re.IGNORECASE | re.ASCII
        patterns = list(patterns)
        # A look-ahead match is empty, so the scan moves on by one: every start is tried, and a
        # window inside a longer run is found as well as the run's first one.
        self.everywhere = [re.compile(f"(?=({p}))", flags) for p in patterns]
        known = [_alphabet(p) for p in patterns]
        self.fast = all(k is not None for k in known)
        if self.fast:
            try:
                self.everywhere_bytes = [re.compile(f"(?=({p}))".encode(), flags) for p in patterns]
            except re.error:  # an escape only a str pattern knows (\u0041)
                self.fast = False
        if self.fast:
            table = bytearray(b"." * 256)
            for alphabet, _ in filter(None, known):
                for c in alphabet:
                    table[c] = ord("x")
            self.table = bytes(table)
            # The prefilter also marks the bytes of a JSON escape of an ASCII character
            # (``\\u00`` and hex digits, the backslash doubled or not): written behind escapes,
            # a match still lies in a run at least ``width`` long of the marked bytes, so one
            # sampled pass finds where to look for both (:meth:`IdShape.tokens`).
            for c in b"\\u0123456789abcdefABCDEF":
                table[c] = ord("x")
            self.sample_table = bytes(table)
            width = min(width for _, width in filter(None, known))
            self.needle = b"x" * width
            self.run = re.compile(b"x+")
            # Every match lies in a run of the alphabet at least ``width`` long, and such a run
            # holds ``(width - stride) // stride + 1`` consecutive multiples of ``stride``: only
            # where data[::stride] holds a run of that many bytes of the alphabet can there be
            # something to find (issue 15: a page whose home IDs were all rewritten is looked at
            # in a quarter of its bytes). See :meth:`spans`.
            self.stride = width // 8 if width >= 16 else 0
            if self.stride:
                self.sampled = b"x" * ((width - self.stride) // self.stride + 1)

    def tokens(self, text: str | bytes) -> Iterator[str]:
        """``text``: a str, or UTF-8 bytes (what a response is written from)."""
        if not self.fast:
            if isinstance(text, bytes):
                text = text.decode("utf-8", "surrogatepass")
            for pattern in self.everywhere:
                for match in pattern.finditer(text):
                    if match.group(1):
                        yield match.group(1)
            return
        # Matches lie within runs of the shapes' alphabet: marked with one byte, such runs are
        # found by a search for a literal, and only they are tried.
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        for start, stop in self.spans(data):
            marked = data[start:stop].translate(self.table)
            at = marked.find(self.needle)
            while at >= 0:
                found = self.run.match(marked, at)
                assert found is not None, "the needle is a run of the mark"
                end = found.end()
                for in_bytes in self.everywhere_bytes:
                    for hit in in_bytes.finditer(data, start + at, start + end):
                        if hit.group(1):
                            yield hit.group(1).decode("ascii")
                at = marked.find(self.needle, end)

    def spans(self, data: bytes) -> Iterator[tuple[int, int]]:
        """The parts of ``data`` that may hold a match: the whole, or (with a stride) around
        each run of ``sampled`` in data[::stride]. Such a run is maximal, so the sampled bytes
        just before and after it are not in the alphabet: every run of the alphabet it meets
        lies between them, whole, and every run long enough to hold a match meets one."""
        if not self.stride:
            yield 0, len(data)
            return
        stride, sampled = self.stride, self.sampled
        marked = data[::stride].translate(self.sample_table)
        at = marked.find(sampled)  # the first of a run: the byte before it is not marked
        while at >= 0:
            found = self.run.match(marked, at)
            assert found is not None, "the needle is a run of the mark"
            yield max(0, (at - 1) * stride + 1), min(len(data), found.end() * stride)
            at = marked.find(sampled, found.end())


class IdShape:
    """The shape of the home's IDs (``[home] id_pattern``, a regular expression)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        # An anchored pattern (``^...$``) names the shape of a whole ID; in a text it is looked
        # for anywhere.
        bare = pattern
        if bare.startswith("^"):
            bare = bare[1:]
        if bare.endswith("$") and not bare.endswith("\\$"):
            bare = bare[:-1]
        any_case = re.compile(bare, re.IGNORECASE | re.ASCII)
        self.hex_uuid = bool(any_case.fullmatch(_SAMPLE) or any_case.fullmatch(_dashed(_SAMPLE)))
        """Home's IDs are hex UUIDs: both renderings are looked for, whichever the pattern names."""
        shapes = [bare, _HEX32, _DASHED] if self.hex_uuid else [bare]
        self.shapes = _Shapes(shapes)
        self._fixed = [re.compile(s, re.IGNORECASE | re.ASCII) for s in shapes if _fixed_width(s)]
        self._classified: dict[str, tuple[str, bool]] = {}

    def tokens(self, text: str | bytes) -> set[str]:
        """Every string in the home's ID shape in ``text`` (a str, or UTF-8 bytes), as written:
        whatever its case, however it is glued to its neighbours, every window of a longer run,
        also behind JSON escapes."""
        shapes = self.shapes
        if isinstance(text, bytes) and shapes.fast and shapes.stride:
            # Only the stretches the sampled prefilter finds can hold a match, written out or
            # behind escapes (its marks include an escape's bytes), and every escape lies whole
            # in one of them: those alone are read, and unescaped (issue 15: a whole page
            # unescaped cost a second pass over it).
            found: set[str] = set()
            for start, stop in shapes.spans(text):
                part = text[start:stop]
                found.update(shapes.tokens(part))
                unescaped_part = _unescape_json_bytes(part)
                if unescaped_part is not part:
                    found.update(shapes.tokens(unescaped_part))
            return found
        found = set(shapes.tokens(text))
        unescaped = _unescape_json_bytes(text) if isinstance(text, bytes) else unescape_json(text)
        if unescaped is not text:
            found.update(self.shapes.tokens(unescaped))
        return found

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        """Where the home's ID shape occurs in ``text`` (overlapping; the slow scan, for short
        texts)."""
        for pattern in self.shapes.everywhere:
            for match in pattern.finditer(text):
                if match.end(1) > match.start(1):
                    yield match.start(1), match.end(1)

    def candidates(self, text: str) -> set[str]:
        """The canonical forms (:func:`forms`) of every token in ``text``."""
        return {form for token in self.tokens(text) for form in forms(token)}

    def classify(self, internal: str) -> tuple[str, bool]:
        """An internal ID in play, lowered, and whether :meth:`covers` it; kept for the IDs
        seen recently (a page names the same hundred IDs request after request)."""
        held = self._classified.get(internal)
        if held is None:
            lowered = internal.lower()
            held = (lowered, bool(lowered) and self.covers(lowered))
            if len(self._classified) >= 16384:  # never an unbounded memo (about 2 MB at most)
                self._classified.clear()
            self._classified[internal] = held
        return held

    def covers(self, value: str) -> bool:
        """Whether every occurrence of ``value`` in a text is sure to be among its tokens (the
        value is in a shape of fixed width), so that no search of its own is needed."""
        if self.hex_uuid and (_is_hex32(value) or _is_dashed(value)):
            return True
        return any(p.fullmatch(value) for p in self._fixed)


def _fixed_width(pattern: str) -> bool:
    try:
        parser: Any = importlib.import_module("re._parser")
        low, high = parser.parse(pattern).getwidth()
    except Exception:
        return False
    return bool(low == high)


@dataclass(frozen=True)
class Leak:
    """Where a leak was found; never the leaked value itself."""

    where: str
    reason: str


IN_PLAY = "an internal ID in play"
KNOWN = "an internal ID known to the broker"


@dataclass(frozen=True)
class Scan:
    """One part of a domain-bound message, read once: what the guard needs of it."""

    where: str
    text: str | bytes
    """The part, as a str or as the UTF-8 bytes it is sent as."""
    tokens: frozenset[str]
    """Strings in the home's ID shape, as written (for the exact lookup)."""
    candidates: frozenset[str]
    """Their canonical forms."""

    @classmethod
    def of(cls, where: str, text: str | bytes, shape: IdShape) -> Scan:
        tokens = frozenset(shape.tokens(text))
        return cls(where, text, tokens, frozenset(f for t in tokens for f in forms(t)))

    @functools.cached_property
    def texts(self) -> tuple[str, ...]:
        """The part in lower case, as written and with JSON escapes undone (for the search of an
        internal ID in play that is not in the home's shape); made only when needed."""
        text = self.text
        if isinstance(text, bytes):
            text = text.decode("utf-8", "surrogatepass")
        lowered = text.lower()
        unescaped = unescape_json(lowered)
        return (lowered,) if unescaped is lowered else (lowered, unescaped)


def find_in_play(scans: Iterable[Scan], in_play: Collection[str], shape: IdShape) -> Leak | None:
    """The first part holding an internal ID in play, whatever its case, however glued, in
    either rendering of a hex UUID, or behind JSON escapes."""
    covered: set[str] = set()
    others: set[str] = set()
    for internal in in_play:
        lowered, is_covered = shape.classify(internal)
        if not lowered:
            continue
        if is_covered:
            # Any rendering of it in a part is a token there, whose forms include this one.
            covered.add(lowered)
        else:
            others.update(forms(lowered))
    for scan in scans:
        if covered & scan.candidates:
            return Leak(scan.where, IN_PLAY)
        if others and any(value in text for text in scan.texts for value in others):
            return Leak(scan.where, IN_PLAY)
    return None


def known_in(scans: Iterable[Scan], known: Collection[str]) -> list[Leak]:
    """The parts holding one of ``known`` (exact lookup keys found among the internal IDs)."""
    known = set(known)
    return [Leak(scan.where, KNOWN) for scan in scans if lookup_keys(scan.tokens) & known]


def scrub(text: str, replacements: dict[str, str], id_pattern: IdShape) -> str:
    """Free text (home's error ``detail``) with known IDs replaced by the caller's, and anything
    else in the home's ID shape masked as ``[id]``.

    Both without regard to case and however glued to their neighbours; a known hex UUID is
    replaced in either rendering. Masking only rewrites home's error text, so it may be broad: a
    random hex value there is masked too.
    """
    spans: list[tuple[int, int, str]] = []
    known = {form: new for old, new in replacements.items() if old for form in forms(old)}
    if known:
        alternatives = sorted(known, key=len, reverse=True)
        finder = re.compile("|".join(re.escape(a) for a in alternatives), re.IGNORECASE)
        spans = [
            (m.start(), m.end(), known.get(m.group(0).lower(), "[id]"))
            for m in finder.finditer(text)
        ]
    masked: list[tuple[int, int]] = []
    for start, end in id_pattern.spans(text):
        if not any(s < end and start < e for s, e, _ in spans):
            masked.append((start, end))
    masked.sort()
    merged: list[tuple[int, int, str]] = []
    for start, end in masked:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), "[id]")
        else:
            merged.append((start, end, "[id]"))
    out, at = [], 0
    for start, end, new in sorted(spans + merged):
        out.append(text[at:start])
        out.append(new)
        at = end
    out.append(text[at:])
    return "".join(out)
