"""The mapping file that ``broker mappings import`` reads and ``broker mappings export`` writes:
one mapping row a line, as CSV (a header ``internal_id,domain,external_id,primary``, then
``true``/``false`` for the flag) or JSON Lines (``{"internal_id": ..., "domain": ...,
"external_id": ..., "primary": true}``).

Pure: lines in, records or numbered problems out, and rows out as lines. The checks that need
the database (a known domain, no clash with rows already mapped, one primary per entity and
domain across the whole file) are set-based, in :mod:`broker.mapping.accounts`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "FIELDS",
    "Batch",
    "FileFormat",
    "LineProblem",
    "Record",
    "detect_format",
    "format_header",
    "format_row",
    "parse_batches",
]

FIELDS = ("internal_id", "domain", "external_id", "primary")
"""The columns, in the order CSV holds them."""

_ID = re.compile(r"(?!\s)[^\x00-\x1f\x7f]{1,1024}(?<!\s)")
"""An internal or external ID: 1 to 1,024 characters, no control character, no space at either end."""

_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
"""A domain's ID, as the domains table allows it (``domains_id_format``)."""

_FLAGS = {"true": True, "false": False}


class FileFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


class Record(NamedTuple):
    """One well-formed line: the staging table's columns, in its order."""

    line: int
    internal_id: str
    domain: str
    external_id: str
    primary: bool


@dataclass(frozen=True, order=True)
class LineProblem:
    """Why line ``line`` of the file cannot be imported."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def detect_format(path: Path, head: str) -> FileFormat:
    """The format by the file's extension (``.csv``; ``.jsonl``, ``.ndjson``), else by its first
    non-blank character (``{``: JSON Lines)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return FileFormat.CSV
    if suffix in (".jsonl", ".ndjson"):
        return FileFormat.JSONL
    return FileFormat.JSONL if head.lstrip().startswith("{") else FileFormat.CSV


class Batch(NamedTuple):
    """The next lines of the file: their well-formed records and their problems, each in line
    order, and the number of the last line read."""

    records: list[Record]
    problems: list[LineProblem]
    last: int


def parse_batches(lines: Iterable[str], file_format: FileFormat, size: int) -> Iterator[Batch]:
    """The file read ``size`` records or problems at a time (the last batch may be smaller or
    empty). One loop over the lines, with no generator between the line and its record: at 10
    million lines each layer cost about a second."""
    if file_format is FileFormat.CSV:
        return _csv_batches(lines, size)
    return _jsonl_batches(lines, size)


def _jsonl_batches(lines: Iterable[str], size: int) -> Iterator[Batch]:
    records: list[Record] = []
    problems: list[LineProblem] = []
    last = 0
    for item in _parse_jsonl(lines):
        last = item.line
        if isinstance(item, LineProblem):
            problems.append(item)
        else:
            records.append(item)
        if len(records) + len(problems) >= size:
            yield Batch(records, problems, last)
            records, problems = [], []
    yield Batch(records, problems, last)


_PLAIN_ID = r"((?!\s)[^\x00-\x1f\x7f,\"]{1,1024}(?<!\s))"
_PLAIN_LINE = re.compile(
    _PLAIN_ID + r",([A-Za-z0-9][A-Za-z0-9_.-]{0,62})," + _PLAIN_ID + r",(true|false)\r?\n?"
)
"""A line with no quote whose four fields are well formed as they stand: the common line, read
with one match. Any other line goes through the csv module and the checks one by one, which
name what is wrong with it (a line this matches would read the same way there)."""


def _csv_batches(lines: Iterable[str], size: int) -> Iterator[Batch]:
    match, new = _PLAIN_LINE.fullmatch, tuple.__new__
    records: list[Record] = []
    problems: list[LineProblem] = []
    pending, first, number = "", 0, 0
    for number, text in enumerate(lines, start=1):
        plain = None if pending else match(text)
        if plain is not None:
            internal, domain, external, flag = plain.groups()
            records.append(new(Record, (number, internal, domain, external, flag == "true")))
        else:
            first = first if pending else number
            pending += text
            if pending.count('"') % 2 == 0:  # the record ends here (a quoted field may span lines)
                _sort(_parse_csv_record(pending, first, number), records, problems)
                pending = ""
        if len(records) + len(problems) >= size:  # bad lines count too: a batch stays bounded
            yield Batch(records, problems, number)
            records, problems = [], []
    if pending:
        number = first + pending.count("\n")
        _sort(_parse_csv_record(pending, first, number), records, problems)
    yield Batch(records, problems, number)


def _sort(
    items: Iterable[Record | LineProblem], records: list[Record], problems: list[LineProblem]
) -> None:
    for item in items:
        if isinstance(item, LineProblem):
            problems.append(item)
        else:
            records.append(item)


def _parse_csv_record(text: str, first: int, last: int) -> Iterator[Record | LineProblem]:
    """One record of the file (lines ``first`` to ``last``) that is not a plain line."""
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as exc:
        yield LineProblem(last, f"not CSV ({exc})")
        return
    for row in rows:
        if not row or (first == 1 and tuple(row) == FIELDS):
            continue
        if len(row) != 4:
            yield LineProblem(
                last,
                f"{len(row)} fields, not 4 ({','.join(FIELDS)}): quote a value holding a comma",
            )
            continue
        flag = _FLAGS.get(row[3].strip().lower())
        if flag is None:
            yield LineProblem(last, f"primary is {row[3]!r}: write true or false")
            continue
        yield _checked(last, row[0], row[1], row[2], flag)


def _parse_jsonl(lines: Iterable[str]) -> Iterator[Record | LineProblem]:
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            yield LineProblem(line, f"not JSON ({exc})")
            continue
        if not isinstance(value, dict) or set(value) != set(FIELDS):
            yield LineProblem(line, f"not an object with exactly the keys {', '.join(FIELDS)}")
            continue
        internal, domain, external, flag = (value[f] for f in FIELDS)
        if not all(isinstance(v, str) for v in (internal, domain, external)):
            yield LineProblem(line, "internal_id, domain and external_id must be strings")
            continue
        if not isinstance(flag, bool):
            yield LineProblem(line, f"primary is {flag!r}: write true or false")
            continue
        yield _checked(line, internal, domain, external, flag)


def _checked(
    line: int, internal: str, domain: str, external: str, flag: bool
) -> Record | LineProblem:
    if not _ID.fullmatch(internal):
        return LineProblem(line, f"internal ID {internal!r} {_ID_RULE}")
    if not _DOMAIN.fullmatch(domain):
        return LineProblem(line, f"domain {domain!r} is not a domain ID")
    if not _ID.fullmatch(external):
        return LineProblem(line, f"external ID {external!r} {_ID_RULE}")
    return Record(line, internal, domain, external, flag)


_ID_RULE = "is not an ID: 1 to 1,024 characters, no control character, no space at either end"


def format_header(file_format: FileFormat) -> str:
    """What the file starts with (CSV's header line; nothing for JSON Lines)."""
    return ",".join(FIELDS) + "\n" if file_format is FileFormat.CSV else ""


def format_row(
    file_format: FileFormat, internal: str, domain: str, external: str, primary: bool
) -> str:
    """One mapping row as a line of the file, as :func:`parse_batches` reads it back."""
    if file_format is FileFormat.JSONL:
        document = {
            "internal_id": internal,
            "domain": domain,
            "external_id": external,
            "primary": primary,
        }
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n"
    return _csv_line(internal, domain, external, "true" if primary else "false")


def _csv_line(*values: str) -> str:
    return ",".join(_csv_value(v) for v in values) + "\n"


def _csv_value(value: str) -> str:
    if any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value
